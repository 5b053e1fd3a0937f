"""Shared by the benchmark scripts: the environment of a run and its Markdown fragment.

Each script in this folder takes ``--markdown PATH`` and, after printing its table as before,
writes the same results to ``PATH`` as a self-contained Markdown fragment (``docs/performance.md``
includes them): the exact command, the device, torch version, thread count, sizes, repeats,
the date, the load average of the machine, then the table and the script's notes.

The scripts run as ``python examples/benchmarks/X.py``, so this folder is ``sys.path[0]`` and
they import this module as ``_report``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
# Environment variables that change what a benchmark measures; recorded in the command.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3 (CUDA 12.8)`` or ``Intel(R) Xeon(R) Processor, 2 logical CPUs``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def command(script: str, argv: Sequence[str]) -> str:
    """The command line that ran ``script`` with ``argv``, thread variables that were set first."""
    path = Path(script).resolve()
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = str(path)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in THREAD_VARS if k in os.environ]
    return " ".join([*env, "python", shlex.quote(shown), *map(shlex.quote, argv)])


def git_commit() -> str | None:
    """``abc1234`` or ``abc1234 + uncommitted changes``; None outside a git checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" + uncommitted changes" if dirty else "")


def load_average() -> str:
    """The 1-minute load average, ``n/a`` where the OS has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


class Run:
    """What a report says about the run besides its table: start it before measuring."""

    def __init__(self, script: str, argv: Sequence[str] | None, device: torch.device) -> None:
        self.script = Path(script).name
        self.command = command(script, sys.argv[1:] if argv is None else argv)
        self.device = torch.device(device)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_start = load_average()

    def header(self, threads: int, sizes: str, repeats: str) -> list[str]:
        """The lines above the table; ``threads`` is the CPU thread count the work ran with."""
        commit = git_commit()
        fields = [
            f"device: {self.device.type} ({device_name(self.device)})",
            f"torch {torch.__version__}",
            f"{threads} CPU thread{'s' if threads != 1 else ''}",
            sizes,
            repeats,
            self.started.strftime("%Y-%m-%d %H:%M UTC"),
            f"load average {self.load_start} at start, {load_average()} at end",
        ]
        if commit:
            fields.append(f"commit {commit}")
        return [f"`{self.command}`", "", "; ".join(fields)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has one ``l`` or ``r`` per column."""
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("every row and align need one entry per column")
    rule = ["---" if a == "l" else "---:" for a in align]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(rule), *map(line, rows)])


def write_markdown(
    path: str | os.PathLike,
    run: Run,
    *,
    title: str,
    header: list[str],
    table: str,
    notes: Sequence[str] = (),
) -> None:
    """Write one fragment: a comment naming its source, the header lines, table and notes."""
    lines = [
        f"<!-- Written by {run.script} --markdown; regenerate it rather than edit it. -->",
        "",
        f"**{title}**",
        "",
        *header,
        "",
        table,
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
