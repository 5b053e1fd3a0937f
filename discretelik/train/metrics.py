"""A JSON-lines metrics log: one JSON object per line, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]


def _plain(value: Any) -> Any:
    # Tensors and numpy scalars become Python numbers; NaN/inf become null so that every line
    # is strict JSON (json.dumps would write the non-standard NaN token).
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append metric records to a ``.jsonl`` file (only where ``enabled``, e.g. rank 0).

    Records are whatever keyword arguments are given; the trainer writes ``step``,
    ``train_bpd``, ``test_bpd``, ``images_per_s``, ``lr`` and ``wall_s``.

    Args:
        path: The ``.jsonl`` file; created with its directory on first write.
        enabled: When false every method is a no-op (non-main DDP ranks).

    Example:
        >>> log = MetricsLog("runs/demo/metrics.jsonl")  # doctest: +SKIP
        >>> log.write(step=10, train_bpd=5.1, lr=1e-3)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = bool(enabled)

    def write(self, **record: Any) -> dict[str, Any]:
        """Append one record; returns it with values converted to plain JSON types."""
        clean = {k: _plain(v) for k, v in record.items()}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean) + "\n")
        return clean

    def truncate_after(self, step: int) -> None:
        """Drop records whose ``step`` is greater than ``step``.

        Used on resume: records written after the checkpoint by the interrupted run are
        replaced by the ones the resumed run writes, so the log reads like one run.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read every record of a JSON-lines log (a torn last line from a crash is skipped).

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The records in file order.
    """
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the next write starts a new line
    return records
