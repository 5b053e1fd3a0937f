"""Test bits/dim against wall clock of a ``train_cifar10.py`` run, as a Markdown fragment.

Reads ``metrics.jsonl`` (and ``settings.json`` and ``environment.json`` when present) of a run
directory written by ``examples/train_cifar10.py`` and prints a table with one row per
evaluation: step, wall clock since launch, test bits/dim and the pass that gave it (float32,
or the checked bf16/tf32 pass), its time, and the training figures of that record.

    python examples/benchmarks/metrics_to_markdown.py runs/cifar10-gpu-20min \\
        --markdown docs/performance/cifar10-20min-cuda.md

``--markdown PATH`` also writes the table as a fragment for ``docs/performance/`` (see
``_report.py``); the header names the command, the run's device, torch version and recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

COLUMNS = ["step", "wall clock", "test bits/dim", "test pass", "test pass s", "train bits/dim",
           "images/s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="output directory of train_cifar10.py (holds metrics.jsonl)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    return p.parse_args(argv)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a clear error for a missing or malformed file."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (is the run directory right?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: {path}:{number}: not JSON ({exc.msg})") from None
    return records


def read_optional(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def rows_of(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per record with a test figure."""
    rows = []
    for r in records:
        if r.get("test_bpd") is None:
            continue
        train = r.get("train_bpd")
        speed = r.get("images_per_s")
        seconds = r.get("test_s")
        rows.append([
            str(r["step"]),
            minutes(r["wall_s"]) if r.get("wall_s") is not None else "-",
            f"{r['test_bpd']:.4f}",
            r.get("test_precision", "fp32"),
            f"{seconds:.1f}" if seconds is not None else "-",
            f"{train:.4f}" if train is not None else "-",
            f"{speed:.0f}" if speed is not None else "-",
        ])
    return rows


def notes_of(records: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    notes = [
        ("wall clock: time since the script was launched (data loading, the data-dependent "
         "init, compilation and every evaluation included)"),
        ("test bits/dim: the whole test split, Polyak-averaged (EMA) weights; 'fp32' rows are "
         "true float32, 'bf16'/'tf32' rows the fast pass checked against float32 at the first "
         "evaluation"),
    ]
    first = next((r["first_step_s"] for r in records if r.get("first_step_s") is not None), None)
    if first is not None:
        notes.append(f"first training step finished {first:.1f} s after launch")
    check = next((r for r in records if r.get("test_bpd_fast") is not None), None)
    if check is not None:
        notes.append(
            f"fast-pass check at step {check['step']}: {check['test_bpd_fast']:.5f} "
            f"({check.get('test_precision_fast', settings.get('eval_precision', 'fast'))}) vs "
            f"{check['test_bpd']:.5f} float32, difference {check['test_bpd_fast_diff']:+.2e}"
            + (f"; {check['test_fast_s']:.1f} s vs {check['test_s']:.1f} s"
               if check.get("test_fast_s") is not None and check.get("test_s") is not None
               else "")
        )
    stop = next((r for r in records if r.get("time_budget_s") is not None), None)
    if stop is not None:
        budget = stop["time_budget_s"]
        shown = f"{budget / 60:g} min" if budget >= 60 else f"{budget:g} s"
        notes.append(f"time budget {shown} spent: training stopped at step {stop['step']}")
    return notes


def main(argv: list[str] | None = None) -> list[list[str]]:
    args = parse_args(argv)
    run_dir = Path(args.run)
    records = read_json_lines(run_dir / "metrics.jsonl")
    settings = read_optional(run_dir / "settings.json")
    env = read_optional(run_dir / "environment.json")
    rows = rows_of(records)
    if not rows:
        raise SystemExit(f"error: {run_dir / 'metrics.jsonl'} has no record with test_bpd")
    table = markdown_table(COLUMNS, rows, "rrrlrrr")
    device = env.get("device", "unknown device")
    described = ", ".join(
        f"{k} {settings[k]}" for k in ("recipe", "preset", "batch_size", "precision", "compile",
                                       "lr", "lr_schedule", "ema_decay", "time_budget")
        if k in settings
    )
    print(f"test bits/dim against wall clock of {run_dir} ({described}; {device}, torch "
          f"{env.get('torch', '?')})")
    print()
    print(table)
    notes = notes_of(records, settings)
    for note in notes:
        print(f"- {note}")
    if args.markdown:
        kind = env.get("device_type", "unknown")
        run = Run(__file__, argv, torch.device("cpu"))
        header = [f"`{run.command}`", "",
                  f"run: {described}; device: {device}; torch {env.get('torch', '?')}"
                  + (f"; commit {env['commit']}" if env.get("commit") else "")
                  + (f"; started {env['started']}" if env.get("started") else "")]
        write_markdown(args.markdown, run,
                       title=f"PixelCNN++ on CIFAR-10: test bits/dim against wall clock, on {kind}",
                       header=header, table=table, notes=notes)
        print(f"\nwrote {args.markdown}")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
