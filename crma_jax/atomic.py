"""Atomic replacement of files and directories: a kill at any point leaves the old version or
the new one, never a mix and never neither.

`atomic_file(target)`: one file, written through a temporary file beside it that replaces
`target` only when the whole write succeeded; `write_text(target, text)` writes a text file so.

`atomic_dir(out, write)`: a new directory, written into a hidden staging sibling that is renamed
to `out` only when `write` succeeded (what `crma convert` and `crma export` write, and the
SmolLM2 cache).

`commit(root, write)`: `write(staging)` writes the new entries (files or directories) into an
empty staging directory inside `root`; one rename commits them; they are then moved into place,
replacing the old ones. `recover(root)` finishes a commit that a kill cut short (moving the
committed entries into place) or drops one that never committed; `commit` and every reader that
needs the entries (`crma_jax.adapter_files.load_adapters`) call it first.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable

STAGING, COMMITTED = ".commit-staging", ".commit-ready"


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file to write `target` through: a temporary file beside it (`.NAME.*.part`), given
    `mode` and renamed over `target` when the block ends without an exception, removed when it
    raises. A concurrent reader sees the old file or the whole new one."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, mode)  # mkstemp makes it owner-only; shared caches and runs are read by others
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    """`Path(target).write_text(text)` through `atomic_file`: a kill leaves the old file or the new
    one, never a cut one (what `--resume` reads back: remat.json, config.yaml, results.json)."""
    with atomic_file(target) as f:
        f.write(text.encode())


def commit(root: str | Path, write: Callable[[Path], None]) -> None:
    """Replace the entries that `write(staging)` writes, in `root`, as one (module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    staging = root / STAGING
    staging.mkdir()
    write(staging)
    os.rename(staging, root / COMMITTED)  # the commit point
    recover(root)


def recover(root: str | Path) -> None:
    """Finish an interrupted `commit` in `root`: move a committed one into place (again, if it
    was cut short), drop one that never committed. Does nothing when none was interrupted."""
    root = Path(root)
    ready = root / COMMITTED
    if ready.is_dir():
        for entry in sorted(ready.iterdir()):
            target = root / entry.name
            if entry.is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(entry, target)
        ready.rmdir()
    if (root / STAGING).exists():
        shutil.rmtree(root / STAGING)


def _staging_prefix(out: Path) -> str:
    # The host too: a directory shared by several machines (a cluster's file system, the SmolLM2
    # cache) holds other hosts' staging directories, whose processes this one cannot see.
    return f".{out.name}.partial-{socket.gethostname()}-"


def remove_orphans(out: Path) -> None:
    """Remove the staging directories of `out` (`.OUT.partial-HOST-PID-*`) that this host's
    processes left and that no longer run, saying so; those of a live process, or of another
    host, are left alone."""
    prefix = _staging_prefix(out)
    for staging in out.parent.glob(glob.escape(prefix) + "*"):
        pid = staging.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        print(f"{staging}: removing what a killed run left behind", file=sys.stderr)
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(dir)` on an empty staging directory, renamed to `out` only if it succeeds.

    `out` must not exist; the staging directory is a hidden sibling, `.OUT.partial-HOST-PID-*`,
    removed on any failure; one that a killed process left behind is removed by the next call for
    the same `out` (`remove_orphans`).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        (staging / "out").mkdir()
        write(staging / "out")
        os.rename(staging / "out", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
