"""CIFAR-10 readers for the three layouts users have, with no code execution from files.

Layouts (the first that matches ``root`` wins):

1. The official python distribution: a ``cifar-10-batches-py`` directory (or ``root`` itself)
   holding the pickled batches ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``. Each is
   a dict with ``data`` ``(N, 3072)`` uint8 in channel-planar order (1024 R, 1024 G, 1024 B,
   each row-major 32x32) and ``labels`` (N ints).
2. One ``.npz`` file with ``x_train, y_train, x_test, y_test`` (images uint8 NHWC
   ``(N, 32, 32, 3)``).
3. A directory of per-batch ``.npz`` files ``data_batch_1.npz`` ... ``data_batch_5.npz`` and
   ``test_batch.npz``, each with ``x`` uint8 ``(N, 32, 32, 3)`` and ``y`` (the layout of the
   project's shared data folder).

The pickles are read with a restricted unpickler that resolves only the handful of numpy
callables needed to rebuild an array; any other global in the file (which is how a malicious
pickle runs code) raises [`UnsafePickleError`][discretelik.data.cifar10.UnsafePickleError]
before anything is called. ``.npz`` files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["CIFAR10_CLASSES", "UnsafePickleError", "load_cifar10", "read_cifar10_pickle"]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names in label order 0-9."""

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCHES = ("test_batch",)
_OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# The archive's published MD5 (the value torchvision checks too).
_OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
_FOLDER = "cifar-10-batches-py"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that the CIFAR-10 reader does not allow."""


def _safe_dtype(dtype: Any) -> np.dtype:
    """A fresh copy of a plain numeric dtype, or ``UnsafePickleError``.

    A pickle rebuilds a dtype and then sets its state (fields, flags, sizes) from file bytes:
    a dtype that hides an object field behind a cleared object flag would make numpy read
    bytes of the file as object pointers. So every array or scalar takes its dtype through
    here: only bool/int/uint/float kinds pass, rebuilt from their type string.
    """
    try:
        ok = (
            isinstance(dtype, np.dtype)
            and dtype.kind in "biuf"
            and dtype.names is None
            and dtype.subdtype is None
            and not dtype.hasobject
        )
        if ok:
            return np.dtype(dtype.str)
    except Exception:  # a tampered dtype may fail in any attribute
        pass
    raise UnsafePickleError("refusing a dtype other than a plain bool, int or float")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    # Take the callables from live objects instead of importing numpy's private modules: the
    # module that holds them moved (numpy.core -> numpy._core in numpy 2), and files written by
    # either version name their own location, so both spellings map to the same object.
    reconstruct = np.empty(1).__reduce__()[0]  # ndarray pickles, protocols 0-4
    frombuffer = np.empty(1).__reduce_ex__(5)[0]  # ndarray pickles, protocol 5
    scalar = np.float64(0).__reduce__()[0]  # numpy scalars (labels saved as np.int64)

    # Each callable is wrapped so that whatever dtype the pickle hands it passes _safe_dtype.
    def make_dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
        if not isinstance(obj, (str, bytes)):
            raise UnsafePickleError(f"refusing numpy.dtype of a {type(obj).__name__}")
        # Always a copy: the pickle's BUILD then sets the state of this copy, never of numpy's
        # shared builtin dtype.
        return np.dtype(obj, align=align is True, copy=True)

    def make_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _CheckedArray or not isinstance(dtype, (str, bytes)):
            raise UnsafePickleError("refusing an array reconstruction other than numpy.ndarray")
        return reconstruct(_CheckedArray, shape, _safe_dtype(np.dtype(dtype)))

    def make_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        return frombuffer(buf, _safe_dtype(dtype), shape, order)

    def make_scalar(dtype: Any, *args: Any) -> Any:
        return scalar(_safe_dtype(dtype), *args)

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): _CheckedArray,
        ("numpy", "dtype"): make_dtype,
        # Python 3 pickles bytes as _codecs.encode(str, "latin1") under protocols < 3; it only
        # turns a string into bytes.
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = make_array
        allowed[(f"{core}.multiarray", "scalar")] = make_scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = make_frombuffer
    return allowed


class _CheckedArray(np.ndarray):
    """What a pickle's ``numpy.ndarray`` resolves to: its ``__setstate__`` checks the dtype."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_CheckedArray":
        # Array pickles go through _reconstruct/_frombuffer; a direct call is not one of them.
        raise UnsafePickleError("refusing a direct numpy.ndarray(...) call")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("refusing an ndarray state that is not a 4- or 5-tuple")
        i = len(state) - 3  # (version,) shape, dtype, is_fortran, data
        super().__setstate__(state[:i] + (_safe_dtype(state[i]),) + state[i + 1 :])


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_allowed_globals``."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # latin1 turns Python 2 byte strings (the official files were written by Python 2)
        # into str keys and lets numpy recover the raw array bytes.
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name}: a CIFAR-10 batch "
                "holds only numpy arrays, lists, numbers and strings, so this file is not a "
                "CIFAR-10 batch (or has been tampered with); nothing from it was run"
            ) from None


def read_cifar10_pickle(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Read one official CIFAR-10 python batch (e.g. ``data_batch_1``) without running code.

    Args:
        path: The pickled batch: a dict with ``data`` uint8 ``(N, 3072)`` channel-planar and
            ``labels`` (a list of ``N`` ints in 0-9); byte-string keys (Python 2) are accepted.

    Returns:
        ``(images, labels)``: images uint8 ``(N, 3, 32, 32)``, labels int64 ``(N,)``.

    Raises:
        UnsafePickleError: The pickle references anything but numpy's array reconstruction,
            or an array or scalar whose dtype is not a plain bool, int or float.
        ValueError: The file is not a pickle, or its contents have the wrong keys, shapes,
            dtypes or label range; the message names the file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh, str(path)).load()
        except UnsafePickleError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise UnsafePickleError(
                f"{path}: {exc}: this file is not a CIFAR-10 batch (or has been tampered with)"
            ) from None
        except Exception as exc:  # truncated or non-pickle bytes raise many different types
            raise ValueError(
                f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles read with encoding="latin1" give str keys; other writers may use bytes.
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = {"data", "labels"} - set(entries)
    if missing:
        raise ValueError(
            f"{path}: expected keys 'data' and 'labels', missing {sorted(missing)} "
            f"(found {sorted(map(str, entries))})"
        )
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != 3 * 32 * 32
    ):
        what = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(f"{path}: 'data' must be a uint8 array (N, 3072), got {what}")
    images = data.reshape(-1, 3, 32, 32)  # channel-planar rows are already CHW
    return _to_tensors(images, entries["labels"], str(path))


def _to_tensors(images: np.ndarray, labels: Any, source: str) -> tuple[Tensor, Tensor]:
    """Validate labels against ``images`` (uint8 NCHW) and convert both to tensors."""
    try:
        y = np.asarray(labels)
    except Exception as exc:
        raise ValueError(f"{source}: labels are not a sequence of integers ({exc})") from exc
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(
            f"{source}: labels must be integers of shape ({images.shape[0]},), got "
            f"{y.dtype} of shape {y.shape}"
        )
    if y.shape[0] != images.shape[0]:
        raise ValueError(
            f"{source}: {images.shape[0]} images but {y.shape[0]} labels"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise ValueError(f"{source}: labels must lie in [0, 9], got [{y.min()}, {y.max()}]")
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x, torch.from_numpy(y.astype(np.int64))


def _nhwc_to_tensors(x: Any, y: Any, source: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (
        32,
        32,
        3,
    ):
        what = f"{x.dtype} of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{source}: images must be uint8 (N, 32, 32, 3) NHWC, got {what}")
    return _to_tensors(x.transpose(0, 3, 1, 2), y, source)


def _load_npz(path: Path, keys: tuple[str, str]) -> tuple[Tensor, Tensor]:
    try:
        # allow_pickle=False: an object array inside the archive raises instead of unpickling.
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in keys if k not in arrays.files]
            if missing:
                raise ValueError(
                    f"{path}: expected arrays {list(keys)}, missing {missing} "
                    f"(found {sorted(arrays.files)})"
                )
            x, y = arrays[keys[0]], arrays[keys[1]]
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    return _nhwc_to_tensors(x, y, str(path))


def _concat(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _not_found(root: Path, download: bool, reason: str = "") -> FileNotFoundError:
    hint = "\n  or pass download=True / --download (needs network access)" if not download else ""
    return FileNotFoundError(
        f"CIFAR-10 not found at {root}{': ' + reason if reason else ''}. Expected one of:\n"
        f"  {root}/{_FOLDER}/data_batch_1 ... data_batch_5, test_batch "
        f"(extract {_OFFICIAL_URL} into {root})\n"
        f"  {root}/data_batch_1.npz ... data_batch_5.npz, test_batch.npz (each with x, y)\n"
        f"  a .npz file with x_train, y_train, x_test, y_test (uint8 NHWC)" + hint
    )


def _fetch(url: str, dest: Path) -> str:
    """Stream ``url`` into the file ``dest``; returns the MD5 hex digest of what was written."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            md5.update(chunk)
            out.write(chunk)
    return md5.hexdigest()


def _extract_batches(archive: Path, into: Path) -> None:
    """Extract the batch files of the official archive into ``into``, and nothing else.

    Only members named ``cifar-10-batches-py/<batch>`` are read, each through ``extractfile``
    into a fixed file name, so no member's path, link or mode is ever applied to the disk.
    """
    wanted = {f"{_FOLDER}/{n}": n for n in (*_TRAIN_BATCHES, *_TEST_BATCHES)}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = wanted.pop(member.name, None)
            if name is None:
                continue  # batches.meta, readme.html: not needed
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise ValueError(f"{member.name} is not a regular file in the archive")
            with source, open(into / name, "wb") as out:
                shutil.copyfileobj(source, out)
    if wanted:
        raise ValueError(f"the archive lacks {sorted(wanted)}")


def _download(root: Path) -> None:
    """Fetch the official archive into ``root/cifar-10-batches-py``, checked against its MD5.

    Everything happens in a temporary directory under ``root`` that is removed in all cases;
    the batch folder appears (by one rename) only once the archive's checksum matched and all
    six batches were extracted.
    """
    dest = root / _FOLDER
    if dest.exists():
        raise _not_found(root, True, f"{dest} is incomplete; remove it to download again")
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-10-download-", dir=root))
    try:
        archive = tmp / "cifar-10-python.tar.gz"
        try:
            digest = _fetch(_OFFICIAL_URL, archive)
        except (OSError, ValueError) as exc:  # URLError and socket errors are OSErrors
            raise _not_found(
                root, True, f"download of {_OFFICIAL_URL} failed ({type(exc).__name__}: {exc})"
            ) from exc
        if digest != _OFFICIAL_MD5:
            raise _not_found(
                root, True, f"the file downloaded from {_OFFICIAL_URL} has MD5 {digest}, expected "
                f"{_OFFICIAL_MD5} (a corrupted or different file; nothing was extracted)"
            )
        batches = tmp / _FOLDER
        batches.mkdir()
        try:
            _extract_batches(archive, batches)
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise _not_found(root, True, f"could not extract {_OFFICIAL_URL}: {exc}") from exc
        try:
            os.rename(batches, dest)
        except OSError:  # another process finished first: fine if its copy is complete
            if not all((dest / n).is_file() for n in (*_TRAIN_BATCHES, *_TEST_BATCHES)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar10(
    root: str | os.PathLike[str], split: str = "train", *, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load a CIFAR-10 split as integer images, from any of the layouts in the module docstring.

    Args:
        root: A directory (containing ``cifar-10-batches-py/``, the pickled batches themselves,
            or the per-batch ``.npz`` files) or a single ``.npz`` file.
        split: ``"train"`` (50,000 images, ``data_batch_1`` ... ``5`` in order) or ``"test"``
            (10,000 images).
        download: When nothing is found under a directory ``root``, fetch the official archive
            (about 163 MiB; needs network access), check its published MD5 and extract the
            batches into ``root/cifar-10-batches-py``. Needs no package beyond this one.

    Returns:
        ``(images, labels)``: images uint8 ``(N, 3, 32, 32)`` RGB, labels int64 ``(N,)`` in
        0-9 (see ``CIFAR10_CLASSES``).

    Raises:
        FileNotFoundError: Nothing usable at ``root`` (or ``download`` failed: the network, the
            checksum or the archive); the message lists where the files go.
        ValueError: ``split`` is not ``"train"``/``"test"``, or a file is malformed (the message
            names the file and what was wrong).
        UnsafePickleError: A pickled batch references a global other than numpy's array
            reconstruction (it is rejected before anything in it runs).

    Example:
        >>> images, labels = load_cifar10("~/data", "test")  # doctest: +SKIP
        >>> images.shape, images.dtype
        (torch.Size([10000, 3, 32, 32]), torch.uint8)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    root = Path(root).expanduser()
    names = _TRAIN_BATCHES if split == "train" else _TEST_BATCHES
    if root.is_file():
        if root.suffix != ".npz":
            raise ValueError(
                f"root must be a directory or a .npz file, got the file {root} "
                "(for the official pickles pass the directory that holds them)"
            )
        return _load_npz(root, (f"x_{split}", f"y_{split}"))
    if not root.is_dir():
        if download:
            root.mkdir(parents=True, exist_ok=True)
        else:
            raise _not_found(root, download, "no such file or directory")
    for attempt in range(2):
        for folder in (root / "cifar-10-batches-py", root):
            if all((folder / n).is_file() for n in names):
                return _concat([read_cifar10_pickle(folder / n) for n in names])
        if all((root / f"{n}.npz").is_file() for n in names):
            return _concat([_load_npz(root / f"{n}.npz", ("x", "y")) for n in names])
        if attempt == 0 and download:
            _download(root)
            continue
        break
    partial = [
        str(folder / n)
        for folder in (root / "cifar-10-batches-py", root)
        for n in (*names, *(f"{m}.npz" for m in names))
        if (folder / n).is_file()
    ]
    reason = f"incomplete: found only {partial} for split {split!r}" if partial else ""
    raise _not_found(root, download, reason)
