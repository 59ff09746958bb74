"""Memory-mapped reading of llama.cpp GGUF files (Llama architecture) as an HF-style tensor source.

`GGUFSource` offers the same interface as `SafetensorsSource`: `path`, `hf_config()`, `keys()`
and `get(name)`, with HF state-dict names and HF (PyTorch) layouts. Each `get` dequantizes one
tensor from the memory map, so no full-model float copy is ever held. Only the `gguf` package is
used (no torch, no transformers), except for the tokenizer, which transformers builds itself.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from crma_jax.errors import CheckpointError

# llama.cpp tensor name -> HF name. `{i}` is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")
# Llama-3.x GGUFs carry their RoPE frequency scaling only as this tensor of per-pair divisors.
_ROPE_FREQS = "rope_freqs.weight"


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (n_heads*head_dim, ...) -> same shape, HF row order.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half,
    second half) to interleaved pairs (x0, x_{d/2}, x1, ...) via
    `w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)`; this is the inverse. For k,
    pass the number of KV heads.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A llama.cpp GGUF file (`general.architecture == "llama"`) read tensor by tensor.

    `get(name)` returns a float32 array in HF layout ((out, in) for linear weights, (d,) for
    norms, (vocab, d) for embeddings), dequantized from the file's storage type. Every failure
    to read the file is a `CheckpointError` naming it.
    """

    path: str

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf  # the reader pulls in numpy only; imported here to keep `crma_jax` import light

        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            self._reader = gguf.GGUFReader(p, "r")
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/IndexError/... on bad bytes
            raise CheckpointError(f"{self.path}: not a readable GGUF file: {type(e).__name__}: {e}") from e
        self._dequantize = gguf.quants.dequantize
        size = p.stat().st_size
        for t in self._reader.tensors:
            # The reader maps what exists; a tensor running past the end means a truncated file.
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                    f"{t.data_offset + t.n_bytes}, file has {size}"
                )
        arch = self._meta("general.architecture", None)
        if arch != "llama":
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {arch!r} (only 'llama' is supported)")
        if int(self._meta("llama.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path}: mixture-of-experts Llama GGUFs are not supported")
        self._tensors = {}
        for t in self._reader.tensors:
            hf = _hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
            elif t.name != _ROPE_FREQS:
                raise CheckpointError(f"{self.path}: unsupported tensor {t.name!r} for a Llama model")
        self._config = self._build_config()

    def _meta(self, key: str, default: Any = ...) -> Any:
        """A scalar or string metadata value; `default` when absent (or a CheckpointError if none)."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: missing GGUF metadata {key!r}")
            return default
        if len(field.types) != 1:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is an array; expected a single value")
        part = field.parts[field.data[0]]
        if field.types[0].name == "STRING":
            return bytes(part).decode("utf-8")
        return part[0].item()

    def _build_config(self) -> dict[str, Any]:
        """The HF LlamaConfig dict, from `llama.*` and `tokenizer.ggml.*` metadata."""
        heads = int(self._meta("llama.attention.head_count"))
        hidden = int(self._meta("llama.embedding_length"))
        if "model.embed_tokens.weight" not in self._tensors:
            raise CheckpointError(f"{self.path}: no token_embd.weight tensor")
        # The embedding's row count is authoritative; older files lack `llama.vocab_size`.
        vocab = int(self._tensors["model.embed_tokens.weight"].shape[-1])
        head_dim = int(self._meta("llama.attention.key_length", 0) or self._meta("llama.rope.dimension_count", 0)
                       or hidden // heads)
        rope_dim = int(self._meta("llama.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise CheckpointError(f"{self.path}: partial RoPE (rope dim {rope_dim} != head_dim {head_dim}) unsupported")
        cfg: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("llama.feed_forward_length")),
            "num_hidden_layers": int(self._meta("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta("llama.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._meta("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._meta("llama.context_length", 2048)),
            "vocab_size": vocab,
            # llama.cpp simply omits `output.weight` when the head is tied to the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": False,
            "mlp_bias": False,
        }
        scaling = self._rope_scaling(cfg["rope_theta"], head_dim)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            value = self._meta(f"tokenizer.ggml.{gguf_key}_token_id", None)
            if value is not None:
                cfg[hf_key] = int(value)
        return cfg

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        """HF `rope_scaling` from GGUF metadata, or None for plain RoPE.

        Linear scaling is stored as metadata. Llama-3 scaling is stored only as `rope_freqs`
        (a divisor per frequency): we recover its parameters by matching the llama3 formula with
        the released defaults (low 1, high 4, original context 8192) and refuse anything else
        rather than run with silently wrong positions.
        """
        kind = self._meta("llama.rope.scaling.type", "none")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._meta("llama.rope.scaling.factor"))}
        if kind not in ("none", ""):
            raise CheckpointError(f"{self.path}: unsupported RoPE scaling type {kind!r}")
        freqs = next((t for t in self._reader.tensors if t.name == _ROPE_FREQS), None)
        if freqs is None:
            return None
        divisors = np.asarray(self._dequantize(freqs.data, freqs.tensor_type), np.float64).reshape(-1)
        scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        expected = llama3_rope_divisors(theta, head_dim, **{k: v for k, v in scaling.items() if k != "rope_type"})
        if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
            raise CheckpointError(f"{self.path}: {_ROPE_FREQS} does not match Llama-3 RoPE scaling; unsupported")
        return scaling

    def hf_config(self) -> dict[str, Any]:
        """An HF `config.json`-style dict for `LlamaForCausalLM` (a fresh copy)."""
        return dict(self._config)

    def keys(self) -> list[str]:
        """HF state-dict names of every tensor (no `lm_head.weight` when tied)."""
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 in HF layout, dequantized; q/k rows in HF rotate-half order.

        Stored-F32 tensors other than q/k come back as read-only views of the memory map.
        """
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this GGUF file")
        try:
            flat = self._dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {e}") from e
        # GGUF shapes list the fastest-varying dimension first (ggml `ne`); numpy order is reversed.
        w = np.asarray(flat, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, self._config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, self._config["num_key_value_heads"])
        return w


def llama3_rope_divisors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """(head_dim // 2,) per-frequency divisors of Llama-3 RoPE scaling, as llama.cpp writes them."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = original_max_position_embeddings
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high_freq_factor, 1.0, np.where(wavelen > old / low_freq_factor, factor, mid))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The HF (fast) tokenizer stored in the GGUF at `path`, built by transformers."""
    from transformers import AutoTokenizer  # heavy; only the tokenizer needs it

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for an unusable tokenizer
        raise CheckpointError(f"{p}: no usable tokenizer in this GGUF: {e}") from e
