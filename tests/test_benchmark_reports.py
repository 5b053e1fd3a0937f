"""The benchmark scripts' ``--markdown`` fragments, and the performance page that includes them.

The helper ``examples/benchmarks/_report.py`` is tested on fake results; each script runs once
in its smallest CPU configuration (a few seconds each) and its fragment is checked against the
table it printed. The fragments under ``docs/performance/`` must be what the command in their
header wrote to that path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "examples" / "benchmarks"
PAGE = ROOT / "docs" / "performance.md"


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _report

    return _report


def test_markdown_table(report) -> None:
    table = report.markdown_table(
        ["name", "time ms", "note"], [["a", "1.0", "x|y"], ["b", "2.5", "-"]], "lrl"
    )
    assert table.splitlines() == [
        "| name | time ms | note |",
        "| --- | ---: | --- |",
        "| a | 1.0 | x\\|y |",
        "| b | 2.5 | - |",
    ]
    with pytest.raises(ValueError):
        report.markdown_table(["a", "b"], [["1"]], "lr")
    with pytest.raises(ValueError):
        report.markdown_table(["a", "b"], [["1", "2"]], "l")


def test_write_markdown(report, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = report.Run(str(BENCH / "likelihood.py"), ["--batch", "2", "--note", "a b"], "cpu")
    out = tmp_path / "sub" / "x.md"
    report.write_markdown(
        out,
        run,
        title="A title",
        header=run.header(3, "B=2", "median of 4"),
        table=report.markdown_table(["k", "v"], [["a", "1"]], "lr"),
        notes=["first note", "second note"],
    )
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("<!-- Written by likelihood.py --markdown")
    assert "**A title**" in lines
    assert "`OMP_NUM_THREADS=1 python examples/benchmarks/likelihood.py --batch 2 --note 'a b'`" \
        in lines
    env = next(line for line in lines if line.startswith("device: cpu ("))
    for field in (f"torch {torch.__version__}", "3 CPU threads", "B=2", "median of 4",
                  "load average "):
        assert field in env
    assert re.search(r"; \d{4}-\d\d-\d\d \d\d:\d\d UTC;", env)
    assert "| a | 1 |" in lines
    assert lines[-2:] == ["- first note", "- second note"]


def run_bench(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / name), "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def md_rows(text: str) -> list[list[str]]:
    """Body rows of the fragment's table, as cells."""
    rows = [line for line in text.splitlines() if line.startswith("| ")][2:]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


def header_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("device: "))


def test_likelihood_markdown(tmp_path: Path) -> None:
    out = tmp_path / "likelihood.md"
    printed = run_bench("likelihood.py", "--batch", "1", "--repeats", "1", "--markdown", str(out))
    text = out.read_text()
    assert f"--markdown {out}`" in text
    env = header_line(text)
    for field in ("1 CPU thread", "B=1, K=10, 32x32x3, 256 levels", "median of 1",
                  f"torch {torch.__version__}"):
        assert field in env
    rows = md_rows(text)
    assert [r[0] for r in rows] == ["port-style (baseline)", "eager DLM head", "lean DLM head"]
    for r in rows:  # the same figures the script printed, cell by cell
        assert r[1:] in [line.split()[-7:] for line in printed.splitlines()
                         if line.startswith(r[0] + " ")]
        assert len(r) == 8
    assert rows[0][-2:] == ["1.00", "1.00"]
    assert "- triton DLM head: skipped (needs CUDA" in text
    assert "- lean DLM head: mean log-likelihood" in text and "vs eager" in text


@pytest.mark.parametrize(
    "head, sizes, names, unit",
    [
        ("gaussian", "B=1, K=10, 32x32x3, 256 levels",
         ["eager Gaussian head", "lean Gaussian head"], "x BKCHW"),
        ("softmax", "B=1, 32x32x3, 256 levels, 256-way softmax",
         ["port-style (baseline)", "eager softmax head", "lean softmax head"], "x logits"),
    ],
)
def test_likelihood_other_heads_markdown(tmp_path: Path, head, sizes, names, unit) -> None:
    out = tmp_path / f"likelihood-{head}.md"
    printed = run_bench("likelihood.py", "--head", head, "--batch", "1", "--repeats", "1",
                        "--markdown", str(out))
    text = out.read_text()
    assert f"--device cpu --head {head} --batch 1 --repeats 1 --markdown {out}`" in text
    assert sizes in header_line(text)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[3] == unit
    assert f" {unit} " in next(line for line in printed.splitlines()
                               if line.startswith("implementation "))
    rows = md_rows(text)
    assert [r[0] for r in rows] == names
    for r in rows:  # the same figures the script printed, cell by cell
        assert r[1:] in [line.split()[-7:] for line in printed.splitlines()
                         if line.startswith(r[0] + " ")]
        assert len(r) == 8
    assert rows[0][-2:] == ["1.00", "1.00"]
    assert "triton" not in text
    for name in names:  # every row agrees with the eager head (the softmax baseline too)
        note = next(line for line in text.splitlines() if line.startswith(f"- {name}: "))
        assert "vs eager: |d value| " in note
        assert float(note.split("|d value| ")[1].split(",")[0]) < 1e-3, note


def test_sampling_markdown(tmp_path: Path) -> None:
    out = tmp_path / "sampling.md"
    printed = run_bench("sampling.py", "--size", "4", "--n", "1", "--repeats", "1",
                        "--markdown", str(out))
    text = out.read_text()
    env = header_line(text)
    assert "1 images of 4x4x3" in env and "median of 1 draws" in env
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == ("| model | params | naive s | cached s | speed-up | max abs param diff "
                        "| bits/dim |")
    rows = md_rows(text)
    assert [r[0] for r in rows] == ["pixelcnn++ small (32 filters, 2 resnets)",
                                    "gated small (32 ch, 8 layers)"]
    for r in rows:
        printed_row = next(line for line in printed.splitlines() if line.startswith(r[0]))
        assert printed_row.split()[-6:] == r[1:]
        assert float(r[-2]) < 1e-5  # cached step vs full forward: rounding only (float32)
        assert 0 < float(r[-1]) < 8  # bits/dim of 256-level sub-pixels
    assert "- max abs param diff: the largest absolute difference" in text
    assert "- bits/dim: the cached draw's" in text


def test_train_step_markdown(tmp_path: Path) -> None:
    out = tmp_path / "train_step.md"
    printed = run_bench("train_step.py", "--steps", "1", "--warmup", "0", "--repeats", "2",
                        "--batch-size", "2", "--threads", "1", "--markdown", str(out))
    text = out.read_text()
    env = header_line(text)
    assert "preset 'tiny', 5 mixtures, batch 2" in env and "median of 2 windows of 1 steps after 0 warm-up" in env
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table == [line for line in printed.splitlines() if line.startswith("| ")]
    assert [r[0] for r in md_rows(text)] == ["eager fp32", "bf16 autocast",
                                             "bf16 autocast + triton DLM",
                                             "bf16 + channels_last + compile",
                                             "bf16 + channels_last + regional compile",
                                             "bf16 + channels_last + compile + triton DLM"]
    assert "- loss (bits/dim) of the last timed step: eager fp32 " in text


# likelihood.py --head: the title and unit column of its table.
LIKELIHOOD_HEADS = {
    "dlm": ("DLM log-likelihood", "x BKCHW"),
    "gaussian": ("Discretized Gaussian mixture log-likelihood", "x BKCHW"),
    "softmax": ("Softmax log-likelihood", "x logits"),
}


def test_performance_page_fragments_come_from_their_commands() -> None:
    includes = re.findall(r'^--8<-- "([^"]+)"$', PAGE.read_text(), flags=re.M)
    assert includes, "docs/performance.md includes no fragment"
    for rel in includes:
        text = (ROOT / rel).read_text()
        script = re.match(r"<!-- Written by (\w+\.py) --markdown", text)
        assert script, f"{rel} was not written by a benchmark script"
        command = re.search(r"^`(.*)`$", text, flags=re.M).group(1)
        assert f"python examples/benchmarks/{script.group(1)} " in command, rel
        assert command.endswith(f"--markdown {rel}"), f"{rel}: {command}"
        assert md_rows(text), f"{rel} has no table rows"
        if script.group(1) == "likelihood.py":  # the head the command names is the table's
            head = re.search(r" --head (\w+)", command)
            title, unit = LIKELIHOOD_HEADS[head.group(1) if head else "dlm"]
            assert f"**{title}, forward + backward, on " in text, rel
            assert text.split("\n| ", 1)[1].split(" | ")[3] == unit, rel
    fragments = {f"docs/performance/{p.name}" for p in (ROOT / "docs" / "performance").glob("*.md")}
    assert sorted(includes) == sorted(fragments), "each fragment is included once, nothing else"


def test_performance_page_describes_every_train_step_mode() -> None:
    """The page's prose names the training-step modes its table shows, the CUDA-only one that
    compiles the step with the Triton DLM kernels included."""
    section = PAGE.read_text().split("### Training step: `train_step.py`")[1].split("\n## ")[0]
    prose = " ".join(section.split())
    assert "Triton" in prose and 'log_prob_backend = "triton"' in prose, prose
