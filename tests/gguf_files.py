"""Write a saved tiny HF model as a llama.cpp GGUF file, the way llama.cpp's converter would.

Tensor names come from the `gguf` package's own HF -> GGUF map; the converter's changes are
applied as llama.cpp documents them: Llama's q/k rows permuted for interleaved RoPE (no other
family), Gemma's RMSNorm weights stored as w + 1, Phi-3's LongRoPE factors as tensors.

`gguf` can quantize only some storage types (it dequantizes all of them). So every 2-D tensor
is stored as *random* blocks of the requested type with finite scales, and the HF directory is
rewritten with exactly the values those blocks dequantize to: the GGUF and the HF model then
hold the same numbers, and transformers on the HF directory is the reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

Q = gguf.GGMLQuantizationType
# Byte offsets of each block's float16 scale fields (d, and dmin/m where the type has one).
SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
                 Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,)}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def random_blocks(rows: int, cols: int, qtype: Any, seed: int) -> np.ndarray:
    """(rows, bytes) uint8: random blocks of `qtype` whose values stay within about ±0.1."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)

    def set_scales(value: float) -> None:
        for off in SCALE_OFFSETS[qtype]:
            data[:, :, off:off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    set_scales(1.0)  # values are linear in the scales: measure, then rescale
    peak = np.abs(gguf.quants.dequantize(data.reshape(rows, -1), qtype)).max()
    set_scales(0.1 / peak)
    return data.reshape(rows, -1)


def store(w: np.ndarray, qtype: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(what to write, its dequantized float32 values) for a 2-D tensor in GGUF row order."""
    if qtype in FLOAT_TYPES:
        raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    else:
        raw = random_blocks(w.shape[0], w.shape[1], qtype, seed)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape).astype(np.float32)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}


def write_gguf_from_hf(hf_dir: Path, out: Path, qtype_of: Any, extra_meta: Any = None) -> Path:
    """Write `hf_dir` as the GGUF `out`, storing each 2-D tensor as `qtype_of(gguf_name)`, and
    rewrite `hf_dir`'s weights to the values the GGUF holds. `extra_meta(writer)` may add
    metadata. Returns `out`."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    layers, heads, kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    state = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(str(out), arch)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    _add_rope(w, cfg)
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if extra_meta is not None:
        extra_meta(w)
    for i, (hf_name, value) in enumerate(sorted(state.items())):
        base, kind = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{kind}"
        value = value.astype(np.float32)
        if value.ndim == 1:
            offset = np.float32(1.0 if arch == "gemma3" and hf_name.endswith("norm.weight") else 0.0)
            w.add_tensor(name, value + offset)
            state[hf_name] = (value + offset) - offset  # what a reader gets back, float32 rounding included
            continue
        n_perm = {"attn_q.weight": heads, "attn_k.weight": kv}.get(name.split(".", 2)[-1]) if arch == "llama" else None
        stored = permute(value, n_perm) if n_perm else value
        raw, values = store(stored, qtype_of(name), seed=i)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype_of(name))
        state[hf_name] = unpermute(values, n_perm) if n_perm else values
    _add_longrope_tables(w, cfg, head_dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    return out


def _add_rope(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # Gemma-3: the global RoPE with its scaling, the local base
        full, local = params["full_attention"], params["sliding_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        return
    w.add_rope_freq_base(params.get("rope_theta", 10000.0))


def _add_longrope_tables(w: gguf.GGUFWriter, cfg: dict[str, Any], head_dim: int) -> None:
    """Phi-3's LongRoPE as llama.cpp writes it: factor tensors, original context, and the
    attention factor sqrt(1 + ln(s) / ln(original)) with s = context / original."""
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type") != "longrope":
        return
    original = cfg.get("original_max_position_embeddings") or params["original_max_position_embeddings"]
    scale = cfg["max_position_embeddings"] / original
    w.add_tensor("rope_factors_long.weight", np.asarray(params["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(params["short_factor"], np.float32))
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
