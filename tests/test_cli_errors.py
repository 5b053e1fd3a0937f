"""examples/train_cifar10.py under a careless or hostile user (issue 14), on CPU at tiny sizes.

Every mistake ends in one ``error: ...`` line and exit status 2 (1 for a diverged run), never
a traceback; output paths come from the command line only. ``cli(argv)`` is what ``python
examples/train_cifar10.py`` runs; most cases call it in-process, one as a real subprocess.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from discretelik.data import load_bundled
from discretelik.train import Trainer, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cifar10.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_cifar10_cli_errors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_npz(path: Path, n_train: int = 16, n_test: int = 4) -> Path:
    x, y = load_bundled("cifar10", "train")
    xt, yt = load_bundled("cifar10", "test")
    np.savez(path, x_train=x[:n_train].permute(0, 2, 3, 1).numpy(), y_train=y[:n_train].numpy(),
             x_test=xt[:n_test].permute(0, 2, 3, 1).numpy(), y_test=yt[:n_test].numpy())
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def args(data: Path, out: Path | None, *extra: str) -> list[str]:
    common = ["--data", str(data), "--recipe", "demo", "--device", "cpu", "--no-progress",
              "--batch-size", "8", "--init-batch-size", "8", "--eval-batch-size", "8",
              "--log-every", "1", "--samples", "0"]
    return common + (["--out", str(out)] if out is not None else []) + list(extra)


@pytest.fixture(scope="module")
def run(script, data, tmp_path_factory) -> Path:
    """A finished 2-step run; tests copy or rewrite its checkpoint, never change it."""
    out = tmp_path_factory.mktemp("run")
    assert script.cli(args(data, out, "--steps", "2")) == 0
    return out


def one_error_line(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def forge(run: Path, dest: Path, change) -> Path:
    state = load_checkpoint(run / "checkpoint.pt")
    change(state)
    save_checkpoint(state, dest)  # a valid digest: the digest is no signature
    return dest


# -- output paths ---------------------------------------------------------------------------------
def test_eval_only_never_puts_checkpoint_content_in_a_path(script, run, tmp_path, capsys):
    target = tmp_path / "attacker"
    target.mkdir()
    here = tmp_path / "ckpt"
    here.mkdir()
    evil = forge(run, here / "checkpoint.pt",
                 lambda s: s.update(step="/../../../../../../../.." + str(target) + "/x"))
    code = script.cli(["--eval-only", str(evil), "--device", "cpu", "--samples", "1"])
    line = one_error_line(capsys, code)
    assert "step must be an int >= 0" in line and str(evil) in line
    assert list(target.iterdir()) == [] and sorted(p.name for p in here.iterdir()) == [
        "checkpoint.pt"]
    # A valid checkpoint writes its grid next to itself (or into --out), named by the int step.
    assert script.cli(["--eval-only", str(run / "checkpoint.pt"), "--device", "cpu",
                       "--samples", "1", "--out", str(tmp_path / "eval")]) == 0
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["eval_samples_step2.png"]


def test_resume_file_without_out_continues_in_the_files_directory(script, run, data, tmp_path,
                                                                  capsys):
    elsewhere = tmp_path / "elsewhere"
    moved = tmp_path / "moved"
    moved.mkdir()
    ckpt = forge(run, moved / "checkpoint.pt",
                 lambda s: s["settings"].update(out=str(elsewhere)))
    code = script.cli(args(data, None, "--steps", "3", "--resume", str(ckpt)))
    assert code == 0, capsys.readouterr().err
    assert not elsewhere.exists()
    assert load_checkpoint(moved / "checkpoint.pt")["step"] == 3
    assert (moved / "metrics.jsonl").exists() and (moved / "settings.json").exists()


# -- corrupted, foreign and diverged checkpoints --------------------------------------------------
def test_corrupted_checkpoint_is_one_line_exit_2(run, tmp_path) -> None:
    # A real process: the exit status and stderr as a user sees them.
    data = (run / "checkpoint.pt").read_bytes()
    bad = tmp_path / "checkpoint.pt"
    middle = len(data) // 2
    bad.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 400])
                    + data[middle + 400 :])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--eval-only", str(bad), "--device",
                           "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {bad}: ")
    assert "corrupted" in proc.stderr or "not a loadable checkpoint" in proc.stderr


@pytest.mark.parametrize("case", ["no model", "other model", "missing settings",
                                  "wrong settings", "nan weights"])
def test_broken_checkpoints_are_one_line_errors(script, run, data, tmp_path, capsys,
                                                case: str) -> None:
    def change(state):
        if case == "no model":
            del state["model"]
        elif case == "other model":  # weights of a model with another mixture count
            state["model_spec"] = dict(state["model_spec"], head_kwargs={"mixtures": 3})
            state["settings"]["mixtures"] = 3
        elif case == "missing settings":
            del state["settings"]["lr"]
        elif case == "wrong settings":
            state["settings"]["samples"] = "../x"
        else:  # a diverged run: the raw and the averaged weights
            name = next(iter(state["ema"]["shadow"]))
            for weights in (state["model"], state["ema"]["shadow"]):
                weights[name] = torch.full_like(weights[name], float("nan"))

    ckpt = forge(run, tmp_path / "checkpoint.pt", change)
    for argv in (["--eval-only", str(ckpt), "--device", "cpu", "--samples", "0"],
                 args(data, tmp_path, "--steps", "3", "--resume")):
        line = one_error_line(capsys, script.cli(argv))
        assert str(ckpt) in line
        expected = {"no model": "no 'model'|missing \\['model'\\]",
                    "other model": "do(es)? not fit",
                    "missing settings": "settings lack \\['lr'\\]",
                    "wrong settings": "wrong type: {'samples': '../x'}",
                    "nan weights": "non-finite"}[case]
        assert __import__("re").search(expected, line), line


def test_divergence_is_one_line_naming_step_and_checkpoint(script, data, tmp_path, capsys,
                                                           monkeypatch) -> None:
    original = Trainer.train_step

    def diverging(self):
        loss = original(self)
        if self.step == 2:  # the update of step 2 blows up, before its checkpoint
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(Trainer, "train_step", diverging)
    out = tmp_path / "run"
    code = script.cli(args(data, out, "--steps", "6", "--checkpoint-every", "1"))
    line = one_error_line(capsys, code, expected_code=1)
    assert "non-finite values (NaN or infinity) after step 2" in line
    assert f"not written; last good checkpoint: {out / 'checkpoint.pt'} (step 1)" in line
    # The checkpoint of step 2 would hold infinite weights: not written.
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1
    records = [r for r in map(__import__("json").loads, (out / "metrics.jsonl").open())]
    assert [r["step"] for r in records] == [1, 2]
    assert all(v is not None for r in records for v in r.values())


# -- flags, directories, data ---------------------------------------------------------------------
def test_user_mistakes_are_one_line_errors(script, run, data, tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty_test = write_npz(tmp_path / "empty_test.npz", n_test=0)
    cases = {
        "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'":
            args(data, tmp_path / "tpu", "--steps", "1", "--device", "tpu"),
        f"--out {a_file}: exists and is not a directory": args(data, a_file, "--steps", "1"),
        f"--out {a_file / 'sub'}: cannot write there": args(data, a_file / "sub", "--steps", "1"),
        "--recipe paper cannot be used on resume":
            args(data, run, "--resume", "--recipe", "paper"),
        "--steps/--epochs must be >= 1 for a new run":
            args(data, tmp_path / "zero", "--steps", "0"),
        "the test split of": args(empty_test, tmp_path / "empty", "--steps", "1"),
    }
    for expected, argv in cases.items():
        line = one_error_line(capsys, script.cli(argv))
        assert expected in line, (expected, line)
    assert not (tmp_path / "zero" / "checkpoint.pt").exists()
    assert not (tmp_path / "empty" / "checkpoint.pt").exists()  # refused before training


def test_unwritable_and_full_out_directories(script, data, tmp_path, capsys, monkeypatch) -> None:
    # Simulated (tests may run as root, for whom a read-only directory is writable).
    real = script.tempfile.TemporaryFile

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(script.tempfile, "TemporaryFile", read_only)
    line = one_error_line(capsys, script.cli(args(data, tmp_path / "ro", "--steps", "1")))
    assert f"--out {tmp_path / 'ro'}: cannot write there (Permission denied)" in line
    monkeypatch.setattr(script.tempfile, "TemporaryFile", real)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full"))

    monkeypatch.setattr(torch, "save", full)
    line = one_error_line(capsys, script.cli(args(data, tmp_path / "full", "--steps", "1")))
    assert line == f"error: {tmp_path / 'full'}: No space left on device"


def test_steps_below_the_checkpoint_names_the_existing_checkpoint(script, run, data, capsys):
    assert script.cli(args(data, run, "--steps", "0", "--resume")) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and f"checkpoint: {run / 'checkpoint.pt'};" in out
