"""`crma convert SRC OUT`: an HF directory or `.gguf` -> a crma-jax params checkpoint.

OUT holds `crma_model.json`, `params/` (Orbax) and, when the source has one, `tokenizer/`.
The write is atomic: everything goes to a hidden sibling directory that is renamed to OUT only
when complete, so a failure (bad tensor, full disk, Ctrl-C) never leaves a partial OUT.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from jax.sharding import Mesh

from crma_jax.errors import CheckpointError
from crma_jax.pretrained import load_source, open_source, save_converted
from crma_jax.progress import progress_callback

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def remove_orphans(out: Path) -> None:
    """Remove the staging directories of `out` (`.OUT.partial-PID-*`) whose process no longer runs
    on this host, saying so; those of a live process are left alone."""
    for staging in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = staging.name[len(f".{out.name}.partial-"):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
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

    `out` must not exist; the staging directory is a hidden sibling, `.OUT.partial-PID-*`,
    removed on any failure; one that a killed process left behind is removed by the next call for
    the same `out` (`remove_orphans`).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        (staging / "out").mkdir()
        write(staging / "out")
        os.rename(staging / "out", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `src` into a new directory `out`; returns `out`. `out` must not exist."""
    if Path(out).exists():
        raise FileExistsError(f"{out}: already exists; choose a new output directory")
    source = open_source(src, allow_pickle=allow_pickle)
    bar = progress_callback(f"convert {Path(src).name}") if progress else None
    _, params = load_source(source, dtype, dtype, mesh, bar)

    def write(d: Path) -> None:
        save_converted(d, source.hf_config(), params, dtype)
        _copy_tokenizer(src, d / "tokenizer")

    return atomic_dir(Path(out), write)


def _copy_tokenizer(src: str | os.PathLike, dest: Path) -> None:
    """Save the source's tokenizer beside the params (HF files as they are; a GGUF's rebuilt)."""
    src = Path(src)
    if src.is_dir():
        files = [src / f for f in _TOKENIZER_FILES if (src / f).exists()]
        if files:
            dest.mkdir()
            for f in files:
                shutil.copy2(f, dest / f.name)
        return
    from crma_jax.gguf_checkpoint import load_gguf_tokenizer

    try:
        tokenizer = load_gguf_tokenizer(src)
    except Exception as e:  # noqa: BLE001 - a model without a usable tokenizer still converts
        raise CheckpointError(f"{src}: cannot build its tokenizer: {e}") from e
    tokenizer.save_pretrained(str(dest))
