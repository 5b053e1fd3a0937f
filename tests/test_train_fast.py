"""Issue 12 on CPU: one loss path, the fast evaluation pass, regional compilation, the time
budget, the cosine schedule, step costs (foreach Adam, batch indices on the device) and the
metrics-to-Markdown converter; tiny models and data, seconds each."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.nn.weight_norm import data_dependent_init
from discretelik.train import (
    LikelihoodLoss,
    RandomBatches,
    TrainConfig,
    Trainer,
    WarmupCosine,
    compile_regions,
    evaluate_bpd,
    load_checkpoint,
    read_metrics,
    train_step,
)
from discretelik.train import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cifar10.py"
CONVERTER = ROOT / "examples" / "benchmarks" / "metrics_to_markdown.py"


def tiny(mixtures: int = 3, **kwargs) -> dl.AutoregressiveModel:
    torch.manual_seed(0)
    return dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": mixtures},
                    **kwargs)


@pytest.fixture(scope="module")
def initialised() -> tuple[dl.AutoregressiveModel, torch.Tensor]:
    """A tiny model after the data-dependent init, and 64 bundled test images."""
    model = tiny()
    images = load_bundled("cifar10", "test")[0][:64]
    data_dependent_init(model, images[:32])
    return model, images


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_cifar10_fast", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_loss(model: dl.AutoregressiveModel, x: torch.Tensor) -> torch.Tensor:
    """The loss as train/step.py computed it before it called the model's own bits_per_dim."""
    params = model.head.params(model.backbone(model.scale(x), None))
    with torch.autocast(device_type=x.device.type, enabled=False):
        log_prob = model.head.distribution(params.float(), validate_args=False).log_prob(x)
    return log_prob / (-math.log(2.0) * x[0].numel())


# -- one loss path -------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_loss_is_the_models_own_bits_per_dim(initialised, monkeypatch, autocast) -> None:
    model, images = initialised
    x = images[:4]
    calls = []
    own = model.bits_per_dim

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return own(*args, **kwargs)

    monkeypatch.setattr(model, "bits_per_dim", spy)
    ctx = torch.autocast("cpu", autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = LikelihoodLoss(model)(x)
        reference = old_loss(model, x)
    assert calls == [{"validate_args": False}]  # the model's path, without per-step checks
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-7, atol=0)  # float32 rounding


def test_model_log_prob_keeps_the_likelihood_float32_under_autocast(initialised) -> None:
    model, images = initialised
    x = images[:2]
    with torch.autocast("cpu", torch.bfloat16):
        bpd = model.bits_per_dim(x)
        params = model.params(x)
    assert params.dtype == torch.bfloat16 and bpd.dtype == torch.float32
    expected = dl.bits_per_dim(model.head.distribution(params.float()).log_prob(x), x.shape[1:])
    torch.testing.assert_close(bpd, expected, rtol=2e-7, atol=0)


def test_validate_args_false_skips_only_the_value_checks(initialised) -> None:
    model, _ = initialised
    bad = torch.full((1, 3, 8, 8), 300, dtype=torch.int64)  # levels above bins - 1
    with pytest.raises(ValueError, match="x"):
        model.log_prob(bad, validate_args=True)
    assert model.log_prob(bad, validate_args=False).shape == (1,)  # not read, not checked
    with pytest.raises(TypeError):
        model.log_prob(bad.float(), validate_args=False)  # type checks always run


# -- fast evaluation -----------------------------------------------------------------------------
def test_fast_evaluation_agrees_with_float32(initialised) -> None:
    model, images = initialised
    full = evaluate_bpd(model, images, batch_size=32)
    bf16 = evaluate_bpd(model, images, batch_size=64, precision="bf16")
    assert bf16 != full  # it really ran in another precision
    assert abs(bf16 - full) < 1e-3
    assert evaluate_bpd(model, images, batch_size=32, precision="tf32") == full  # CPU: no TF32
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate_bpd(model, images, precision="fp16")


def _fit(tmp_path: Path, steps: int, **fit_kwargs) -> tuple[Trainer, list[dict]]:
    model = tiny()
    images = load_bundled("cifar10", "train")[0][:32]
    data_dependent_init(model, images[:16])
    config = TrainConfig(batch_size=4, lr=2e-3, **fit_kwargs.pop("config", {}))
    trainer = Trainer(model, images, config=config)
    records = trainer.fit(steps, test_images=load_bundled("cifar10", "test")[0][:16],
                          eval_batch_size=8, progress=False, log_fn=lambda s: None,
                          checkpoint_path=tmp_path / "ckpt.pt", **fit_kwargs)
    return trainer, records


def test_trainer_checks_the_fast_pass_once_then_uses_it(tmp_path: Path) -> None:
    trainer, records = _fit(tmp_path, 6, eval_every=2, log_every=2,
                            config={"eval_precision": "bf16"})
    first, middle, last = records
    assert first["test_precision"] == "fp32" and abs(first["test_bpd_fast_diff"]) < 1e-3
    assert first["test_bpd_fast"] - first["test_bpd"] == first["test_bpd_fast_diff"]
    assert first["test_s"] > 0 and first["test_fast_s"] > 0
    assert middle["test_precision"] == "bf16" and "test_bpd_fast" not in middle
    assert last["test_precision"] == "fp32"  # the reported figure is float32
    assert trainer.fast_eval_agrees is True


def test_trainer_warns_and_falls_back_when_the_fast_pass_disagrees(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(trainer_module, "FAST_EVAL_TOLERANCE", 0.0)
    with pytest.warns(UserWarning, match="every later evaluation runs in float32"):
        _, records = _fit(tmp_path, 4, eval_every=2, log_every=2,
                          config={"eval_precision": "bf16"})
    assert [r["test_precision"] for r in records] == ["fp32", "fp32"]
    assert "test_bpd_fast" in records[0] and "test_bpd_fast" not in records[1]


# -- time budget ---------------------------------------------------------------------------------
def test_time_budget_stops_then_evaluates_and_checkpoints(tmp_path: Path) -> None:
    launched = time.perf_counter() - 100.0  # as if the script had started 100 s ago
    trainer, records = _fit(tmp_path, 10_000, log_every=1_000, time_budget=101.0,
                            start_time=launched)
    # The budget, first_step_s and wall_s all count from the launch.
    assert records[0]["first_step_s"] > 100 and records[-1]["wall_s"] > 101
    assert trainer.stopped_by_budget and 0 < trainer.step < 10_000
    last = records[-1]
    assert last["step"] == trainer.step and last["time_budget_s"] == 101.0
    assert "test_bpd" in last and "train_bpd" in last
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == trainer.step
    with pytest.raises(ValueError, match="time_budget"):
        trainer.fit(2, time_budget=0)


def test_script_time_budget_on_the_demo_recipe(script, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    final = script.main(["--recipe", "demo", "--device", "cpu", "--no-progress", "--out",
                         str(out), "--time-budget", "3s", "--samples", "1"])
    printed = capsys.readouterr().out
    assert "time budget 3s spent: stopped at step" in printed
    assert "first step after" in printed
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["time_budget_s"] == 3.0 and records[-1]["step"] < 800
    assert final["test_bpd"] == records[-1]["test_bpd"] and final["samples"]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == records[-1]["step"]
    again = script.main(["--eval-only", str(out / "checkpoint.pt"), "--device", "cpu",
                         "--samples", "0", "--eval-precision", "bf16"])
    assert again["test_bpd"] == final["test_bpd"]
    assert abs(again["test_bpd_fast"] - again["test_bpd"]) < 1e-3 and again["test_fast_s"] > 0
    assert "(bf16 pass)" in capsys.readouterr().out
    env = json.loads((out / "environment.json").read_text())
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    # The converter turns that run into the fragment's table: one row per evaluation.
    md = tmp_path / "fragment.md"
    proc = subprocess.run([sys.executable, str(CONVERTER), str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    text = md.read_text()
    assert text.startswith("<!-- Written by metrics_to_markdown.py --markdown")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[2] == "test bits/dim"
    assert len(rows) == 2 + sum("test_bpd" in r for r in records)
    assert f"| {records[-1]['test_bpd']:.4f} | fp32 |" in rows[-1]
    assert "time budget 3 s spent: training stopped at step" in text



@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("20m", 1200),
                                           ("1.5h", 5400), (".5m", 30)])
def test_parse_duration(script, text: str, seconds: float) -> None:
    assert script.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "20 min", "-3s", "0s", "1e3"])
def test_bad_time_budget_is_a_usage_error(script, text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        script.parse_args(["--time-budget", text])
    assert exc.value.code == 2 and "--time-budget" in capsys.readouterr().err


def test_gpu_recipes_warm_the_ema_up(script) -> None:
    assert script.RECIPES["gpu"]["ema_warmup"] and script.RECIPES["gpu-20min"]["ema_warmup"]
    s = script.resolve(script.parse_args(["--data", "x", "--recipe", "gpu-20min"]), None, True, 1)
    assert s["time_budget"] == "20m" and s["lr_schedule"] == "cosine"
    config = TrainConfig(lr_schedule="cosine", warmup_steps=s["warmup_steps"],
                         decay_steps=s["decay_steps"], final_lr_fraction=s["final_lr_fraction"])
    assert config.decay_steps > config.warmup_steps


# -- schedule ------------------------------------------------------------------------------------
def test_warmup_cosine() -> None:
    f = WarmupCosine(total_steps=110, warmup_steps=10, final=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == f(110)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        WarmupCosine(10, 10)
    with pytest.raises(ValueError, match="decay_steps must exceed"):
        TrainConfig(lr_schedule="cosine", warmup_steps=5, decay_steps=5)


def test_trainer_uses_the_cosine_schedule() -> None:
    trainer = Trainer(tiny(), torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                      config=TrainConfig(batch_size=4, lr=1e-2, lr_schedule="cosine",
                                         warmup_steps=2, decay_steps=4))
    lrs = []
    for _ in range(5):
        lrs.append(trainer.lr)
        trainer.train_step()
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3, 0.0], abs=1e-12)


# -- compilation ---------------------------------------------------------------------------------
@pytest.fixture
def keep_validation():
    """Dynamo turns torch.distributions' default validation off process-wide the first time it
    compiles anything (torch/_dynamo/eval_frame.py, TorchPatcher.patch): restore it for the
    tests that follow, whose value checks follow that default."""
    saved = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(saved)


def test_regional_compile_compiles_each_gated_resnet_and_keeps_the_function(keep_validation) -> None:
    model = tiny(nr_resnet=2)
    x = torch.randint(0, 256, (2, 3, 8, 8))
    expected = model.bits_per_dim(x).detach()
    # backend "eager": dynamo traces every block whole (fullgraph: no graph break), without
    # the C++ build of inductor that would take minutes on CPU.
    torch._dynamo.reset()
    counters.clear()
    n = compile_regions(model, backend="eager", fullgraph=True)
    assert n == 3 * 2 * 2 + (2 + 3 + 3) * 2  # up: 3 levels x 2 x (u, ul); down: 2, 3, 3 x 2
    blocks = [m for m in model.modules() if type(m).__name__ == "GatedResNet"]
    assert all(m._compiled_call_impl is not None for m in blocks)
    torch.testing.assert_close(model.bits_per_dim(x), expected, rtol=0, atol=0)
    # One graph per (stream, short-cut, resolution, input strides) variant, 16 whatever
    # nr_resnet, not one per block: the weight-normed layers share their parametrized class,
    # on which dynamo guards.
    assert 0 < counters["stats"]["unique_graphs"] <= 16 < n
    with pytest.raises(ValueError, match="names none"):
        compile_regions(dl.build("pixelcnn", "softmax", preset="tiny"))
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(compile="partial")


# -- step costs ----------------------------------------------------------------------------------
def test_cpu_adam_is_fused_and_matches_the_for_loop() -> None:
    trainer = Trainer(tiny(), torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                      config=TrainConfig(batch_size=4))
    assert trainer.optimizer.defaults["fused"] is True
    models = [tiny(), tiny()]
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for model, fused in zip(models, (None, True)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.95, 0.9995),
                               foreach=False if fused is None else None, fused=fused)
        for _ in range(3):
            train_step(LikelihoodLoss(model), opt, x)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batch_indices_on_the_device_are_the_same_batches() -> None:
    on_cpu, on_device = RandomBatches(20, 3, seed=5), RandomBatches(20, 3, seed=5)
    for _ in range(15):  # crosses two epoch boundaries (6 steps per epoch)
        torch.testing.assert_close(on_device.next("cpu"), on_cpu.next(), rtol=0, atol=0)
    assert on_device.state_dict() == on_cpu.state_dict()


def test_no_value_check_reads_the_batch_in_a_training_step(monkeypatch) -> None:
    # Reading the levels every step would synchronise a GPU: the trainer checks them once.
    trainer = Trainer(tiny(), torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                      config=TrainConfig(batch_size=4))
    import discretelik.model as model_module

    def fail(*args, **kwargs):
        raise AssertionError("levels read during a training step")

    monkeypatch.setattr(model_module, "check_levels", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step()


def test_benchmark_modes_subset() -> None:
    bench = ROOT / "examples" / "benchmarks" / "train_step.py"
    cmd = [sys.executable, str(bench), "--device", "cpu", "--steps", "1", "--warmup", "1",
           "--repeats", "1", "--batch-size", "2", "--threads", "1"]
    proc = subprocess.run([*cmd, "--modes", "bf16 autocast"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| eager fp32", "| bf16 autocast"]  # the baseline always runs
    bad = subprocess.run([*cmd, "--modes", "bf16"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 2 and "--modes: unknown ['bf16']" in bad.stderr


def test_evaluation_benchmark_fragment(tmp_path: Path) -> None:
    bench = ROOT / "examples" / "benchmarks" / "evaluation.py"
    out = tmp_path / "evaluation.md"
    proc = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--threads", "1",
                           "--batch-sizes", "250", "--markdown", str(out)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    text = out.read_text()
    assert [line for line in text.splitlines() if line.startswith("| ")] == printed
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in printed[2:]}
    assert set(cells) == {"fp32", "tf32", "bf16"} and "skipped on CPU" in cells["tf32"][-1]
    assert cells["fp32"][3] == "+0.0e+00"
    assert abs(float(cells["bf16"][3])) < 1e-3 and cells["bf16"][2] != cells["fp32"][2]


def test_resume_a_checkpoint_from_before_the_new_settings(script, tmp_path: Path) -> None:
    from discretelik.train import save_checkpoint

    out = tmp_path / "run"
    args = ["--recipe", "demo", "--device", "cpu", "--no-progress", "--out", str(out),
            "--samples", "0", "--log-every", "1", "--init-batch-size", "8", "--batch-size", "8"]
    script.main([*args, "--steps", "2"])
    ckpt = load_checkpoint(out / "checkpoint.pt")
    for key in script.LATER_SETTINGS:  # as written before these settings existed
        ckpt["settings"].pop(key, None)
    ckpt.pop("digest", None)
    save_checkpoint(ckpt, out / "checkpoint.pt")
    final = script.main(["--resume", str(out / "checkpoint.pt"), "--steps", "3", "--device",
                         "cpu", "--no-progress", "--samples", "0"])
    assert final["step"] == 3 and read_metrics(out / "metrics.jsonl")[-1]["step"] == 3
