"""Checkpoints and training under hostile or broken input (issue 14), on CPU at tiny sizes.

Digests, non-finite losses and weights, the metrics window across a resume, stale temp files,
the data's range against the model's bins, empty splits, batch 0 of the PixelRNN backbones,
empty conditioning maps, and ``AutoregressiveModel.from_checkpoint``.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import pytest
import torch

import discretelik as dl
from discretelik.train import (
    MetricsLog,
    TrainConfig,
    Trainer,
    checkpoint_digest,
    checkpoint_step,
    evaluate_bpd,
    init_distributed,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)


def tiny_model(seed: int = 0, **kwargs: object) -> dl.AutoregressiveModel:
    torch.manual_seed(seed)
    kwargs.setdefault("head_kwargs", {"mixtures": 2})
    return dl.build("pixelcnn++", "dlm", preset="tiny", **kwargs)


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def tiny_trainer(seed: int = 0) -> Trainer:
    return Trainer(tiny_model(seed), images(), config=TrainConfig(batch_size=4, lr=2e-3))


def fit(trainer: Trainer, steps: int, **kwargs: object) -> list[dict]:
    return trainer.fit(steps, progress=False, log_fn=lambda s: None, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Trainer]:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    trainer = tiny_trainer()
    fit(trainer, 2, checkpoint_path=path)
    return path, trainer


def rewrite(path: Path, dest: Path, change) -> Path:
    """A copy of the checkpoint at ``path`` with ``change(state)`` applied and a valid digest
    (what a forger, or another tool, can write)."""
    state = load_checkpoint(path)
    change(state)
    save_checkpoint(state, dest)
    return dest


# -- digest --------------------------------------------------------------------------------------
def test_flipped_bytes_in_a_weight_are_refused_everywhere(trained, tmp_path: Path) -> None:
    path, trainer = trained
    data = path.read_bytes()
    weight = max(trainer.model.state_dict().values(), key=lambda t: t.numel())
    offset = data.find(weight.detach().contiguous().numpy().tobytes()[:64])
    assert offset > 0
    bad = tmp_path / "flipped.pt"
    flipped = bytearray(data)
    for i in range(offset + 16, offset + 416):  # 400 bytes inside the tensor
        flipped[i] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    torch.load(bad, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(ValueError, match="corrupted or was modified") as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match="corrupted or was modified"):
        tiny_trainer().resume(bad)
    with pytest.raises(ValueError, match="corrupted or was modified"):
        dl.AutoregressiveModel.from_checkpoint(bad)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a loadable checkpoint") as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)


def test_digest_covers_content_and_is_required(tmp_path: Path) -> None:
    state = {"step": 1, "w": torch.ones(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16),
             "opt": {"state": {0: {"m": torch.ones(1)}}, "lr": 1e-3}}
    digest = checkpoint_digest(state)
    assert digest.startswith("sha256:") and checkpoint_digest(dict(state)) == digest
    for changed in ({**state, "step": 2}, {**state, "w": torch.ones(3, 2)},
                    {**state, "w": torch.ones(2, 3, dtype=torch.float64)},
                    {**state, "opt": {"state": {0: {"m": torch.ones(1)}}, "lr": 2e-3}}):
        assert checkpoint_digest(changed) != digest  # shape, dtype and plain values count
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)  # no digest: e.g. another tool's file
    with pytest.raises(ValueError, match="no integrity digest"):
        load_checkpoint(plain)
    assert load_checkpoint(plain, verify=False)["step"] == 1
    with pytest.raises(TypeError, match=r"state\['f'\] has type function"):
        save_checkpoint({"f": lambda: 0}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("step", ["../../elsewhere/x", 2.5, True, -1, None])
def test_checkpoint_step_must_be_a_plain_int(trained, tmp_path: Path, step: object) -> None:
    path, _ = trained
    forged = rewrite(path, tmp_path / "forged.pt", lambda s: s.update(step=step))
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        checkpoint_step(load_checkpoint(forged), forged)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        tiny_trainer().resume(forged)
    assert checkpoint_step({"step": 7}) == 7


# -- divergence ----------------------------------------------------------------------------------
def _poison_after(monkeypatch, step: int) -> None:
    """Make the weights NaN right after optimisation step ``step``."""
    original = Trainer.train_step

    def poisoned(self):
        loss = original(self)
        if self.step == step:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)


def test_non_finite_loss_stops_at_its_step_naming_the_last_checkpoint(monkeypatch, tmp_path):
    path = tmp_path / "checkpoint.pt"
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    trainer = tiny_trainer()
    _poison_after(monkeypatch, 3)  # the loss of step 4 is NaN
    with pytest.raises(FloatingPointError) as info:
        fit(trainer, 10, log_every=1, checkpoint_path=path, checkpoint_every=2, metrics=metrics)
    message = str(info.value)
    assert "loss is nan at step 4" in message
    assert f"last good checkpoint: {path} (step 2)" in message
    assert trainer.step == 4  # stopped at once (on CPU every step is checked)
    records = read_metrics(metrics.path)
    assert [r["step"] for r in records] == [1, 2, 3]  # nothing logged from the diverged step
    assert all(r["train_bpd"] is not None and math.isfinite(r["train_bpd"]) for r in records)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_non_finite_loss_on_the_deferred_path_names_the_exact_step(monkeypatch, tmp_path):
    # What a GPU run does: no read per step; the window is checked at the next record.
    trainer = tiny_trainer()
    trainer._check_every_step = False
    _poison_after(monkeypatch, 5)  # the loss of step 6 is NaN, the record is at step 8
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(FloatingPointError, match="loss is nan at step 6 .*checkpoint: none"):
        fit(trainer, 12, log_every=4, metrics=metrics)
    assert trainer.step == 8
    assert [r["step"] for r in read_metrics(metrics.path)] == [4]


def test_non_finite_weights_are_never_written(monkeypatch, tmp_path):
    path = tmp_path / "checkpoint.pt"
    trainer = tiny_trainer()
    _poison_after(monkeypatch, 2)  # step 2's loss is finite, its update is not
    with pytest.raises(FloatingPointError, match=r"non-finite values.*after step 2; .* not written"):
        fit(trainer, 4, log_every=1, checkpoint_path=path, checkpoint_every=2)
    assert not path.exists()


def test_resume_refuses_a_checkpoint_with_nan_weights(trained, tmp_path: Path) -> None:
    path, _ = trained

    def poison(state):
        name = next(iter(state["model"]))
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))

    bad = rewrite(path, tmp_path / "nan.pt", poison)
    with pytest.raises(ValueError, match=rf"{bad}: cannot resume: the model weights: .* non-finite"):
        tiny_trainer().resume(bad)
    with pytest.raises(ValueError, match="non-finite"):
        dl.AutoregressiveModel.from_checkpoint(bad, weights="raw")


# Two gloo ranks; rank 0 alone writes sample grids. A collective that only rank 0 entered (the
# divergence check at a sample-only step) would hang: the process group times out instead.
SAMPLES_ON_TWO_RANKS = """
import sys
from datetime import timedelta

import torch
import torch.distributed

import discretelik as dl
from discretelik.train import Trainer, TrainConfig, cleanup_distributed, init_distributed

torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=30))
dist = init_distributed("cpu")
torch.manual_seed(0)
model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2})
trainer = Trainer(model, torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8),
                  config=TrainConfig(batch_size=2), dist=dist)
records = trainer.fit(3, log_every=3, sample_dir=sys.argv[1], sample_every=1, num_samples=1,
                      progress=False, log_fn=lambda s: None)
print(f"rank {dist.rank}: steps {[r['step'] for r in records]}", flush=True)
cleanup_distributed()
"""


def test_sample_only_steps_under_ddp_do_not_hang(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_train import _run_two_gloo_processes
    finally:
        sys.path.pop(0)
    child = tmp_path / "samples_on_two_ranks.py"
    child.write_text(SAMPLES_ON_TWO_RANKS)
    proc = _run_two_gloo_processes(child, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: steps [1, 2, 3]" in proc.stdout and "rank 1: steps [3]" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "samples_step1.png", "samples_step2.png", "samples_step3.png"]


# -- exact resume of the metrics, stale temp files ------------------------------------------------
def test_resume_continues_the_metrics_window_exactly(monkeypatch, tmp_path: Path) -> None:
    # Records every 4 steps, checkpoints every 3: the checkpoint at step 6 falls inside the
    # window 5..8, whose record must average the same four steps after a resume.
    full = tiny_trainer()
    records = fit(full, 8, log_every=4)
    original = Trainer.train_step

    def interrupted(self):
        if self.step == 6:  # killed after the checkpoint at step 6
            raise KeyboardInterrupt
        return original(self)

    cut = tiny_trainer()
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cut, 8, log_every=4, checkpoint_path=tmp_path / "c.pt", checkpoint_every=3)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = tiny_trainer(seed=1)  # other initial weights: everything comes from the file
    resumed.resume(tmp_path / "c.pt")
    assert resumed.step == 6
    again = fit(resumed, 8, log_every=4)
    assert [r["step"] for r in again] == [8]
    assert again[0]["train_bpd"] == records[-1]["train_bpd"]  # bit for bit
    assert again[0]["images_per_s"] > 0


def test_stale_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".checkpoint.pt.x.tmp"]
    other = tmp_path / ".metrics.jsonl.abc.tmp"  # not ours to remove
    for f in (*stale, other):
        f.write_bytes(b"half a checkpoint")
    fit(tiny_trainer(), 1, checkpoint_path=path)
    assert not any(f.exists() for f in stale) and other.exists() and path.exists()


# -- data against the model -----------------------------------------------------------------------
@pytest.mark.parametrize("head", ["dlm", "gaussian", "softmax"])
def test_trainer_refuses_data_outside_the_models_bins(head: str) -> None:
    model = dl.build("pixelcnn++", head, preset="tiny", bins=2)
    with pytest.raises(ValueError, match=r"images must hold levels in \[0, 1\] .*bins=2.*up to"):
        Trainer(model, images(), config=TrainConfig(batch_size=4))
    binary = (images() > 127).to(torch.uint8)
    trainer = Trainer(model, binary, config=TrainConfig(batch_size=4))
    with pytest.raises(ValueError, match=r"test_images must hold levels in \[0, 1\]"):
        fit(trainer, 2, test_images=images())
    assert trainer.step == 0  # refused before the first step
    with pytest.raises(ValueError, match=r"images must hold levels in \[0, 1\]"):
        evaluate_bpd(model, images())


def test_empty_splits_are_refused_before_training() -> None:
    trainer = tiny_trainer()
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="test_images must hold at least one image"):
        fit(trainer, 2, test_images=empty)
    assert trainer.step == 0
    with pytest.raises(ValueError, match="at least one image"):
        evaluate_bpd(trainer.model, empty)


@pytest.mark.parametrize("backbone", ["row_lstm", "diagonal_bilstm"])
def test_pixelrnn_backbones_take_an_empty_batch(backbone: str) -> None:
    # Like the convolutional backbones: an empty batch gives empty results (it crashed in a
    # reshape with -1, which an empty tensor cannot infer).
    for head in ("dlm", "softmax"):
        model = dl.build(backbone, head, preset="tiny")
        assert model.log_prob(torch.zeros(0, 3, 5, 6, dtype=torch.long)).shape == (0,)
        assert model.log_prob(torch.zeros(2, 3, 5, 6, dtype=torch.long)).shape == (2,)


def test_empty_conditioning_map_is_a_clear_error() -> None:
    model = dl.build("gated_pixelcnn", "dlm", preset="tiny", cond_channels=2)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"cond map must have shape \(2, 2, h, w\) with h, w >= 1"):
        model.log_prob(x, cond=torch.zeros(2, 2, 0, 0))
    assert model.log_prob(x, cond=torch.zeros(2, 2, 1, 1)).shape == (2,)


def test_unknown_device_is_a_value_error() -> None:
    for device in ("tpu", "xla", "cuda:x"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            init_distributed(device)


# -- from_checkpoint ------------------------------------------------------------------------------
def test_build_records_its_spec() -> None:
    model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2},
                     nr_filters=8, dropout=None)
    assert model.build_spec == {
        "backbone": "pixelcnn++", "head": "dlm", "channels": 3, "bins": 256, "preset": "tiny",
        "head_kwargs": {"mixtures": 2}, "backbone_kwargs": {"nr_filters": 8},
    }
    spec = model.build_spec
    again = dl.build(spec["backbone"], spec["head"], channels=spec["channels"],
                     bins=spec["bins"], preset=spec["preset"], head_kwargs=spec["head_kwargs"],
                     **spec["backbone_kwargs"])
    assert again.state_dict().keys() == model.state_dict().keys()
    hand = dl.AutoregressiveModel(model.backbone, model.head)
    assert hand.build_spec is None


@pytest.mark.skipif(
    "log_prob_backend" not in inspect.signature(dl.DiscretizedLogisticMixture).parameters,
    reason="needs the per-instance log_prob_backend head option",
)
def test_build_spec_leaves_out_the_log_prob_backend() -> None:
    model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"log_prob_backend": "eager"})
    assert model.build_spec["head_kwargs"] == {}


def test_from_checkpoint_loads_the_ema_or_raw_weights(trained) -> None:
    path, trainer = trained
    ckpt = load_checkpoint(path)
    assert ckpt["model_spec"] == trainer.model.build_spec  # written by the trainer
    x = images(2, seed=5)
    raw = dl.AutoregressiveModel.from_checkpoint(path, weights="raw")
    ema = dl.AutoregressiveModel.from_checkpoint(path)  # "ema" by default
    assert not raw.training and not ema.training
    assert raw.build_spec == trainer.model.build_spec
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(raw.log_prob(x), trainer.model.log_prob(x), rtol=0, atol=0)
        with trainer.ema.average_parameters():
            torch.testing.assert_close(ema.log_prob(x), trainer.model.log_prob(x), rtol=0, atol=0)
        assert not torch.equal(raw.log_prob(x), ema.log_prob(x))


def test_from_checkpoint_errors(trained, tmp_path: Path) -> None:
    path, _ = trained
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw', got 'best'"):
        dl.AutoregressiveModel.from_checkpoint(path, weights="best")
    no_spec = rewrite(path, tmp_path / "nospec.pt", lambda s: s.pop("model_spec"))
    with pytest.raises(ValueError, match=rf"{no_spec}: the checkpoint has no 'model_spec'"):
        dl.AutoregressiveModel.from_checkpoint(no_spec)
    no_model = rewrite(path, tmp_path / "nomodel.pt", lambda s: s.pop("model"))
    with pytest.raises(ValueError, match="has no 'model' state dict"):
        dl.AutoregressiveModel.from_checkpoint(no_model)

    def other_model(state):
        state["model_spec"] = dict(state["model_spec"], head_kwargs={"mixtures": 3})

    other = rewrite(path, tmp_path / "other.pt", other_model)
    with pytest.raises(ValueError, match=rf"{other}: the weights do not fit the model"):
        dl.AutoregressiveModel.from_checkpoint(other)
    unknown = rewrite(path, tmp_path / "unknown.pt",
                      lambda s: s.update(model_spec=dict(s["model_spec"], backbone="nope")))
    with pytest.raises(ValueError, match=rf"{unknown}: cannot build the model of its model_spec"):
        dl.AutoregressiveModel.from_checkpoint(unknown)

    def drop_shadow(state):
        state["ema"]["shadow"].pop(next(iter(state["ema"]["shadow"])))

    partial = rewrite(path, tmp_path / "partial.pt", drop_shadow)
    with pytest.raises(ValueError, match="the EMA weights do not fit the model: missing"):
        dl.AutoregressiveModel.from_checkpoint(partial)
    dl.AutoregressiveModel.from_checkpoint(partial, weights="raw")  # raw needs no EMA
