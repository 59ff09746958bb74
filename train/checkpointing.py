"""Training-state checkpoints with Orbax's `CheckpointManager`.

A checkpoint holds the trainable adapters, the optimizer state (ZClip statistics included) and
the RNG as one pytree, plus JSON metadata: the step and the data iterator's position. Orbax
writes each step into a temporary directory and renames it when complete, so a crash during a
save leaves the previous checkpoint as the latest loadable one. A checkpoint damaged some other
way (a truncated file, garbage metadata) is moved aside by `restore_latest`, which then falls back
to the one before.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from crma_jax import distributed

ASIDE = "checkpoints.unreadable"  # RUN/ASIDE/<step>: checkpoints that failed to restore, kept


class SaveFailed(OSError):
    """Checkpoints could not be written (a full disk, a quota, permissions); names the directory,
    the step and the cause. The committed checkpoints before it are intact."""


@contextlib.contextmanager
def saving(mngr: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """Turn any failure of an Orbax save (or of an earlier asynchronous one, which surfaces here)
    into one `SaveFailed` line."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for a failed write
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        last = mngr.latest_step()
        kept = f"the last committed one (step {last}) is intact" if last is not None else "none was committed"
        raise SaveFailed(f"{mngr.directory}: saving a checkpoint failed by step {step} ({cause}); {kept}: make room, "
                         "then run again with --resume") from e


def checkpoint_manager(run_dir: Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def save_state(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving `state` (a pytree of arrays) and `meta` (JSON) as `step`; may return early (async)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore_state(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
    """(step, state, meta) of `step` (default: the latest), restored onto the shardings of `like`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint to resume from")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return step, restored["state"], restored["meta"]


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None when none does (or
    there is none). A checkpoint that fails is reported by path, with its error's first line, and
    moved to RUN/checkpoints.unreadable/<step> (kept, never deleted, and out of Orbax's sight).
    In a multi-process run every process tries each step, and a failure in any one counts for all.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored: tuple[int, Any, dict[str, Any]] | None = restore_state(mngr, like, step)
            error = ""
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint: Orbax, TensorStore, JSON
            restored, error = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not distributed.any_process(restored is None):
            return restored
        path = Path(mngr.directory) / str(step)
        aside = Path(mngr.directory).parent / ASIDE / str(step)
        if distributed.is_writer():
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():  # an earlier one of the same step: keep both
                aside = aside.with_name(f"{step}.{len(list(aside.parent.glob(f'{step}*')))}")
            shutil.move(path, aside)
            print(f"{path}: checkpoint of step {step} does not restore ({error or 'failed in another process'}); "
                  f"moved to {aside}, falling back to the one before", file=sys.stderr, flush=True)
        distributed.sync(f"moved checkpoint {step} aside")
        mngr.reload()
    return None
