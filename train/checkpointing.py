"""Training-state checkpoints with Orbax's `CheckpointManager`.

A checkpoint holds the trainable adapters, the optimizer state (ZClip statistics included) and
the RNG as one pytree, plus JSON metadata: the step and the data iterator's position. Orbax
writes each step into a temporary directory and renames it when complete, so a crash during a
save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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
