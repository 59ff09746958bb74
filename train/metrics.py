"""Per-step metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """All records of RUN/metrics.jsonl (a resumed run's repeated steps keep the latest)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


class MetricsWriter:
    """Appends step records to metrics.jsonl and TensorBoard (scalars; lists per layer).

    With `files=False` (every process of a multi-process run but process 0) nothing is written:
    the records are only kept in memory, and `last` and `summary` cover this session's steps.
    """

    def __init__(self, run: Path, tensorboard: bool = True, append: bool = False, files: bool = True) -> None:
        self.run = Path(run)
        self._records: list[dict[str, Any]] = []
        self._file = open(self.run / "metrics.jsonl", "a" if append else "w") if files else None
        self._tb = None
        if tensorboard and files:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it logged
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/layer_{i:02d}", x, step)
                else:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def records(self) -> list[dict[str, Any]]:
        """Every record of the run (resumes included), or of this session without files."""
        return read_metrics(self.run) if self._file is not None else list(self._records)

    def last(self, key: str) -> Any:
        values = [r[key] for r in self.records() if key in r]
        return values[-1] if values else None

    def summary(self) -> dict[str, Any]:
        """Peak/mean gradient norm, clip and skip counts over the whole run (resumes included)."""
        records = self.records()
        norms = np.asarray([r["grad_norm"] for r in records if np.isfinite(r["grad_norm"])])
        return {
            "peak_grad_norm": float(norms.max()) if norms.size else None,
            "mean_grad_norm": float(norms.mean()) if norms.size else None,
            "clip_count": int(sum(bool(r.get("zclip/clipped")) for r in records)),
            "skipped_steps": int(sum(bool(r.get("zclip/skipped")) for r in records)),
            "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in records[1:]])) if len(records) > 1 else None,
        }
