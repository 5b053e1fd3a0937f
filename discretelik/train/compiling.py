"""``torch.compile`` for training: the whole step, or each repeated block once (regional).

Regional compilation (PyTorch's "regional compilation" recipe, torch >= 2.5) compiles the
``forward`` of each repeated block module instead of the whole model. With
``torch._dynamo.config.inline_inbuilt_nn_modules`` (the default since 2.5) a block's
parameters are graph inputs, so every instance of one block class with the same structure and
input shapes reuses one compiled graph: the PixelCNN++ paper model has 39 gated residual
layers but only a handful of distinct (stream, short-cut, resolution) variants. Weight-normed
layers first get one shared class per layer type
(``discretelik.nn.weight_norm.share_parametrized_classes``): ``torch.nn.utils.parametrize``
gives each its own, and compile guards on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.pixelcnn_pp import GatedResNet, PixelCNNPP
from ..nn.weight_norm import share_parametrized_classes

__all__ = ["compile_regions", "set_compile_cache_dir"]

# Distinct compiled variants one block class may need (dynamo's default, 8, is too few for
# PixelCNN++'s 4 block kinds at 3 resolutions; past the limit a block silently runs eager).
_RECOMPILE_LIMIT = 32

# The repeated block of each built-in backbone that has one worth compiling on its own; a
# backbone may also name its own in a ``repeated_blocks`` attribute (a tuple of classes).
_REPEATED_BLOCKS: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    PixelCNNPP: (GatedResNet,),
}


def compile_regions(
    model: nn.Module, blocks: tuple[type[nn.Module], ...] | None = None, **compile_kwargs: Any
) -> int:
    """Compile, in place, every submodule of ``model`` that is an instance of ``blocks``.

    Args:
        model: An [`AutoregressiveModel`][discretelik.AutoregressiveModel] or a backbone;
            with ``blocks=None`` the backbone's repeated block (``GatedResNet`` for
            ``"pixelcnn++"``, or the classes of its ``repeated_blocks`` attribute) is used.
        blocks: Block classes to compile.
        **compile_kwargs: Passed to ``torch.compile`` (e.g. ``backend``, ``mode``);
            ``dynamic`` defaults to ``False``.

    Returns:
        The number of block instances compiled.

    Raises:
        ValueError: No block classes are known for ``model``, or ``model`` has none of them.
    """
    if blocks is None:
        backbone = getattr(model, "backbone", model)
        blocks = tuple(
            getattr(backbone, "repeated_blocks", None) or _REPEATED_BLOCKS.get(type(backbone), ())
        )
        if not blocks:
            raise ValueError(
                f"compile='regional' needs a backbone that names its repeated blocks "
                f"(repeated_blocks); {type(backbone).__name__} names none: use compile='full'"
            )
    found = [m for m in model.modules() if isinstance(m, blocks)]
    if not found:
        names = [b.__name__ for b in blocks]
        raise ValueError(f"model has no {names} blocks to compile")
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _RECOMPILE_LIMIT))
    # Else every weight-normed layer has a class of its own and each block recompiles.
    share_parametrized_classes(model)
    # Static shapes: a few more graphs (one per block kind and resolution) than with the
    # automatic dynamic shapes the recompiles would switch on, but each specialised (better
    # kernels), and no recompiles back and forth between the 1F and 2F short-cuts.
    compile_kwargs.setdefault("dynamic", False)
    for module in found:
        module.compile(**compile_kwargs)
    return len(found)


def set_compile_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Keep Inductor's on-disk caches (FX graphs, AOTAutograd, kernels) in ``path``.

    Inductor caches compiled graphs on disk by default, under a per-user directory in
    ``/tmp`` that may not survive a reboot or a new container; a directory of your own makes
    a second launch with the same model, shapes and torch version reuse the first one's
    compiled code. Call it before the first compiled call.

    Returns:
        ``path`` as a ``Path`` (created).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Read by inductor whenever it resolves its cache directory (not only at import).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    return path
