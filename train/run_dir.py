"""Run directories: a program never silently reuses or overwrites an earlier run.

Without `--resume`, a non-empty output directory is refused. With `--resume`, the directory's
saved `config.yaml` must agree with the new settings in everything that changes results; the
error names every key that differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from crma_jax import distributed
from crma_jax.atomic import COMMITTED, STAGING, commit, recover  # noqa: F401 - re-exported (`crma cl`)

CONFIG_FILE = "config.yaml"
# Settings that change where and how a run is written or logged, never what it computes.
RESULT_NEUTRAL = frozenset({"out", "resume", "plots", "report_to", "wandb_project", "checkpoint_every", "keep_checkpoints",
                            "eval_every", "debug", "remat", "attention", "compile_only", "target",
                            "tensorboard",  # a run saved before --report-to replaced it
                            # how the processes of one run find each other, not what they compute
                            "distributed", "coordinator_address", "num_processes", "process_id"})
_MISSING = "<not set>"


def settings_of(config: Any) -> dict[str, Any]:
    """A dataclass config (or a mapping) as a plain dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def defaults(config: Any) -> dict[str, Any]:
    """The default of each field of a dataclass config or config class ({} for a mapping)."""
    if not dataclasses.is_dataclass(config):
        return {}
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def check_run_dir(out: str | Path, config: Any, resume: bool, neutral: frozenset[str] = RESULT_NEUTRAL) -> None:
    """Raise unless `out` may receive this run: it is absent or empty, or `resume` is set and its
    saved config matches `config` outside `neutral` keys. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; choose a new --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not resume:
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it, or choose a new --out")
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        raise FileExistsError(f"{out}: is not empty and has no {CONFIG_FILE}, so it is no run to resume; "
                              f"choose a new --out")
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{saved_file}: unreadable ({e})") from e
    new = settings_of(config)
    # A setting added since the run was saved took its default then.
    saved = {**defaults(config), **saved}
    differing = sorted(k for k in set(saved) | set(new) if k not in neutral and saved.get(k, _MISSING) != new.get(k, _MISSING))
    if differing:
        changes = ", ".join(f"{k}: {saved.get(k, _MISSING)!r} -> {new.get(k, _MISSING)!r}" for k in differing)
        raise ValueError(f"{saved_file}: --resume with settings that differ from the saved run ({changes}); "
                         f"resume with the saved settings, or choose a new --out")


def begin_run(out: str | Path, config: Any, resume: bool, launch: distributed.Launch) -> None:
    """Join the multi-process run `launch` describes (if any), then `check_run_dir` in every
    process, and let none go on before all have looked (so process 0's first write cannot make
    another process find the directory taken)."""
    distributed.initialize(launch)
    check_run_dir(out, config, resume)
    distributed.sync(f"checked {out}")


def write_config(out: str | Path, config: Any) -> Path:
    """Create `out` if needed and write `config.yaml` (the effective settings); in a
    multi-process run only process 0 writes."""
    out = Path(out)
    path = out / CONFIG_FILE
    if distributed.is_writer():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(settings_of(config), sort_keys=False))
    return path


def read_config(run: str | Path, config_type: type | None = None) -> dict[str, Any]:
    """A run's saved settings; FileNotFoundError naming the file when it has none. With a
    dataclass `config_type`, a setting added since the run was saved reads as its default."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {run} a crma run directory?")
    saved = yaml.safe_load(path.read_text()) or {}
    return {**defaults(config_type), **saved} if config_type is not None else saved


