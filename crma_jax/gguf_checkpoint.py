"""Memory-mapped reading of llama.cpp GGUF files as an HF-style tensor source.

Architectures: every family with a `gguf_arch` (`crma_jax.families`): llama, qwen2, qwen3,
gemma3, phi3. `GGUFSource` offers the same interface as `SafetensorsSource`: `path`,
`hf_config()`, `keys()` and `get(name)`, with HF state-dict names and HF (PyTorch) layouts. Each
`get` dequantizes one tensor from the memory map with `gguf.quants`, so no full-model float copy
is ever held. Tensor names come from the `gguf` package's own HF -> GGUF map
(`gguf.get_tensor_name_map`), applied to the names the decoder needs; no torch or transformers,
except for the tokenizer, which transformers builds itself.

What llama.cpp's converter changed is undone per family: Llama's q/k row permutation, Gemma's
norm weights stored as w + 1. Phi-3's fused qkv / gate_up tensors stay fused here, as in HF.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from crma_jax.config import ModelConfig
from crma_jax.errors import CheckpointError
from crma_jax.families import FAMILIES

# llama.cpp architecture -> HF model_type, from the families table.
GGUF_ARCHITECTURES = {fam.gguf_arch: model_type for model_type, fam in FAMILIES.items() if fam.gguf_arch}
# Tensors that carry RoPE scaling, not weights: Llama-3.x's per-pair divisors, Phi-3's LongRoPE factors.
_ROPE_FREQS = "rope_freqs.weight"
_ROPE_LONG, _ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
_ROPE_TENSORS = (_ROPE_FREQS, _ROPE_LONG, _ROPE_SHORT)
# Storage types read (dequantized by `gguf.quants`), each checked against transformers in the tests.
ACCEPTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


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
    """A llama.cpp GGUF file of a supported architecture (`GGUF_ARCHITECTURES`), read tensor by tensor.

    `get(name)` returns a float32 array in HF layout ((out, in) for linear weights, (d,) for
    norms and biases, (vocab, d) for embeddings), dequantized from the file's storage type. Every
    failure to read the file is a `CheckpointError` naming it.
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
        if arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(f"{self.path}: unsupported GGUF architecture {arch!r} "
                                  f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        if int(self._meta(f"{arch}.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path}: mixture-of-experts {arch} GGUFs are not supported")
        self._arch, self._family = arch, FAMILIES[GGUF_ARCHITECTURES[arch]]
        self._stored = {t.name: t for t in self._reader.tensors}
        self._config = self._build_config()
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        self._tensors = self._map_names(gguf.get_tensor_name_map(arch_enum, self._config["num_hidden_layers"]))

    def _map_names(self, tensor_map: Any) -> dict[str, Any]:
        """{HF name: GGUF tensor} for the tensors the decoder reads, named by `gguf`'s own map;
        any other tensor in the file (beyond RoPE scaling tables) is refused."""
        try:
            config = ModelConfig.from_hf(self._config)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: {e}") from e
        out = {}
        for hf in decoder_hf_names(config):
            base, kind = hf.rsplit(".", 1)
            gguf_name = tensor_map.get_name(base)
            if gguf_name is not None and f"{gguf_name}.{kind}" in self._stored:
                out[hf] = self._stored[f"{gguf_name}.{kind}"]
        used = {t.name for t in out.values()} | set(_ROPE_TENSORS)
        for name in self._stored:
            if name not in used:
                raise CheckpointError(f"{self.path}: unsupported tensor {name!r} for a {self._arch} model")
        return out

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
            try:
                return bytes(part).decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is not UTF-8 text ({e})") from None
        return part[0].item()

    def _build_config(self) -> dict[str, Any]:
        """The HF config dict of the family, from `<arch>.*` and `tokenizer.ggml.*` metadata."""
        a, fam = self._arch, self._family
        heads = int(self._meta(f"{a}.attention.head_count"))
        hidden = int(self._meta(f"{a}.embedding_length"))
        if "token_embd.weight" not in self._stored:
            raise CheckpointError(f"{self.path}: no token_embd.weight tensor")
        # The embedding's row count is authoritative; older files lack `<arch>.vocab_size`.
        vocab = int(self._stored["token_embd.weight"].shape[-1])
        head_dim = int(self._meta(f"{a}.attention.key_length", 0) or self._meta(f"{a}.rope.dimension_count", 0)
                       or hidden // heads)
        rope_dim = int(self._meta(f"{a}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise CheckpointError(f"{self.path}: partial RoPE (rope dim {rope_dim} != head_dim {head_dim}) unsupported")
        layers = int(self._meta(f"{a}.block_count"))
        cfg: dict[str, Any] = {
            "model_type": GGUF_ARCHITECTURES[a],
            "architectures": [fam.architecture],
            "hidden_act": "gelu_pytorch_tanh" if fam.gemma else "silu",
            "hidden_size": hidden,
            "intermediate_size": int(self._meta(f"{a}.feed_forward_length")),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta(f"{a}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._meta(f"{a}.rope.freq_base", fam.rope_theta)),
            "max_position_embeddings": int(self._meta(f"{a}.context_length", 2048)),
            "vocab_size": vocab,
            # llama.cpp simply omits `output.weight` when the head is tied to the embedding.
            "tie_word_embeddings": "output.weight" not in self._stored,
            "attention_bias": "blk.0.attn_output.bias" in self._stored or "blk.0.attn_q.bias" in self._stored,
            "mlp_bias": "blk.0.ffn_down.bias" in self._stored,
        }
        cfg.update(self._windows())
        if fam.local_rope:
            cfg["rope_local_base_freq"] = float(self._meta(f"{a}.rope.freq_base_swa", 10000.0))
        if fam.query_pre_attn_scalar:
            # llama.cpp: 1/sqrt(head_dim), except Gemma-3 27B (62 layers), which scales by d/heads.
            cfg["query_pre_attn_scalar"] = hidden // heads if layers == 62 else head_dim
        scaling = self._rope_scaling(cfg["rope_theta"], head_dim)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
            if scaling["rope_type"] == "longrope":
                cfg["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            value = self._meta(f"tokenizer.ggml.{gguf_key}_token_id", None)
            if value is not None:
                cfg[hf_key] = int(value)
        return cfg

    def _windows(self) -> dict[str, Any]:
        """`sliding_window` (and Gemma-3's local/global pattern) from metadata; none when absent."""
        window = self._meta(f"{self._arch}.attention.sliding_window", None)
        if not window or not self._family.sliding_window:
            return {}
        out: dict[str, Any] = {"sliding_window": int(window)}
        if self._family.window_flag:
            out[self._family.window_flag] = True
        pattern = self._reader.fields.get(f"{self._arch}.attention.sliding_window_pattern")
        if pattern is not None and pattern.types[0].name != "ARRAY":
            out["sliding_window_pattern"] = int(self._meta(f"{self._arch}.attention.sliding_window_pattern"))
        elif pattern is not None:  # newer files: one bool per layer, true for a sliding layer
            flags = [bool(pattern.parts[i][0]) for i in pattern.data]
            out["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
        return out

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        """HF `rope_scaling` from GGUF metadata, or None for plain RoPE.

        Linear scaling is stored as metadata. Phi-3's LongRoPE is stored as the tensors
        `rope_factors_short/long` plus the original context and attention factor. Llama-3 scaling
        is stored only as `rope_freqs` (a divisor per frequency): we recover its parameters by
        matching the llama3 formula with the released defaults (low 1, high 4, original context
        8192) and refuse anything else rather than run with silently wrong positions.
        """
        a = self._arch
        kind = self._meta(f"{a}.rope.scaling.type", "none")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._meta(f"{a}.rope.scaling.factor"))}
        if kind not in ("none", ""):
            raise CheckpointError(f"{self.path}: unsupported RoPE scaling type {kind!r}")
        if _ROPE_LONG in self._stored or _ROPE_SHORT in self._stored:
            return {"rope_type": "longrope", "short_factor": self._table(_ROPE_SHORT).tolist(),
                    "long_factor": self._table(_ROPE_LONG).tolist(),
                    "original_max_position_embeddings": int(self._meta(f"{a}.rope.scaling.original_context_length")),
                    "attention_factor": float(self._meta(f"{a}.rope.scaling.attn_factor", 1.0))}
        if _ROPE_FREQS not in self._stored:
            return None
        divisors = self._table(_ROPE_FREQS)
        scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        expected = llama3_rope_divisors(theta, head_dim, **{k: v for k, v in scaling.items() if k != "rope_type"})
        if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
            raise CheckpointError(f"{self.path}: {_ROPE_FREQS} does not match Llama-3 RoPE scaling; unsupported")
        return scaling

    def _table(self, name: str) -> np.ndarray:
        t = self._stored.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return np.asarray(self._dequantize(t.data, t.tensor_type), np.float64).reshape(-1)

    def hf_config(self) -> dict[str, Any]:
        """An HF `config.json`-style dict for the file's family (a fresh copy)."""
        return dict(self._config)

    def keys(self) -> list[str]:
        """HF state-dict names of every tensor (no `lm_head.weight` when tied; Phi-3's fused)."""
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 in HF layout, dequantized; Llama q/k rows in HF
        rotate-half order, Gemma norms without llama.cpp's + 1.

        Stored-F32 tensors that need no such change come back as read-only views of the memory map.
        """
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this GGUF file")
        if t.tensor_type.name not in ACCEPTED_TYPES:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}; "
                                  f"supported: {', '.join(ACCEPTED_TYPES)}")
        try:
            flat = self._dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {e}") from e
        # GGUF shapes list the fastest-varying dimension first (ggml `ne`); numpy order is reversed.
        w = np.asarray(flat, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if self._family.gguf_permute_qk and name.endswith("q_proj.weight"):
            w = unpermute_rope(w, self._config["num_attention_heads"])
        elif self._family.gguf_permute_qk and name.endswith("k_proj.weight"):
            w = unpermute_rope(w, self._config["num_key_value_heads"])
        if self._family.gguf_norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(self._family.gguf_norm_offset)
        return w


def decoder_hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the decoder of `config` reads, fused as the family stores them."""
    from crma_jax.hf_params import abstract_params, fused_parts, hf_names
    from crma_jax.model import Decoder

    names = []
    for path in traverse_util.flatten_dict(abstract_params(Decoder(config))):
        names += hf_names(path, config.num_layers)[0]
    parts = fused_parts(config)
    return list(dict.fromkeys(parts[n][0] if n in parts else n for n in names))


def llama3_rope_divisors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """(head_dim // 2,) per-frequency divisors of Llama-3 RoPE scaling, as llama.cpp writes them."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = original_max_position_embeddings
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high_freq_factor, 1.0, np.where(wavelen > old / low_freq_factor, factor, mid))


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
