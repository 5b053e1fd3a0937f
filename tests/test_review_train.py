"""Review findings on discretelik.train, on CPU at tiny sizes."""

from __future__ import annotations

import time

import pytest
import torch

import discretelik as dl
from discretelik.train import Trainer, TrainConfig, load_checkpoint


def _slow_trainer(monkeypatch: pytest.MonkeyPatch, step_s: float, eval_s: float) -> Trainer:
    model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2})
    trainer = Trainer(model, torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                      config=TrainConfig(batch_size=4))

    def fake_step() -> torch.Tensor:  # a training step of known duration
        time.sleep(step_s)
        trainer.step += 1
        return torch.zeros((), dtype=torch.float64)

    def fake_eval(*args: object, **kwargs: object) -> float:
        time.sleep(eval_s)
        return 0.0

    monkeypatch.setattr(trainer, "train_step", fake_step)
    monkeypatch.setattr(trainer, "evaluate", fake_eval)
    return trainer


def test_images_per_s_counts_every_training_step_of_the_window(monkeypatch, tmp_path) -> None:
    # A checkpoint at step 3 falls inside the logging window 1..4: its time must be left out,
    # but the training time of steps 1..3 must stay in (else images/s reads ~4x too high).
    step_s = 0.05
    trainer = _slow_trainer(monkeypatch, step_s, eval_s=0.0)
    monkeypatch.setattr(trainer, "save", lambda *a, **k: time.sleep(0.2))
    records = trainer.fit(4, log_every=4, checkpoint_path=tmp_path / "ckpt.pt",
                          checkpoint_every=3, progress=False, log_fn=lambda s: None)
    rate = [r for r in records if "images_per_s" in r][-1]["images_per_s"]
    ideal = trainer.global_batch / step_s  # 80 images/s
    assert 0.6 * ideal < rate < 1.15 * ideal, (rate, ideal)


def test_eval_period_need_not_be_a_multiple_of_the_log_period(monkeypatch) -> None:
    trainer = _slow_trainer(monkeypatch, 0.0, eval_s=0.0)
    records = trainer.fit(7, test_images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                          eval_every=3, log_every=4, progress=False, log_fn=lambda s: None)
    assert [r["step"] for r in records if "test_bpd" in r] == [3, 6, 7]


@pytest.mark.parametrize("content", [b"hello world\n", b"}q", b"a", b"\x80"])
def test_malformed_checkpoint_is_a_value_error_naming_the_file(tmp_path, content: bytes) -> None:
    # load_checkpoint promises ValueError (the script turns it into a one-line error); torch's
    # weights-only unpickler raises KeyError/IndexError on some garbage.
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a loadable checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_only_rank_0_prints_log_lines(monkeypatch) -> None:
    # Under torchrun every rank runs fit(); without a progress bar the summaries went to
    # log_fn on every rank, so N processes printed every line N times.
    from discretelik.train import DistInfo

    trainer = _slow_trainer(monkeypatch, 0.0, eval_s=0.0)
    trainer.dist = DistInfo(rank=1, world_size=1)  # what fit() reads on a non-zero rank
    lines: list[str] = []
    records = trainer.fit(2, test_images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                          log_every=1, progress=False, log_fn=lines.append)
    assert [r["step"] for r in records] == [1, 2] and lines == []


def test_script_resume_refuses_optimiser_flags_it_would_ignore(tmp_path) -> None:
    # The optimiser, scheduler and EMA states restore lr, decay, betas and the EMA decay from
    # the checkpoint, so a changed --lr on resume was silently ignored (while settings.json
    # recorded the new value). It must be refused instead.
    import importlib.util

    import numpy as np

    from discretelik.data import load_bundled
    from discretelik.train import read_metrics

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_cifar10_review",
                                                  root / "examples" / "train_cifar10.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    x, y = load_bundled("cifar10", "train")
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=x[:16].permute(0, 2, 3, 1).numpy(), y_train=y[:16].numpy(),
             x_test=x[:4].permute(0, 2, 3, 1).numpy(), y_test=y[:4].numpy())
    out = tmp_path / "run"
    args = ["--data", str(data), "--recipe", "demo", "--device", "cpu", "--no-progress",
            "--out", str(out), "--batch-size", "8", "--init-batch-size", "8",
            "--eval-batch-size", "8", "--log-every", "1", "--samples", "0"]
    script.main([*args, "--steps", "2"])
    with pytest.raises(ValueError, match=r"--lr.*--ema-decay|cannot be changed on resume"):
        script.main([*args, "--steps", "3", "--resume", "--lr", "0.5", "--ema-decay", "0.5"])
    script.main([*args, "--steps", "3", "--resume", "--lr", "0.005"])  # the same value is fine
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
