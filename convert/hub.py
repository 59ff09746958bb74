"""`--model NAME` -> a local path: a file or directory, a built-in local name, or a Hugging Face
Hub repo id found in the local HF cache (downloaded only when the user allows it).

The cache is huggingface_hub's own layout (`models--org--name/snapshots/<sha>/`), found where
huggingface_hub finds it: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from crma_jax.convert.gemma3_270m import gemma3_270m_gguf
from crma_jax.convert.smollm2 import smollm2_gguf
from crma_jax.errors import CheckpointError

# Names that need no path: what each resolves to, and the hub repo PEFT configs should name.
LOCAL_NAMES: dict[str, tuple[Callable[[], Path], str]] = {
    "smollm2": (smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": (gemma3_270m_gguf, "google/gemma-3-270m"),
}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache_dir() -> Path:
    """The HF hub cache huggingface_hub uses, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_path(model: str, allow_download: bool = False) -> str:
    """The local path of `model`: an existing path as given; a `LOCAL_NAMES` entry (e.g.
    `smollm2`); or an `org/name` repo id's snapshot in the HF cache, offline. With
    `allow_download`, a repo id missing from the cache is fetched with `snapshot_download`.

    Raises `CheckpointError` naming every place looked in and the local names known.
    """
    if Path(model).exists():
        return model
    if model in LOCAL_NAMES:
        return str(LOCAL_NAMES[model][0]())
    cache = hub_cache_dir()
    if _REPO_ID.fullmatch(model):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(model, cache_dir=str(cache), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
            offline_error = e
        if allow_download:
            try:
                return snapshot_download(model, cache_dir=str(cache))
            except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors alike
                raise CheckpointError(f"{model}: download from the Hugging Face Hub failed: {type(e).__name__}: {e}") from e
        hint = f" ({type(offline_error).__name__}); pass --allow-download to fetch it"
    else:
        hint = " (not an org/name repo id)"
    raise CheckpointError(
        f"{model}: no such file or directory, local name or cached model. Looked for a file or directory "
        f"{Path(model).absolute()}, a local name "
        f"({', '.join(sorted(LOCAL_NAMES))}), and a Hugging Face cache entry in {cache}{hint}"
    )


def base_model_name(model: str) -> str:
    """What an exported PEFT config names as `base_model_name_or_path`, so that transformers can
    resolve it: the hub repo id when the model came by name, else an absolute path."""
    if model in LOCAL_NAMES:
        return LOCAL_NAMES[model][1]
    if Path(model).exists():
        return str(Path(model).absolute())
    return model
