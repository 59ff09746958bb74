"""Run directories: a program never silently reuses or overwrites an earlier run.

Without `--resume`, a non-empty output directory is refused. With `--resume`, the directory's
saved `config.yaml` must agree with the new settings in everything that changes results; the
error names every key that differs.

One writer per run directory: `claim_run` takes an exclusive lock (`fcntl.flock` on RUN/.lock,
which records the holder's PID and host) before it looks at anything, and the run holds it until
it ends. A second process fails at once and names the holder. The kernel drops the lock of a
process that dies, so a killed run's lock is taken over, and the takeover is said.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from crma_jax import distributed
from crma_jax.train import stops
from crma_jax.train.config import current_names
from crma_jax.atomic import COMMITTED, STAGING, commit, recover, write_text  # noqa: F401 - re-exported (`crma cl`)

CONFIG_FILE = "config.yaml"
# Settings that change where and how a run is written or logged, never what it computes.
RESULT_NEUTRAL = frozenset({"out", "resume", "plots", "samples", "report_to", "wandb_project", "checkpoint_every", "keep_checkpoints",
                            "eval_every", "debug", "remat", "attention", "compile_only", "target",
                            "tensorboard",  # a run saved before --report-to replaced it
                            # how the processes of one run find each other, not what they compute
                            "distributed", "coordinator_address", "num_processes", "process_id"})
_MISSING = "<not set>"
LOCK_FILE = ".lock"


class RunInUse(FileExistsError):
    """Another process holds the run directory's lock."""


class RunLock:
    """The exclusive lock on a run directory (module docstring); `release()` gives it back."""

    def __init__(self, out: Path | None, fd: int = -1, created: bool = False) -> None:
        self.out, self._fd, self._created = out, fd, created

    @classmethod
    def acquire(cls, out: str | Path) -> RunLock:
        """Lock `out` (created if absent), or raise RunInUse naming the holder."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory; choose a new --out")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"{out}: in use by {holder}; wait for that run to end, or choose a new --out") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:  # a clean release empties the file: this holder died holding it
            print(f"{out}: taking over the lock of {previous}, which ended without releasing it",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        return cls(out, fd, created)

    def release(self) -> None:
        """Give the lock back (idempotent). A directory that `acquire` created and nothing else
        wrote into is removed, so a run that failed before writing leaves no trace."""
        if self._fd < 0:
            return
        assert self.out is not None
        if self._created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            (self.out / LOCK_FILE).unlink()
            self.out.rmdir()
        else:
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1


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
    if not out.is_dir() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return
    if not resume:
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it, or choose a new --out")
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file():
        raise FileExistsError(f"{out}: is not empty and has no {CONFIG_FILE}, so it is no run to resume; "
                              f"choose a new --out")
    try:
        saved = current_names(yaml.safe_load(saved_file.read_text()) or {})
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


@contextlib.contextmanager
def claim_run(out: str | Path, config: Any, resume: bool, launch: distributed.Launch) -> Iterator[None]:
    """The run's hold on `out`, for the `with` block: join the multi-process run `launch`
    describes (if any), lock `out` (process 0 holds the lock), then `check_run_dir` in every
    process, and let none go on before all have looked (so process 0's first write cannot make
    another process find the directory taken). The lock is released when the block ends."""
    distributed.initialize(launch)
    stops.reinstall()  # joining took SIGTERM over (JAX's preemption notifier)
    lock, refused = RunLock(None), None
    if distributed.is_writer():
        try:
            lock = RunLock.acquire(out)
        except RunInUse as e:
            refused = e
    if distributed.any_process(refused is not None):
        raise refused or RunInUse(f"{out}: in use by another run (process 0 could not lock it)")
    try:
        check_run_dir(out, config, resume)
        distributed.sync(f"checked {out}")
        yield
    finally:
        lock.release()


def write_config(out: str | Path, config: Any) -> Path:
    """Create `out` if needed and write `config.yaml` (the effective settings); in a
    multi-process run only process 0 writes."""
    out = Path(out)
    path = out / CONFIG_FILE
    if distributed.is_writer():
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, yaml.safe_dump(settings_of(config), sort_keys=False))
    return path


def read_config(run: str | Path, config_type: type | None = None) -> dict[str, Any]:
    """A run's saved settings; FileNotFoundError naming the file when it has none. With a
    dataclass `config_type`, a setting added since the run was saved reads as its default."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {run} a crma run directory?")
    saved = current_names(yaml.safe_load(path.read_text()) or {})
    return {**defaults(config_type), **saved} if config_type is not None else saved


