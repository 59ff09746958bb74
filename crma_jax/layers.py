"""Building blocks of the decoder: RMSNorm, rotary embeddings, masks, GQA attention, gated MLP.

Every block mirrors the matching transformers module numerically (same op order and the same
float32 islands), so converted checkpoints reproduce PyTorch's logits. Parameter names match
HF's module names (`q_proj`, `input_layernorm`, ...), which keeps HF and PEFT key mapping trivial.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crma_jax.config import ModelConfig, RopeConfig

Dtype = Any
_KERNEL_INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """y = x @ kernel, kernel (in, out) in Flax layout, cast to the compute dtype.

    The single place where the decoder runs a projection: the hook for LoRA and quantized
    base weights.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _KERNEL_INIT, (x.shape[-1], self.features), jnp.float32)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
    """RMSNorm in float32. Llama: w · norm(x) cast to dtype. Gemma: (1 + w) · norm(x), then cast."""

    eps: float = 1e-6
    gemma: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.gemma else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """(head_dim // 2,) float32 inverse frequencies, with linear / llama3 scaling."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, T, head_dim), float32, computed once per forward pass."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(rope, head_dim)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half RoPE on x (B, T, heads, head_dim); tables broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(
    attention_mask: jax.Array | None, segment_ids: jax.Array | None, batch: int, length: int, window: int | None
) -> jax.Array:
    """Boolean (B, T, T) mask, True = query t may attend key s.

    Causal by index; keys with `attention_mask == 0` are hidden (padding); with `segment_ids`
    (packed sequences) a query sees only its own document; with `window` only the last
    `window` keys (q - k < window), as transformers' sliding-window overlay.
    """
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    mask = jnp.broadcast_to(allowed, (batch, length, length))
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, :] > 0)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


class Attention(nn.Module):
    """Grouped-query attention without repeating K/V: queries are grouped per KV head."""

    config: ModelConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        kv, group, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        q = Linear(cfg.num_heads * hd, self.dtype, name="q_proj")(x).reshape(b, t, cfg.num_heads, hd)
        k = Linear(kv * hd, self.dtype, name="k_proj")(x).reshape(b, t, kv, hd)
        v = Linear(kv * hd, self.dtype, name="v_proj")(x).reshape(b, t, kv, hd)
        q = apply_rope(q, cos, sin).reshape(b, t, kv, group, hd)
        k = apply_rope(k, cos, sin)
        scores = jnp.einsum("btkgd,bskd->bkgts", q * jnp.asarray(cfg.attn_scale, self.dtype), k)
        scores = scores.astype(jnp.float32)
        if cfg.attn_logit_softcap:
            scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        # A finite fill keeps fully masked rows (padding queries) NaN-free.
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.num_heads * hd)
        return Linear(cfg.hidden_size, self.dtype, name="o_proj")(out)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for Llama/Mistral, GeGLU (tanh) for Gemma."""

    config: ModelConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = Linear(cfg.intermediate_size, self.dtype, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, self.dtype, name="up_proj")(x)
        if cfg.activation == "silu":
            act = jax.nn.silu(gate)
        else:
            act = jax.nn.gelu(gate, approximate=cfg.activation == "gelu_tanh")
        return Linear(cfg.hidden_size, self.dtype, name="down_proj")(act * up)
