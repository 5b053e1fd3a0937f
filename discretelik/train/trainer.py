"""The trainer: PixelCNN++ optimisation, logging, evaluation, samples and exact resume.

[`Trainer`][discretelik.train.Trainer] ties the other training pieces together with the
PixelCNN++ optimiser (Adam, per-step exponential learning-rate decay), Polyak averaging,
progress bars, a JSON-lines log, sample grids and checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..model import AutoregressiveModel
from ._inputs import check_images_for_model, check_labels
from ._io import remove_stale_temp_files
from .batches import RandomBatches
from .checkpoint import (
    capture_rng_state,
    check_finite_tensors,
    checkpoint_step,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_dict_mismatch,
)
from .compiling import compile_regions
from .config import TrainConfig
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from .ema import EMA
from .evaluation import evaluate_bpd
from .images import save_image_grid
from .metrics import MetricsLog
from .precision import AUTOCAST_DTYPES
from .schedule import ExponentialDecay, WarmupCosine
from .step import LikelihoodLoss, train_step

__all__ = ["FAST_EVAL_TOLERANCE", "Trainer"]

# Largest |fast - float32| test bits/dim for which the fast evaluation pass is trusted.
FAST_EVAL_TOLERANCE = 1e-3


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
    every rank's RNG state, the step, the wall time, the running loss window of the metrics
    and the model's ``build_spec`` (as ``model_spec``, for
    [`AutoregressiveModel.from_checkpoint`][discretelik.AutoregressiveModel.from_checkpoint]).

    A non-finite loss stops [`fit`][discretelik.train.Trainer.fit] with a
    ``FloatingPointError`` naming the step and the last good checkpoint, and no checkpoint is
    ever written from non-finite weights.

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
        ValueError: Wrong shapes, channels that do not match the model, levels outside
            ``[0, model.bins - 1]``, missing labels for a conditional config, or fewer images
            than one global batch.

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
        # Levels once here, not per step (that would synchronise a GPU): the loss does not check.
        check_images_for_model(images, model, "images")
        if config.conditional:
            if labels is None:
                raise ValueError("labels must be given when config.conditional is true")
            check_labels(labels, images.shape[0], "labels")
        self.config = config
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        model.to(self.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        _canonical_parameter_strides(model)
        self.model = model
        self.images = images.to(self.device)
        self.labels = labels.to(self.device) if config.conditional and labels is not None else None
        self.autocast_dtype = AUTOCAST_DTYPES[config.precision]

        self.loss_module = LikelihoodLoss(model)
        train_module: nn.Module = self.loss_module
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's parameters here, so every rank starts identical.
            train_module = DistributedDataParallel(self.loss_module, device_ids=device_ids)
        if config.compile_mode == "full":
            train_module = torch.compile(train_module)
        elif config.compile_mode == "regional":
            compile_regions(model)  # in place: training and evaluation run the compiled blocks
        self.train_module = train_module

        # The fused Adam update (one kernel on a GPU, one vectorised loop on CPU). On CPU it
        # took 34 ms per step for the paper model's 566 tensors, PyTorch's default for-loop
        # 107 ms and the multi-tensor (foreach) one 203 ms (torch 2.13, one thread).
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
            fused=True if self.device.type in ("cuda", "cpu") else None,
        )
        schedule: Callable[[int], float]
        if config.lr_schedule == "cosine":
            schedule = WarmupCosine(config.decay_steps, config.warmup_steps, config.final_lr_fraction)
        else:
            schedule = ExponentialDecay(config.lr_decay, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
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
        # The metrics window since the last record: sum of the step losses (float64, on the
        # device, so nothing synchronises between records), its steps and training seconds.
        # Checkpointed, so that the first record after a resume averages the same steps.
        self._window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._window_steps = 0
        self._window_seconds = 0.0
        # This session's step losses of the window, to name the first non-finite one.
        self._window_losses: list[Tensor] = []
        # On CPU reading the loss costs nothing, so a divergence stops at its step; on a GPU
        # it is read where the loop synchronises anyway (records, evaluation, checkpoints).
        # Under DDP the check is collective, so it waits for the records too.
        self._check_every_step = self.device.type == "cpu" and not self.dist.distributed
        self.last_checkpoint: str | None = None  # "path (step N)" of the last good one
        # The fast evaluation pass (config.eval_precision) is checked against float32 once per
        # session, at the first evaluation; None until then, then whether it agreed.
        self.fast_eval_agrees: bool | None = None
        # Whether the last fit() stopped because its time budget was spent.
        self.stopped_by_budget = False

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
        idx = self.batches.next(self.device)  # a slice of the epoch's permutation there
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
        self,
        images: Tensor,
        labels: Tensor | None = None,
        batch_size: int = 250,
        use_ema: bool = True,
        precision: str = "fp32",
    ) -> float:
        """Test bits/dim over all of ``images``, with the Polyak-averaged weights.

        Args:
            images: uint8 ``(N, C, H, W)``.
            labels: int64 ``(N,)``; used only when the trainer is conditional.
            batch_size: Images per forward pass.
            use_ema: Evaluate the averaged weights (default) or the raw training weights.
            precision: ``"fp32"`` (true float32, the figure to report), ``"bf16"`` or
                ``"tf32"`` (fast passes, see [`evaluate_bpd`][discretelik.train.evaluate_bpd]).

        Returns:
            Mean bits per sub-pixel over the whole split (identical on every rank).
        """
        cond = labels if self.config.conditional else None
        ctx = self.ema.average_parameters() if use_ema else contextlib.nullcontext()
        with ctx:
            return evaluate_bpd(
                self.model, images, cond, batch_size=batch_size, device=self.device,
                dist=self.dist, precision=precision,
            )

    def _timed_evaluate(self, images: Tensor, labels: Tensor | None, batch_size: int,
                        precision: str) -> tuple[float, float]:
        """``(bits/dim, seconds)`` of one evaluation pass (finished on the device)."""
        start = time.perf_counter()
        bpd = self.evaluate(images, labels, batch_size=batch_size, precision=precision)
        # evaluate_bpd returns a Python float, so the device has finished by now.
        return bpd, time.perf_counter() - start

    def _test_record(
        self, images: Tensor, labels: Tensor | None, batch_size: int, final: bool,
        say: Callable[[str], None],
    ) -> dict[str, Any]:
        """The test entries of a record: float32, or the fast pass once it has been checked.

        ``test_bpd`` is always the figure of the pass named by ``test_precision``. The first
        evaluation with a fast ``eval_precision`` runs both passes and records
        ``test_bpd_fast``, ``test_bpd_fast_diff`` (fast minus float32) and both times; a
        difference above 1e-3 bits/dim is warned about and the fast pass is not used again.
        """
        fast = self.config.eval_precision
        if fast == "fp32" or self.fast_eval_agrees is False or (final and self.fast_eval_agrees):
            bpd, seconds = self._timed_evaluate(images, labels, batch_size, "fp32")
            return {"test_bpd": bpd, "test_precision": "fp32", "test_s": seconds}
        if self.fast_eval_agrees:
            bpd, seconds = self._timed_evaluate(images, labels, batch_size, fast)
            return {"test_bpd": bpd, "test_precision": fast, "test_s": seconds}
        bpd, seconds = self._timed_evaluate(images, labels, batch_size, "fp32")
        quick, quick_seconds = self._timed_evaluate(images, labels, batch_size, fast)
        diff = quick - bpd
        self.fast_eval_agrees = abs(diff) <= FAST_EVAL_TOLERANCE
        if not self.fast_eval_agrees:
            message = (
                f"the {fast} evaluation gives {quick:.5f} bits/dim, float32 {bpd:.5f}: they differ "
                f"by {diff:+.2e} > {FAST_EVAL_TOLERANCE:g}; every later evaluation runs in float32"
            )
            warnings.warn(message, stacklevel=3)
            if self.dist.is_main:
                say(f"WARNING: {message}")
        return {
            "test_bpd": bpd, "test_precision": "fp32", "test_s": seconds,
            "test_bpd_fast": quick, "test_bpd_fast_diff": diff, "test_fast_s": quick_seconds,
        }

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
        window = all_gather_objects(
            {
                "loss_sum": float(self._window_loss),  # a Python float is the exact float64
                "steps": self._window_steps,
                "seconds": self._window_seconds,
            }
        )
        state = {
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
            "window": window,
        }
        if self.model.build_spec is not None:
            state["model_spec"] = self.model.build_spec
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore [`state_dict`][discretelik.train.Trainer.state_dict] output.

        Raises:
            ValueError: ``state`` is not a trainer checkpoint, does not fit the model, or holds
                non-finite weights (a diverged run).
        """
        missing = {"step", "model", "ema", "optimizer", "scheduler", "batches", "rng"} - set(state)
        if missing:
            raise ValueError(f"state is not a Trainer checkpoint: missing {sorted(missing)}")
        step = checkpoint_step(state)
        if not isinstance(state["model"], Mapping) or not isinstance(state["ema"], Mapping):
            raise ValueError("state is not a Trainer checkpoint: 'model'/'ema' are not mappings")
        if not isinstance(state["ema"].get("shadow"), Mapping):
            raise ValueError("state is not a Trainer checkpoint: no named EMA weights")
        check_finite_tensors(state["model"].items(), "cannot resume: the model weights")
        check_finite_tensors(state["ema"]["shadow"].items(), "cannot resume: the EMA weights")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # missing/unexpected keys or shapes: another model config
            raise ValueError(
                "checkpoint does not fit this model (built with other settings?): "
                f"{state_dict_mismatch(exc)}"
            ) from exc
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        self.step = step
        self.elapsed = float(state.get("elapsed", 0.0))
        self._session_start = time.perf_counter()
        self._window_losses = []
        window = state.get("window")
        mine = window[self.dist.rank] if isinstance(window, list) and len(window) == self.dist.world_size else None
        if mine is None:  # older checkpoint, or another number of processes: a fresh window
            mine = {"loss_sum": 0.0, "steps": 0, "seconds": 0.0}
        self._window_loss = torch.tensor(float(mine["loss_sum"]), dtype=torch.float64, device=self.device)
        self._window_steps = int(mine["steps"])
        self._window_seconds = float(mine["seconds"])
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

        Under DDP every rank returns only once rank 0's file is complete on disk, so any rank
        may read it (or exit, or resume from it) right after this call.

        Args:
            path: Destination file.
            extra: More plain entries to store (e.g. the run's settings).

        Returns:
            ``path`` as a ``Path``.

        Raises:
            FloatingPointError: The model or its average holds NaN/infinity (nothing written;
                every rank raises, the weights being the same on all).
        """
        try:
            check_finite_tensors(self.model.named_parameters(), "model weights")
            check_finite_tensors(zip(self.ema._names, self.ema.shadow), "EMA weights")
        except ValueError as exc:
            raise FloatingPointError(
                f"training diverged: {exc} after step {self.step}; {path} not written; "
                f"last good checkpoint: {self.last_checkpoint or 'none'}"
            ) from None
        state = self.state_dict()
        if extra:
            state.update(extra)
        if self.dist.is_main:
            save_checkpoint(state, path)
        # The other ranks would otherwise run ahead while rank 0 is still writing: an exit or a
        # resume right after save() could then miss the file (no-op in a single process).
        barrier()
        self.last_checkpoint = f"{path} (step {self.step})"
        return Path(path)

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint file into this trainer; returns the whole checkpoint mapping.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: The file is corrupted, not a trainer checkpoint, does not fit the model
                or holds non-finite weights; the message names the file.
        """
        state = load_checkpoint(path, map_location="cpu")
        try:
            self.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        self.last_checkpoint = f"{path} (step {self.step})"
        return state

    def _check_losses(self) -> None:
        """Raise ``FloatingPointError`` if a step loss of the window is NaN or infinite."""
        if not self._window_losses:
            return
        losses = torch.stack(self._window_losses)
        bad = (~torch.isfinite(losses)).double()
        # Summed over ranks: every rank stops at the same step (a lone rank raising would
        # leave the others waiting in a collective).
        all_reduce_sum(bad)
        if not bool(bad.any()):
            return
        first = int(bad.nonzero()[0, 0])
        step = self.step - len(self._window_losses) + first + 1
        raise FloatingPointError(
            f"training diverged: the loss is {float(losses[first])} at step {step} (try a "
            f"lower learning rate or gradient clipping); last good checkpoint: "
            f"{self.last_checkpoint or 'none'}"
        )

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
        time_budget: float | None = None,
        start_time: float | None = None,
    ) -> list[dict[str, Any]]:
        """Train until ``self.step == steps``, logging, evaluating, sampling and checkpointing.

        At every multiple of ``log_every`` (and the last step) one record is written:
        ``step``, ``train_bpd`` (mean over the steps since the last record and over ranks),
        ``lr``, ``images_per_s`` (training only, all ranks), ``wall_s``, plus ``test_bpd`` at
        multiples of ``eval_every`` and the last step when ``test_images`` is given. Sample
        grids ``samples_step{N}.png`` go to ``sample_dir`` at multiples of ``sample_every``.
        The checkpoint at ``checkpoint_path`` is rewritten at multiples of ``checkpoint_every``
        and at the last step, after that step's evaluation and samples.

        With ``time_budget``, training stops at the first step boundary at which that many
        seconds have passed since ``start_time``; that step is then treated as the last one
        (evaluated, sampled, checkpointed, recorded with ``time_budget_s``), and
        ``stopped_by_budget`` is set. The check reads the host clock only (no device
        synchronisation); under DDP it is made at record steps, collectively. The first record
        of the call carries ``first_step_s``: seconds from ``start_time`` to the end of the
        first step (the device synchronised once for it), compilation included.

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
            time_budget: Seconds of wall time after ``start_time`` at which training stops
                (``None``: no budget). Evaluation, samples and the checkpoint of the last
                step come after it.
            start_time: A ``time.perf_counter()`` value before this trainer was constructed,
                e.g. taken at launch, from which the budget, ``first_step_s`` and this
                session's part of ``wall_s`` count (default: when the trainer was constructed).

        Before the first step: the test images are checked (dtype, shape, channels, levels
        within ``[0, model.bins - 1]``, at least one image), and stale temporary files of an
        interrupted checkpoint write (``.<name>.*.tmp`` next to ``checkpoint_path``) are
        removed. A NaN or infinite loss stops the run with a ``FloatingPointError`` (on CPU at
        its step, on a GPU or under DDP at the next record, evaluation or checkpoint) that
        names the step and the last good checkpoint; nothing is logged, evaluated, sampled or
        saved from a diverged model.

        Returns:
            The records written during this call.

        Raises:
            FloatingPointError: The loss or the weights became non-finite.
            ValueError: Invalid periods or test data.
        """
        check_int(steps, "steps", 0)
        check_int(log_every, "log_every", 1)
        if time_budget is not None and (isinstance(time_budget, bool) or not time_budget > 0):
            raise ValueError(f"time_budget must be a number of seconds > 0 or None, got {time_budget!r}")
        if start_time is not None:  # wall_s (and the budget) count from then, e.g. launch
            self._session_start = min(self._session_start, float(start_time))
        start = self._session_start
        deadline = None if time_budget is None else start + float(time_budget)
        self.stopped_by_budget = False
        first_step_s: float | None = None
        for name, period in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                             ("sample_every", sample_every)):
            check_int(period, name, 0)
        if test_images is not None:
            self._check_test_data(test_images, test_labels)
        main = self.dist.is_main
        if checkpoint_path is not None and main:
            remove_stale_temp_files(checkpoint_path)
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
        window_start = time.perf_counter()
        try:
            while self.step < steps:
                lr = self.lr
                loss = self.train_step()
                if first_step_s is None:
                    if self.device.type == "cuda":  # once: the step has really finished
                        torch.cuda.synchronize(self.device)
                    first_step_s = time.perf_counter() - start
                self._window_loss += loss
                self._window_steps += 1
                self._window_losses.append(loss)
                if self._check_every_step:
                    self._check_losses()
                if bar is not None:
                    bar.update(1)
                if deadline is not None and self._budget_spent(deadline, log_every):
                    # This step becomes the last: evaluate, sample, checkpoint and record it.
                    steps = self.step
                    self.stopped_by_budget = True
                # The same decision on every rank (samples are rank 0's, but the divergence
                # check below is collective under DDP).
                if not (
                    due(log_every)
                    or (checkpoint_path and due(checkpoint_every))
                    or (test_images is not None and due(eval_every))
                    or (sample_dir is not None and due(sample_every))
                ):
                    continue
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self._window_seconds += time.perf_counter() - window_start
                # Before anything is logged, evaluated, sampled or saved from these weights.
                self._check_losses()
                self._window_losses = []
                record: dict[str, Any] = {"step": self.step}
                if due(log_every):
                    totals = torch.stack(
                        [self._window_loss, self._window_loss.new_tensor(self._window_steps)]
                    )
                    all_reduce_sum(totals)  # sum over ranks of (sum of step means, steps)
                    record.update(
                        train_bpd=float(totals[0] / totals[1]),
                        lr=lr,
                        images_per_s=self._window_steps
                        * self.global_batch
                        / max(self._window_seconds, 1e-9),
                    )
                    self._window_loss.zero_()
                    self._window_steps = 0
                    self._window_seconds = 0.0
                if test_images is not None and due(eval_every):
                    record.update(
                        self._test_record(
                            test_images, test_labels, eval_batch_size, self.step == steps, say
                        )
                    )
                if sample_dir is not None and due(sample_every) and main:
                    path = self.save_samples(
                        Path(sample_dir) / f"samples_step{self.step}.png", n=num_samples
                    )
                    record["samples"] = str(path)
                if self.stopped_by_budget and self.step == steps:
                    record["time_budget_s"] = float(time_budget)  # type: ignore[arg-type]
                if len(record) > 1:
                    if not records:  # the first record of this call
                        record["first_step_s"] = first_step_s
                    record["wall_s"] = self.wall_time()
                    if metrics is not None:
                        record = metrics.write(**record)
                    records.append(record)
                    if bar is not None and "train_bpd" in record:
                        bar.set_postfix(bpd=f"{record['train_bpd']:.4f}", lr=f"{lr:.2e}")
                    if main and ("test_bpd" in record or "first_step_s" in record or bar is None):
                        say(_summary(record))
                if checkpoint_path is not None and due(checkpoint_every):
                    self.save(checkpoint_path, extra=checkpoint_extra)
                window_start = time.perf_counter()  # evaluation etc. is not training time
        finally:
            if bar is not None:
                bar.close()
        return records

    def _budget_spent(self, deadline: float, log_every: int) -> bool:
        """Whether the wall-clock budget is spent (the same answer on every rank)."""
        if not self.dist.distributed:
            return time.perf_counter() >= deadline
        if self.step % log_every:  # ranks decide together, at the records' collectives
            return False
        over = torch.tensor(float(time.perf_counter() >= deadline), device=self.device)
        all_reduce_sum(over)
        return bool(over > 0)

    def _check_test_data(self, images: Tensor, labels: Tensor | None) -> None:
        check_images_for_model(images, self.model, "test_images", nonempty=True)
        if self.config.conditional:
            if labels is None:
                raise ValueError("test_labels must be given when config.conditional is true")
            check_labels(labels, images.shape[0], "test_labels")


def _canonical_parameter_strides(model: nn.Module) -> None:
    """Give every dense parameter the strides of its memory format, in place.

    Weight norm makes its ``g`` of a transposed convolution ``(1, C, 1, 1)`` with strides
    ``(1, 1, 1, 1)``: contiguous (size-1 dimensions have arbitrary strides) but not the
    strides autograd gives its gradient, ``(C, 1, 1, 1)``. DDP lays its buckets out like the
    parameters and warned "Grad strides do not match bucket view strides" on every rank.
    """
    with torch.no_grad():
        for p in model.parameters():
            fmt = (
                torch.channels_last
                if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                and not p.is_contiguous()
                else torch.contiguous_format
            )
            like = torch.empty_like(p, memory_format=fmt)
            if like.stride() != p.stride():
                p.data = like.copy_(p)


def _summary(record: Mapping[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    if record.get("first_step_s") is not None:
        parts.append(f"first step after {record['first_step_s']:.1f} s")
    for key, fmt in (("train_bpd", "train {:.4f} bits/dim"), ("test_bpd", "test {:.4f} bits/dim"),
                     ("images_per_s", "{:.1f} images/s"), ("lr", "lr {:.3g}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return ", ".join(parts)
