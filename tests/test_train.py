"""Training pieces and the CIFAR-10 reference script, on CPU at tiny sizes.

The script runs in-process (``main(argv)``) on a 32-image slice of the bundled CIFAR-10 subset
with the tiny PixelCNN++ preset; the DDP test launches it with ``torch.distributed.run`` and
two gloo processes on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.train import (
    EMA,
    ExponentialDecay,
    LikelihoodLoss,
    MetricsLog,
    RandomBatches,
    Trainer,
    TrainConfig,
    encode_png,
    image_grid,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cifar10.py"


# -- helpers -------------------------------------------------------------------------------------
def decode_png(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """Minimal PNG reader for what encode_png writes: returns (width, height, colour, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(height, -1)
    assert (raw[:, 0] == 0).all()  # filter type "None" on every row
    return width, height, colour, raw[:, 1:].reshape(height, width, channels)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_cifar10_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """32 train / 8 test images of the bundled subset as one .npz (x_* NHWC)."""
    x, y = load_bundled("cifar10", "train")
    xt, yt = load_bundled("cifar10", "test")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x[:32].permute(0, 2, 3, 1).numpy(), y_train=y[:32].numpy(),
             x_test=xt[:8].permute(0, 2, 3, 1).numpy(), y_test=yt[:8].numpy())
    return path


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--recipe", "demo", "--device", "cpu", "--no-progress",
            "--out", str(out), "--batch-size", "8", "--init-batch-size", "8",
            "--eval-batch-size", "8", "--log-every", "1", "--samples", "0", *extra]


def train_bpds(out: Path) -> list[float]:
    return [r["train_bpd"] for r in read_metrics(out / "metrics.jsonl")]


# -- small pieces --------------------------------------------------------------------------------
def test_png_round_trip_and_grid() -> None:
    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    width, height, colour, pixels = decode_png(encode_png(img))
    assert (width, height, colour) == (7, 5, 2)
    assert np.array_equal(pixels, img.permute(1, 2, 0).numpy())
    grey = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    assert decode_png(encode_png(grey))[2] == 0
    batch = torch.arange(5 * 3 * 2 * 2).reshape(5, 3, 2, 2) % 256
    grid = image_grid(batch, nrow=3, padding=1, pad_value=7)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert torch.equal(grid[:, 4:6, 1:3], batch[3].to(torch.uint8))  # row 1, column 0
    assert (grid[:, 0] == 7).all() and (grid[:, 4:6, 7:9] == 7).all()  # border, empty cell
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        encode_png(img.float())
    with pytest.raises(ValueError, match=r"levels in \[0, 255\]"):
        image_grid(batch + 300)


def test_ema_update_swap_and_state() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for s, p0 in zip(ema.shadow, start):  # 0.9 * old + 0.1 * (old + 1)
        torch.testing.assert_close(s, p0 + 0.1)
    live = [p.detach().clone() for p in model.parameters()]
    with ema.average_parameters():
        assert torch.equal(model.weight, ema.shadow[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))  # exact restore
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="EMA state does not match"):
        EMA(nn.Sequential(nn.Linear(3, 2))).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"'weight' has shape \(2, 3\), the model has"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


class _NotPlain:
    pass


def test_checkpoint_atomic_and_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 3, "w": torch.arange(4), "rng": torch.get_rng_state()}, path)
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4))
    with pytest.raises(Exception):  # a failed write (unpicklable) leaves the old file intact
        save_checkpoint({"f": lambda: 0}, path)
    assert load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp files left
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": _NotPlain()}, unsafe)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(unsafe)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_random_batches_shards_and_resume() -> None:
    single = RandomBatches(20, 8, seed=3)
    ranks = [RandomBatches(20, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses epochs (2 steps per epoch)
        assert torch.equal(single.next(), torch.cat([r.next() for r in ranks]))
    epoch = RandomBatches(16, 4, seed=0)
    assert sorted(torch.cat([epoch.next() for _ in range(4)]).tolist()) == list(range(16))
    resumed = RandomBatches(20, 8, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert all(torch.equal(single.next(), resumed.next()) for _ in range(3))
    with pytest.raises(ValueError, match="must be <= num_items"):
        RandomBatches(4, 3, world_size=2)


def test_exponential_decay_matches_openai() -> None:
    # openai/pixel-cnn: lr *= lr_decay before every update, the first included.
    factor = ExponentialDecay(0.999995)
    lr, openai = 1e-3, []
    for _ in range(3):
        lr *= 0.999995
        openai.append(lr)
    assert [1e-3 * factor(s) for s in range(3)] == pytest.approx(openai, rel=1e-12)
    assert ExponentialDecay(1.0, warmup_steps=4)(1) == 0.5


def test_metrics_log_truncate(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 5):
        log.write(step=step, train_bpd=torch.tensor(1.0 / step), test_bpd=float("nan"))
    log.truncate_after(2)
    records = read_metrics(log.path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["train_bpd"] == 0.5 and records[1]["test_bpd"] is None  # strict JSON
    MetricsLog(tmp_path / "off.jsonl", enabled=False).write(step=1)
    assert not (tmp_path / "off.jsonl").exists()


def test_train_step_bf16_keeps_likelihood_float32() -> None:
    torch.manual_seed(0)
    model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2})
    loss_fn = LikelihoodLoss(model)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.head.proj.weight.detach().clone()
    loss = train_step(loss_fn, opt, x, autocast_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
    assert not torch.equal(before, model.head.proj.weight)
    # Without autocast the per-image losses equal the model's own bits/dim.
    torch.testing.assert_close(loss_fn(x).detach(), model.bits_per_dim(x).detach())


def test_trainer_checks_arguments() -> None:
    model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2})
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="images must have dtype torch.uint8"):
        Trainer(model, images.float())
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
        Trainer(model, images[0])
    with pytest.raises(TypeError, match="labels must have dtype torch.int64"):
        Trainer(model, images, torch.zeros(4, dtype=torch.int32),
                config=TrainConfig(conditional=True))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        TrainConfig(batch_size=2.0)
    with pytest.raises(ValueError, match="labels must be given"):
        Trainer(model, images, config=TrainConfig(conditional=True))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


# -- the reference script ------------------------------------------------------------------------
def test_script_one_epoch_end_to_end_then_eval_only(script, tiny_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    final = script.main(base_args(tiny_npz, out, "--epochs", "1", "--samples", "1",
                                  "--conditional", "--channels-last"))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 32 images / batch 8 = 4 steps
    for r in records:
        assert {"train_bpd", "lr", "images_per_s", "wall_s"} <= set(r)
        assert 0 < r["train_bpd"] < 16 and r["images_per_s"] > 0
    assert records[-1]["test_bpd"] == final["test_bpd"] and 0 < final["test_bpd"] < 16
    png = Path(final["samples"])
    width, height, colour, _ = decode_png(png.read_bytes())
    assert (width, height, colour) == (36, 36, 2)  # one 32x32 RGB image + 2-pixel border
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert {"model", "ema", "optimizer", "scheduler", "rng", "batches", "settings"} <= set(ckpt)
    assert ckpt["model_spec"]["backbone_kwargs"]["num_classes"] == 10
    again = script.main(["--eval-only", str(out / "checkpoint.pt"), "--samples", "0",
                         "--device", "cpu"])
    assert again["test_bpd"] == final["test_bpd"]  # same EMA weights, same float32 evaluation


def test_script_resume_reproduces_losses_exactly(script, tiny_npz: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    # Dropout on, so that exactness needs the RNG state; 6 steps cross an epoch boundary.
    args = ["--steps", "6", "--checkpoint-every", "3", "--dropout", "0.5"]
    script.main(base_args(tiny_npz, tmp_path / "full", *args))
    full = train_bpds(tmp_path / "full")
    assert len(full) == 6

    original = Trainer.train_step

    def interrupted(self):
        if self.step == 4:  # the step-4 record is written, the last checkpoint is at step 3
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main(base_args(tiny_npz, tmp_path / "cut", *args))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert len(train_bpds(tmp_path / "cut")) == 4
    script.main(base_args(tiny_npz, tmp_path / "cut", *args, "--resume"))
    assert train_bpds(tmp_path / "cut") == full  # bit-for-bit, and the log reads as one run
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_gloo_processes(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``script args`` under ``torch.distributed.run`` with two gloo processes on 127.0.0.1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # never look for a network interface
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
           "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_ddp_two_gloo_processes_match_one_process(script, tiny_npz: Path, tmp_path: Path) -> None:
    common = ["--steps", "2", "--dropout", "0"]  # no dropout: ranks draw different masks
    script.main(base_args(tiny_npz, tmp_path / "one", *common))
    args = base_args(tiny_npz, tmp_path / "two", *common)
    # Half the batch per process: the same global batch of 8 as the single process.
    args[args.index("--batch-size") + 1] = "4"
    proc = _run_two_gloo_processes(SCRIPT, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Weight norm's g of the transposed convolutions had strides (1, 1, 1, 1) where autograd
    # gives its gradient (C, 1, 1, 1): DDP warned on every rank until the trainer relaid it.
    assert "Grad strides do not match bucket view strides" not in proc.stderr
    one, two = train_bpds(tmp_path / "one"), train_bpds(tmp_path / "two")
    assert len(one) == len(two) == 2
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # the same images, the same weights
    assert two[1] == pytest.approx(one[1], rel=1e-5)  # gradients were averaged over ranks
    settings = json.loads((tmp_path / "two" / "settings.json").read_text())
    assert settings["batch_size"] == 4


# Run by both ranks: rank 0 writes the checkpoint through a torch.save slowed down by 2 s (a
# slow disk), rank 1 looks for the file as soon as save() returns. The final checkpoint of a
# run is the case that matters: a rank that exits, or resumes from the path, before rank 0 has
# renamed the file into place finds nothing.
SAVE_ON_TWO_RANKS = """
import sys, time
from pathlib import Path

import torch

import discretelik as dl
from discretelik.train import Trainer, TrainConfig, cleanup_distributed, init_distributed, load_checkpoint

dist = init_distributed("cpu")
path = Path(sys.argv[1])
if dist.is_main:
    unslowed_save = torch.save

    def slow_save(*args, **kwargs):
        time.sleep(2.0)
        unslowed_save(*args, **kwargs)

    torch.save = slow_save
torch.manual_seed(0)
model = dl.build("pixelcnn++", "dlm", preset="tiny", head_kwargs={"mixtures": 2})
trainer = Trainer(model, torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
                  config=TrainConfig(batch_size=4), dist=dist)
trainer.save(path)
present = path.is_file()
if present:
    assert load_checkpoint(path)["step"] == 0  # the complete file, loadable from any rank
print(f"rank {dist.rank}: checkpoint present when save() returned: {present}", flush=True)
cleanup_distributed()
sys.exit(0 if present else 1)
"""


def test_save_returns_on_every_rank_only_once_the_checkpoint_is_written(tmp_path: Path) -> None:
    # Checked to fail without the barrier in Trainer.save: with that line removed, rank 1
    # printed "present when save() returned: False" and the run exited non-zero.
    child = tmp_path / "save_on_two_ranks.py"
    child.write_text(SAVE_ON_TWO_RANKS)
    proc = _run_two_gloo_processes(child, str(tmp_path / "ckpt.pt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: checkpoint present when save() returned: True" in proc.stdout


def test_script_wrong_data_path_is_a_clear_error(script, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        script.main(["--data", str(tmp_path / "nope"), "--device", "cpu", "--out",
                     str(tmp_path / "out")])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(bad), "--device", "cpu",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: {bad}: not a readable .npz file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_benchmark_script_prints_the_table(tmp_path: Path) -> None:
    bench = ROOT / "examples" / "benchmarks" / "train_step.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--steps", "1",
                           "--warmup", "1", "--batch-size", "2", "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == ("| mode | images/s | peak process RSS | speed vs eager fp32 | "
                       "first step after |")
    # first step after: launch of the mode's process to the end of its first (warm-up) step
    assert rows[2].startswith("| eager fp32 |") and re.search(r"\| 1\.00x \| \d+\.\d s \|$", rows[2])
    assert rows[3].startswith("| bf16 autocast |") and rows[3].endswith(" s |")
    assert "skipped on CPU" in rows[4]


def test_log_prob_backend_flag(script, tiny_npz: Path, tmp_path: Path, monkeypatch) -> None:
    """--log-prob-backend reaches the head as a build option of this run (head_kwargs), is
    kept in the settings, and stays out of the checkpoint's model_spec, so that a model
    trained with a GPU-only backend reloads anywhere."""
    built: list[dict] = []
    original = dl.build

    def recording_build(*args, **kwargs):
        built.append(dict(kwargs.get("head_kwargs") or {}))
        return original(*args, **kwargs)

    monkeypatch.setattr(script.dl, "build", recording_build)
    script.main(base_args(tiny_npz, tmp_path / "eager", "--steps", "1",
                          "--log-prob-backend", "eager"))
    assert built == [{"mixtures": 5, "log_prob_backend": "eager"}]
    settings = json.loads((tmp_path / "eager" / "settings.json").read_text())
    assert settings["log_prob_backend"] == "eager"
    ckpt = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")
    assert ckpt["model_spec"]["head_kwargs"] == {"mixtures": 5}
    built.clear()
    script.main(base_args(tiny_npz, tmp_path / "default", "--steps", "1"))
    assert built == [{"mixtures": 5}]  # no backend given: the head's own choice
    with pytest.raises(ValueError, match="triton"):
        script.main(base_args(tiny_npz, tmp_path / "softmax", "--steps", "1", "--head",
                              "softmax", "--log-prob-backend", "triton"))
