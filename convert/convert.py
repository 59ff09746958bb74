"""`crma convert SRC OUT`: an HF directory or `.gguf` -> a crma-jax params checkpoint.

OUT holds `crma_model.json`, `params/` (Orbax) and, when the source has one, `tokenizer/`.
The write is atomic: everything goes to a hidden sibling directory that is renamed to OUT only
when complete, so a failure (bad tensor, full disk, Ctrl-C) never leaves a partial OUT.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jax.sharding import Mesh

from crma_jax.atomic import atomic_dir
from crma_jax.errors import CheckpointError
from crma_jax.pretrained import load_source, open_source, save_converted
from crma_jax.progress import progress_callback

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


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
