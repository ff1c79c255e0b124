"""Training metrics out of the workers: ``<run>/metrics.jsonl`` and TensorBoard event files.

Rank 0 writes one JSON line and one TensorBoard scalar per numeric metric per step (torch.utils.tensorboard;
the tensorboard package is a pinned dependency). On resume the lines of steps not covered by the checkpoint
are dropped first, so the file holds every step exactly once. The progress line is rank 0's
(dist.worker.progress_line, every ``train.log_every`` steps).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf
    return v


class MetricsWriter:
    """metrics.jsonl + TensorBoard events in ``run_dir`` (a local directory)."""

    def __init__(self, run_dir: str | Path, start_step: int = 0):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._truncate(start_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=start_step)
        except ImportError:  # tensorboard is pinned in pyproject; a stripped install still gets the jsonl
            self.tb = None

    def _truncate(self, start_step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["step"]) < start_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed worker
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
