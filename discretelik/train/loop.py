"""Training-loop pieces: batches, the loss module, one train step, evaluation, a trainer.

Everything is usable on its own:

* [`RandomBatches`][discretelik.train.RandomBatches]: index batches drawn from a uint8 image
  tensor that stays on the device (no DataLoader workers): one permutation per epoch from a
  seeded generator, the global batch split into one shard per DDP rank.
* [`LikelihoodLoss`][discretelik.train.LikelihoodLoss]: the ``nn.Module`` that DDP wraps and
  ``torch.compile`` compiles; backbone and head projection under autocast, the likelihood in
  float32.
* [`train_step`][discretelik.train.train_step]: zero grad, forward, backward, optimiser,
  scheduler and EMA in one call.
* [`evaluate_bpd`][discretelik.train.evaluate_bpd]: bits/dim over a whole split in float32,
  sharded over DDP ranks.
* [`Trainer`][discretelik.train.Trainer]: ties them together with the PixelCNN++ optimiser
  (Adam, per-step exponential learning-rate decay), Polyak averaging, progress bars, a
  JSON-lines log, sample grids and checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..model import AutoregressiveModel
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .distributed import DistInfo, all_gather_objects, all_reduce_sum
from .ema import EMA
from .images import save_image_grid
from .metrics import MetricsLog

__all__ = [
    "ExponentialDecay",
    "LikelihoodLoss",
    "RandomBatches",
    "TrainConfig",
    "Trainer",
    "autocast_context",
    "evaluate_bpd",
    "full_float32",
    "train_step",
]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _check_images(images: object, name: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def _check_labels(labels: object, n: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    return labels


class ExponentialDecay:
    """Learning-rate factor for ``torch.optim.lr_scheduler.LambdaLR``.

    ``factor(step) = decay ** (step + 1) * min(1, (step + 1) / warmup_steps)``. The ``+ 1``
    follows openai/pixel-cnn, which multiplies the rate by ``decay`` before every update, the
    first one included. A callable object (not a lambda) so that ``LambdaLR.state_dict()``
    stores its settings.

    Args:
        decay: Factor per step in ``(0, 1]`` (PixelCNN++: 0.999995).
        warmup_steps: Linear warm-up length in steps (0: none).

    Raises:
        ValueError: ``decay`` outside ``(0, 1]`` or negative ``warmup_steps``.
        TypeError: ``warmup_steps`` is not an int.
    """

    def __init__(self, decay: float = 0.999995, warmup_steps: int = 0) -> None:
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        check_int(warmup_steps, "warmup_steps", 0)
        self.decay = float(decay)
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        factor = self.decay ** (step + 1)
        if self.warmup_steps:
            factor *= min(1.0, (step + 1) / self.warmup_steps)
        return factor


class RandomBatches:
    """An endless stream of random index batches, one permutation per epoch, sharded by rank.

    Epoch ``e`` uses ``randperm(num_items)`` from a generator seeded with ``(seed, e)``, so the
    whole order is a function of ``(seed, epoch, index)`` and the state to resume is two ints.
    Each step takes the next ``batch_size * world_size`` indices of the permutation (the global
    batch) and rank ``r`` keeps slice ``r``: the union over ranks is exactly the batch a single
    process with ``batch_size * world_size`` would draw. The last incomplete global batch of
    an epoch is dropped, as in openai/pixel-cnn.

    Args:
        num_items: Size of the training set ``N``.
        batch_size: Items per rank per step.
        seed: Seed of the per-epoch permutations.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        TypeError: A count is not an int.
        ValueError: ``batch_size * world_size > num_items`` or arguments out of range.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        for name, value, low in (
            ("num_items", num_items, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            check_int(value, name, low)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size * world_size ({batch_size} * {world_size}) must be <= num_items "
                f"({num_items})"
            )
        self.epoch = 0
        self.index = 0  # step within the epoch
        self._perm: Tensor | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> Tensor:
        """The permutation (int64 ``(N,)``, CPU) that epoch ``epoch`` walks through."""
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def next(self) -> Tensor:
        """Indices of this rank's next batch, int64 ``(batch_size,)`` on CPU."""
        start = self.index * self.global_batch + self.rank * self.batch_size
        idx = self.permutation(self.epoch)[start : start + self.batch_size]
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "index", "seed", "global_batch"}``."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where ``state`` left off.

        With a different global batch (another ``world_size`` or ``batch_size``) the position
        is converted through the number of items consumed in the epoch; the order is then no
        longer that of the original run.
        """
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        index = int(state["index"])
        if int(state["global_batch"]) != self.global_batch:
            index = index * int(state["global_batch"]) // self.global_batch
            if index >= self.steps_per_epoch:
                self.epoch, index = self.epoch + 1, 0
        self.index = index


class LikelihoodLoss(nn.Module):
    """Per-image bits/dim of integer images: the module that DDP wraps and compile compiles.

    The backbone and the head's projection run under whatever autocast the caller opened;
    the distribution and its log-likelihood run with autocast disabled, on float32 parameters.
    The image is not range-checked here (that would synchronise with the GPU every step):
    uint8 data with ``bins=256`` cannot be out of range; other data should be checked once.

    Args:
        model: The [`AutoregressiveModel`][discretelik.AutoregressiveModel].

    Shapes:
        ``forward(x, cond)``: ``x`` integer ``(B, C, H, W)``, ``cond`` as for the model ->
        float32 ``(B,)`` bits per sub-pixel.
    """

    def __init__(self, model: AutoregressiveModel) -> None:
        super().__init__()
        if not isinstance(model, AutoregressiveModel):
            raise TypeError(f"model must be an AutoregressiveModel, got {type(model).__name__}")
        self.model = model

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        model = self.model
        params = model.head.params(model.backbone(model.scale(x), cond))
        with torch.autocast(device_type=x.device.type, enabled=False):
            # validate_args=False: the checks would synchronise (and break compiled graphs).
            dist = model.head.distribution(params.float(), validate_args=False)
            log_prob = dist.log_prob(x)
        # Same as discretelik.bits_per_dim, written with numel() because its generator
        # expression over the shape breaks torch.compile's graph.
        return log_prob / (-math.log(2.0) * x[0].numel())


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    cond: Any = None,
    *,
    scheduler: Any = None,
    ema: EMA | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> Tensor:
    """One optimisation step on one batch; returns the batch's mean bits/dim (not synced).

    Args:
        loss_fn: Maps ``(x, cond)`` to per-image losses ``(B,)``, e.g. a
            [`LikelihoodLoss`][discretelik.train.LikelihoodLoss], possibly DDP-wrapped or
            compiled.
        optimizer: Optimiser over the model's parameters.
        x: Integer images ``(B, C, H, W)`` on the model's device.
        cond: Conditioning (e.g. labels int64 ``(B,)``) or ``None``.
        scheduler: Learning-rate scheduler stepped once after the update, or ``None``.
        ema: [`EMA`][discretelik.train.EMA] updated after the optimiser step, or ``None``.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision; ``None`` for full precision.
        grad_clip: Maximum global gradient norm, or ``None`` for no clipping.

    Returns:
        Detached float32 scalar, the mean loss of this process's batch (reading it with
        ``.item()`` synchronises; do that only when logging).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(x.device, autocast_dtype):
        loss = loss_fn(x, cond).mean()
    loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update()
    return loss.detach()


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Disable TF32 for CUDA matmuls and convolutions inside the context (true float32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def evaluate_bpd(
    model: AutoregressiveModel,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
) -> float:
    """Mean bits/dim of ``model`` over every image of a split, in float32, without grad.

    The model is put in eval mode (dropout off) and restored afterwards; autocast and TF32 are
    off. Under DDP each rank evaluates a contiguous shard and the sums are all-reduced, so
    every rank returns the same value over the whole split.

    Args:
        model: The model to evaluate (for Polyak-averaged weights, call inside
            ``EMA.average_parameters()``).
        images: uint8 ``(N, C, H, W)``, on any device.
        labels: int64 ``(N,)`` class labels for a class-conditional model, else ``None``.
        batch_size: Images per forward pass.
        device: Where to run (default: the model's device).
        dist: This process's [`DistInfo`][discretelik.train.DistInfo] (default single process).

    Returns:
        The mean over all ``N`` images of each image's bits per sub-pixel (equal to the
        total negative log2-likelihood divided by ``N * C * H * W``).
    """
    _check_images(images, "images")
    n = images.shape[0]
    if labels is not None:
        _check_labels(labels, n, "labels")
    check_int(batch_size, "batch_size", 1)
    dist = dist or DistInfo()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = math.ceil(n / dist.world_size)
    lo, hi = min(n, dist.rank * shard), min(n, (dist.rank + 1) * shard)
    # float64 accumulators: 10,000 float32 partial sums would lose digits we report.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with full_float32():
            for start in range(lo, hi, batch_size):
                x = images[start : min(hi, start + batch_size)].to(device, non_blocking=True)
                cond = None if labels is None else labels[start : start + x.shape[0]].to(device)
                bpd = model.bits_per_dim(x, cond)
                total[0] += bpd.double().sum()
                total[1] += bpd.shape[0]
    finally:
        model.train(was_training)
    all_reduce_sum(total)
    return float(total[0] / total[1])


@dataclass
class TrainConfig:
    """Optimisation settings of a [`Trainer`][discretelik.train.Trainer].

    Defaults are openai/pixel-cnn's CIFAR-10 settings except the batch size, which there is
    16 per GPU on 8 GPUs (a global batch of 128); here ``batch_size`` is per process.
    """

    # Images per process per step; the global batch is batch_size * world_size.
    batch_size: int = 16
    # Adam learning rate (before decay and warm-up).
    lr: float = 1e-3
    # Multiplied into the learning rate every step (openai: 0.999995).
    lr_decay: float = 0.999995
    # Linear warm-up steps; openai has none (data-dependent init keeps early steps stable).
    warmup_steps: int = 0
    # Adam betas (openai: 0.95, 0.9995).
    beta1: float = 0.95
    beta2: float = 0.9995
    # Polyak averaging decay used for evaluation and sampling (openai: 0.9995).
    ema_decay: float = 0.9995
    # Ramp the EMA decay up as (1 + n) / (10 + n): for short runs, see EMA.
    ema_warmup: bool = False
    # Global gradient-norm clip; None (openai) for none.
    grad_clip: float | None = None
    # "fp32" or "bf16" (autocast; the likelihood stays float32).
    precision: str = "fp32"
    # Keep the model and the batches in channels_last memory format.
    channels_last: bool = False
    # torch.compile the training forward (after DDP wrapping, so DDP's optimiser splits graphs
    # at bucket boundaries).
    compile: bool = False
    # Condition on class labels (the model must be built with num_classes).
    conditional: bool = False
    # Seed of the batch order (the dropout RNG is seeded by the caller, see Trainer).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.warmup_steps, "warmup_steps", 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")


class Trainer:
    """Trains an [`AutoregressiveModel`][discretelik.AutoregressiveModel] on a uint8 image set.

    Builds the PixelCNN++ optimisation around the model: Adam with ``(beta1, beta2)``, a
    ``LambdaLR`` with [`ExponentialDecay`][discretelik.train.ExponentialDecay], Polyak
    averaging ([`EMA`][discretelik.train.EMA]), batches from
    [`RandomBatches`][discretelik.train.RandomBatches], optional DDP (when ``dist`` has more
    than one process), bf16 autocast, channels_last and ``torch.compile``.

    Run any model initialisation (e.g. [`data_dependent_init`][discretelik.nn.data_dependent_init])
    *before* constructing the trainer: the optimiser and the EMA take the parameters as they
    are. The global RNG drives dropout; seed it (per rank) before training. Checkpoints hold
    everything needed to continue exactly: model, EMA, optimiser, scheduler, batch position,
    every rank's RNG state, the step and the wall time.

    Args:
        model: The model, on any device (moved to ``dist.device``).
        images: Training images uint8 ``(N, C, H, W)``; copied to the device once.
        labels: int64 ``(N,)`` labels, required when ``config.conditional``.
        config: A [`TrainConfig`][discretelik.train.TrainConfig].
        dist: This process's [`DistInfo`][discretelik.train.DistInfo]; default single CPU
            process.

    Raises:
        TypeError: ``model``/``config`` of the wrong type, or ``images``/``labels`` of the
            wrong dtype (uint8 / int64 expected).
        ValueError: Wrong shapes, channels that do not match the model, missing labels for a
            conditional config, or fewer images than one global batch.

    Example:
        >>> model = build("pixelcnn++", "dlm", preset="tiny")  # doctest: +SKIP
        >>> trainer = Trainer(model, images, config=TrainConfig(batch_size=8))  # doctest: +SKIP
        >>> trainer.fit(100, test_images=test_images, checkpoint_path="run/ckpt.pt")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: AutoregressiveModel,
        images: Tensor,
        labels: Tensor | None = None,
        config: TrainConfig | None = None,
        dist: DistInfo | None = None,
    ) -> None:
        config = config if config is not None else TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, AutoregressiveModel):
            raise TypeError(f"model must be an AutoregressiveModel, got {type(model).__name__}")
        _check_images(images, "images")
        if images.shape[1] != model.channels:
            raise ValueError(
                f"images must have {model.channels} channels for this model, got shape "
                f"{tuple(images.shape)}"
            )
        if config.conditional:
            if labels is None:
                raise ValueError("labels must be given when config.conditional is true")
            _check_labels(labels, images.shape[0], "labels")
        self.config = config
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.images = images.to(self.device)
        self.labels = labels.to(self.device) if config.conditional and labels is not None else None
        self.autocast_dtype = _PRECISIONS[config.precision]

        self.loss_module = LikelihoodLoss(model)
        train_module: nn.Module = self.loss_module
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's parameters here, so every rank starts identical.
            train_module = DistributedDataParallel(self.loss_module, device_ids=device_ids)
        if config.compile:
            train_module = torch.compile(train_module)
        self.train_module = train_module

        fused = self.device.type == "cuda"  # one kernel for the whole Adam update on GPU
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), fused=fused
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, ExponentialDecay(config.lr_decay, config.warmup_steps)
        )
        self.ema = EMA(model, config.ema_decay, warmup=config.ema_warmup)
        self.batches = RandomBatches(
            images.shape[0],
            config.batch_size,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.step = 0
        self.elapsed = 0.0  # wall seconds of earlier sessions (restored from checkpoints)
        self._session_start = time.perf_counter()

    # -- steps -------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Images per step over all processes."""
        return self.batches.global_batch

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def wall_time(self) -> float:
        """Wall seconds since the run started, across resumed sessions."""
        return self.elapsed + time.perf_counter() - self._session_start

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's next ``(images, labels-or-None)``, on the device."""
        idx = self.batches.next().to(self.device, non_blocking=True)
        x = self.images[idx].contiguous(memory_format=self.memory_format)
        return x, (self.labels[idx] if self.labels is not None else None)

    def train_step(self) -> Tensor:
        """Run one step on the next batch; returns this rank's mean bits/dim (not synced)."""
        x, cond = self.next_batch()
        self.model.train()
        loss = train_step(
            self.train_module,
            self.optimizer,
            x,
            cond,
            scheduler=self.scheduler,
            ema=self.ema,
            autocast_dtype=self.autocast_dtype,
            grad_clip=self.config.grad_clip,
        )
        self.step += 1
        return loss

    # -- evaluation and samples --------------------------------------------------------------
    def evaluate(
        self, images: Tensor, labels: Tensor | None = None, batch_size: int = 250, use_ema: bool = True
    ) -> float:
        """Test bits/dim over all of ``images`` in float32, with the Polyak-averaged weights.

        Args:
            images: uint8 ``(N, C, H, W)``.
            labels: int64 ``(N,)``; used only when the trainer is conditional.
            batch_size: Images per forward pass.
            use_ema: Evaluate the averaged weights (default) or the raw training weights.

        Returns:
            Mean bits per sub-pixel over the whole split (identical on every rank).
        """
        cond = labels if self.config.conditional else None
        ctx = self.ema.average_parameters() if use_ema else contextlib.nullcontext()
        with ctx:
            return evaluate_bpd(
                self.model, images, cond, batch_size=batch_size, device=self.device, dist=self.dist
            )

    def sample(self, n: int, seed: int = 0, use_ema: bool = True) -> Tensor:
        """Draw ``n`` images with the averaged weights, without touching the training RNG.

        Args:
            n: Number of images; class-conditional models get labels ``arange(n) % classes``.
            seed: Seed of the sampling generator (same seed, same images).
            use_ema: Sample from the averaged weights (default) or the raw ones.

        Returns:
            int64 ``(n, C, H, W)`` levels on the device.
        """
        shape = tuple(self.images.shape[1:])
        cond = None
        if self.config.conditional:
            classes = self.model.backbone.num_classes or 1
            cond = torch.arange(n, device=self.device) % classes
        devices = [self.device] if self.device.type == "cuda" else []
        gen = torch.Generator(device=self.device).manual_seed(seed)
        ctx = self.ema.average_parameters() if use_ema else contextlib.nullcontext()
        # fork_rng: whatever the head draws from, the dropout stream of training is unchanged,
        # so sampling mid-run does not change the losses of later steps.
        with torch.random.fork_rng(devices=devices), ctx:
            return self.model.sample(n, shape, cond=cond, generator=gen)

    def save_samples(self, path: str | Path, n: int = 16, seed: int = 0) -> Path:
        """Sample ``n`` images (EMA weights) and write them as a PNG grid; returns the path."""
        return save_image_grid(path, self.sample(n, seed=seed))

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective under DDP: call on every rank)."""
        rng = all_gather_objects(capture_rng_state(self.device))
        return {
            "format": "discretelik.train/1",
            "step": self.step,
            "elapsed": self.wall_time(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng,
            "world_size": self.dist.world_size,
            "train_config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][discretelik.train.Trainer.state_dict] output.

        Raises:
            ValueError: ``state`` is not a trainer checkpoint, or does not fit the model.
        """
        missing = {"step", "model", "ema", "optimizer", "scheduler", "batches", "rng"} - set(state)
        if missing:
            raise ValueError(f"state is not a Trainer checkpoint: missing {sorted(missing)}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # missing/unexpected keys or shapes: another model config
            raise ValueError(
                f"checkpoint does not fit this model (built with other settings?): {exc}"
            ) from exc
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self._session_start = time.perf_counter()
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank], self.device)
        else:
            # Another number of processes: the old per-rank streams cannot be mapped onto the
            # new ranks, so continue with fresh, distinct streams (no longer bit-exact).
            warnings.warn(
                f"checkpoint was written by {len(rng)} process(es), this run has "
                f"{self.dist.world_size}: dropout RNG reseeded, resume is not bit-exact",
                stacklevel=2,
            )
            torch.manual_seed(self.config.seed + 7919 * self.dist.rank + self.step)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint atomically (rank 0 writes; every rank must call it under DDP).

        Args:
            path: Destination file.
            extra: More plain entries to store (e.g. how to rebuild the model).
        """
        state = self.state_dict()
        if extra:
            state.update(extra)
        if self.dist.is_main:
            save_checkpoint(state, path)
        return Path(path)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint file into this trainer; returns the whole checkpoint mapping."""
        state = load_checkpoint(path, map_location="cpu")
        self.load_state_dict(state)
        return state

    # -- the loop ----------------------------------------------------------------------------
    def fit(
        self,
        steps: int,
        *,
        test_images: Tensor | None = None,
        test_labels: Tensor | None = None,
        eval_every: int = 0,
        eval_batch_size: int = 250,
        log_every: int = 100,
        metrics: MetricsLog | None = None,
        checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 0,
        checkpoint_extra: Mapping[str, Any] | None = None,
        sample_dir: str | Path | None = None,
        sample_every: int = 0,
        num_samples: int = 16,
        progress: bool = True,
        log_fn: Callable[[str], None] = print,
    ) -> list[dict[str, Any]]:
        """Train until ``self.step == steps``, logging, evaluating, sampling and checkpointing.

        At every multiple of ``log_every`` (and the last step) one record is written:
        ``step``, ``train_bpd`` (mean over the steps since the last record and over ranks),
        ``lr``, ``images_per_s`` (training only, all ranks), ``wall_s``, plus ``test_bpd`` at
        multiples of ``eval_every`` and the last step when ``test_images`` is given. Sample
        grids ``samples_step{N}.png`` go to ``sample_dir`` at multiples of ``sample_every``.
        The checkpoint at ``checkpoint_path`` is rewritten at multiples of ``checkpoint_every``
        and at the last step, after that step's evaluation and samples.

        Args:
            steps: Total step count to reach (a resumed trainer continues from ``self.step``).
            test_images: uint8 ``(N, C, H, W)`` for evaluation, or ``None``.
            test_labels: int64 ``(N,)`` for a conditional model.
            eval_every: Evaluation period in steps (0: only at the end).
            eval_batch_size: Images per evaluation forward pass.
            log_every: Record period in steps.
            metrics: Where records go (rank 0), or ``None``.
            checkpoint_path: Checkpoint file, or ``None`` for no checkpoints.
            checkpoint_every: Checkpoint period in steps (0: only at the end).
            checkpoint_extra: Plain entries stored in every checkpoint.
            sample_dir: Directory for sample grids, or ``None``.
            sample_every: Sample period in steps (0: only at the end).
            num_samples: Images per grid.
            progress: Show a tqdm progress bar on rank 0 (if tqdm is installed).
            log_fn: Where one-line summaries go (rank 0) when there is no progress bar.

        Returns:
            The records written during this call.
        """
        check_int(steps, "steps", 0)
        check_int(log_every, "log_every", 1)
        for name, period in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                             ("sample_every", sample_every)):
            check_int(period, name, 0)
        main = self.dist.is_main
        bar = None
        if progress and main and self.step < steps:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional dependency (extra "train")
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=steps, initial=self.step, unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else log_fn

        def due(period: int) -> bool:
            return self.step == steps or (period > 0 and self.step % period == 0)

        records: list[dict[str, Any]] = []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        window_steps = 0
        window_seconds = 0.0  # training time of the window's steps (evaluation etc. left out)
        window_start = time.perf_counter()
        try:
            while self.step < steps:
                lr = self.lr
                loss_sum += self.train_step()
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                if not (
                    due(log_every)
                    or (checkpoint_path and due(checkpoint_every))
                    or (test_images is not None and due(eval_every))
                    or (sample_dir is not None and due(sample_every) and main)
                ):
                    continue
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                window_seconds += time.perf_counter() - window_start
                record: dict[str, Any] = {"step": self.step}
                if due(log_every):
                    totals = torch.stack([loss_sum, loss_sum.new_tensor(window_steps)])
                    all_reduce_sum(totals)  # sum over ranks of (sum of step means, steps)
                    record.update(
                        train_bpd=float(totals[0] / totals[1]),
                        lr=lr,
                        images_per_s=window_steps * self.global_batch / max(window_seconds, 1e-9),
                    )
                    loss_sum.zero_()
                    window_steps = 0
                    window_seconds = 0.0
                if test_images is not None and due(eval_every):
                    record["test_bpd"] = self.evaluate(
                        test_images, test_labels, batch_size=eval_batch_size
                    )
                if sample_dir is not None and due(sample_every) and main:
                    path = self.save_samples(
                        Path(sample_dir) / f"samples_step{self.step}.png", n=num_samples
                    )
                    record["samples"] = str(path)
                if len(record) > 1:
                    record["wall_s"] = self.wall_time()
                    if metrics is not None:
                        record = metrics.write(**record)
                    records.append(record)
                    if bar is not None and "train_bpd" in record:
                        bar.set_postfix(bpd=f"{record['train_bpd']:.4f}", lr=f"{lr:.2e}")
                    if main and ("test_bpd" in record or bar is None):  # one copy, not N
                        say(_summary(record))
                if checkpoint_path is not None and due(checkpoint_every):
                    self.save(checkpoint_path, extra=checkpoint_extra)
                window_start = time.perf_counter()  # evaluation etc. is not training time
        finally:
            if bar is not None:
                bar.close()
        return records


def _summary(record: Mapping[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (("train_bpd", "train {:.4f} bits/dim"), ("test_bpd", "test {:.4f} bits/dim"),
                     ("images_per_s", "{:.1f} images/s"), ("lr", "lr {:.3g}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return ", ".join(parts)
