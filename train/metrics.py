"""Per-step metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to the trackers of
`--report-to` (TensorBoard, W&B)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from crma_jax.train.jsonl import cut_damaged_end, read_lines


METRICS_FILE = "metrics.jsonl"


def _parse(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a record, or None if it is not one (cut short, NUL bytes, not JSON)."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """All readable records of RUN/metrics.jsonl, one per step (a resumed run's repeated steps
    keep the latest). Unreadable lines (a line cut by a crash or a full disk, NUL bytes) are
    skipped and reported on stderr with their line numbers, so a damaged log never blocks a run."""
    path = Path(run) / METRICS_FILE
    lines = read_lines(path, _parse)
    by_step = {rec["step"]: rec for rec in lines.records}
    bad = [*lines.unreadable, *([lines.cut] if lines.cut is not None else [])]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        print(f"{path}: line {bad[0]}{more} unreadable (cut short or overwritten); skipped", file=sys.stderr)
    return [by_step[s] for s in sorted(by_step)]


def logged_steps(run: Path) -> int:
    """How many steps RUN/metrics.jsonl records (0 without the file)."""
    return len(read_metrics(run)) if (Path(run) / METRICS_FILE).is_file() else 0


def require_nothing_lost(run: Path) -> None:
    """For `--resume` without a checkpoint that restores: starting over at step 0 is allowed only
    when the earlier attempt logged no step; otherwise FileExistsError naming RUN."""
    steps = logged_steps(run)
    if steps:
        raise FileExistsError(f"{run}: --resume found no checkpoint to continue from, but {METRICS_FILE} records "
                              f"{steps} steps of an earlier attempt; starting over would lose them. Choose a new "
                              "--out, or delete the directory to start again")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A step record as flat scalars for a tracker: a per-layer list `k` becomes `k/layer_00`, ..."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "step":
            continue
        if isinstance(v, list):
            out.update({f"{k}/layer_{i:02d}": float(x) for i, x in enumerate(v)})
        else:
            out[k] = float(v)
    return out


class TensorBoardTracker:
    """TensorBoard events in RUN/tb."""

    def __init__(self, run: Path, config: dict[str, Any], project: str) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run / "tb"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run (the `wandb` extra), named by RUN's path (so the domains of every
    `crma cl` method and seed are told apart) and kept under RUN/wandb. Its id is stored in
    RUN/wandb_id, so a resumed run continues the same W&B run. `WANDB_MODE=offline` records it
    without a network (`wandb sync` uploads it later)."""

    def __init__(self, run: Path, config: dict[str, Any], project: str) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--report-to wandb needs the wandb package: pip install 'crma-jax[wandb]'") from None
        id_file = run / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        (run / "wandb").mkdir(exist_ok=True)
        self._run = wandb.init(project=project, name=run.as_posix(), id=run_id, resume="allow", dir=str(run),
                               config=config, reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class MetricsWriter:
    """Appends step records to metrics.jsonl and to each tracker (`--report-to`: TensorBoard,
    W&B), per-layer lists as one scalar per layer.

    With `files=False` (every process of a multi-process run but process 0) nothing is written:
    the records are only kept in memory, and `last` and `summary` cover this session's steps.
    """

    def __init__(self, run: Path, trackers: Sequence[str] = ("tensorboard",), append: bool = False, files: bool = True,
                 config: dict[str, Any] | None = None, wandb_project: str = "crma-jax") -> None:
        self.run = Path(run)
        self._records: list[dict[str, Any]] = []
        if files and append and (self.run / METRICS_FILE).is_file():
            path = self.run / METRICS_FILE
            if cut := cut_damaged_end(path, read_lines(path, _parse)):
                print(f"{path}: dropped {cut} unreadable bytes at its end (a line cut short)", file=sys.stderr)
        self._file = open(self.run / METRICS_FILE, "a" if append else "w") if files else None
        self._trackers = [TRACKER_CLASSES[t](self.run, config or {}, wandb_project) for t in trackers] if files else []

    def write(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it logged
        values = scalars(record)
        for tracker in self._trackers:
            tracker.log(record["step"], values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for tracker in self._trackers:
            tracker.close()

    def records(self) -> list[dict[str, Any]]:
        """Every record of the run (resumes included), or of this session without files."""
        return read_metrics(self.run) if self._file is not None else list(self._records)

    def last(self, key: str) -> Any:
        values = [r[key] for r in self.records() if key in r]
        return values[-1] if values else None

    def summary(self) -> dict[str, Any]:
        """Peak/mean gradient norm, clip and skip counts, tokens/s and the time spent in steps over
        the whole run (resumes included)."""
        records = self.records()
        norms = np.asarray([r["grad_norm"] for r in records if np.isfinite(r["grad_norm"])])
        return {
            "peak_grad_norm": float(norms.max()) if norms.size else None,
            "mean_grad_norm": float(norms.mean()) if norms.size else None,
            "clip_count": int(sum(bool(r.get("zclip/clipped")) for r in records)),
            "skipped_steps": int(sum(bool(r.get("zclip/skipped")) for r in records)),
            "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in records[1:]])) if len(records) > 1 else None,
            # Time inside the steps (the first one's compile-free run included), over all resumes.
            "train_step_s": round(float(sum(r["tokens"] / r["tokens_per_s"] for r in records
                                            if r.get("tokens_per_s") and "tokens" in r)), 2),
        }
