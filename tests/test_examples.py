"""Every guide script in ``examples/guides/`` runs end to end at tiny sizes on CPU.

Each script runs in its own interpreter (plugins register names, which must not leak into
other tests) with ``--tiny`` and one thread, as CI runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "examples" / "guides"

# script -> a line its output must contain (a sign it reached the end, not only that it exited 0)
EXPECTED = {
    "quickstart.py": "samples: shape (2, 3, 4, 4), dtype torch.int64",
    "vae_decoder.py": "samples: shape (4, 3, 32, 32), dtype torch.int64",
    "vqvae_prior.py": "sampled codes (2, 1, 7, 7) -> images (2, 1, 28, 28) torch.int64",
    "plugins.py": "causality: ok",
    "choosing_a_head.py": "| head | bit depth | test bits/dim |",
    "pretrained.py": "samples: shape (2, 3, 8, 8), dtype torch.int64",
}


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.run(
        [sys.executable, str(GUIDES / name), "--tiny", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_guide_script_is_covered() -> None:
    assert sorted(p.name for p in GUIDES.glob("*.py")) == sorted(EXPECTED)


# Scripts that can write their samples as a PNG grid (``--out``).
WRITES_PNG = {"quickstart.py", "vae_decoder.py", "vqvae_prior.py"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_guide_script_runs_tiny(name: str, tmp_path: Path) -> None:
    png = tmp_path / "samples.png"
    out = run_script(name, *(["--out", str(png)] if name in WRITES_PNG else []))
    assert EXPECTED[name] in out
    if name in WRITES_PNG:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vqvae_prior_spatial_conditioning() -> None:
    assert "sampled codes" in run_script("vqvae_prior.py", "--cond", "spatial")
