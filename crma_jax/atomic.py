"""Atomic replacement of files and directories: a kill at any point leaves the old version or
the new one, never a mix and never neither.

`atomic_file(target)`: one file, written through a temporary file beside it that replaces
`target` only when the whole write succeeded.

`commit(root, write)`: `write(staging)` writes the new entries (files or directories) into an
empty staging directory inside `root`; one rename commits them; they are then moved into place,
replacing the old ones. `recover(root)` finishes a commit that a kill cut short (moving the
committed entries into place) or drops one that never committed; `commit` and every reader that
needs the entries (`crma_jax.adapter_files.load_adapters`) call it first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
