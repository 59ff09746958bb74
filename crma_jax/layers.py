"""Building blocks of the decoder: RMSNorm, rotary embeddings, GQA attention, gated MLP.

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

from jax.ad_checkpoint import checkpoint_name

from crma_jax.attention import MaskInfo, dot_product_attention
from crma_jax.config import ModelConfig, RopeConfig
from crma_jax.lora import LORA_INPUTS, LoraConfig, lora_a_init
from crma_jax.matmul import frozen_linear, lora_linear
from crma_jax.sharding import constrain_batch

Dtype = Any
_KERNEL_INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """y = x @ W (+ scale · (dropout(x) @ A) @ B when this projection is a LoRA target).

    W (in, out) is a `params` kernel in Flax layout: a plain array, or an NF4/int8 tensor that is
    dequantized inside the matmul to the compute dtype (`crma_jax.matmul`, whose backward keeps
    W as stored, never dequantized). A and B live in the `lora` collection and are used only
    when present (a base-only apply passes no `lora`). With `use_bias`, a (out,) float32 `bias`
    is added last.
    """

    features: int
    dtype: Dtype = jnp.float32
    lora_config: LoraConfig | None = None
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        y = self._linear(x, deterministic)
        if not self.use_bias:
            return y
        # The bias is frozen base weight (a `params` leaf), added after the LoRA term as in
        # PyTorch's `nn.Linear` + PEFT, whose base layer carries it.
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y + bias.astype(y.dtype)

    def _linear(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.has_variable("params", "kernel"):
            # Read directly: `self.param` would reject a quantized kernel's packed shape.
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", _KERNEL_INIT, (x.shape[-1], self.features), jnp.float32)
        cfg = self.lora_config
        if cfg is None or self.name not in cfg.targets:
            return frozen_linear(x, kernel, self.dtype)
        if not self.has_variable("lora", "a") and not self.is_mutable_collection("lora"):
            return frozen_linear(x, kernel, self.dtype)
        a = self.variable("lora", "a", lambda: lora_a_init(self.make_rng("params"), (x.shape[-1], cfg.rank))).value
        b = self.variable("lora", "b", lambda: jnp.zeros((cfg.rank, self.features), jnp.float32)).value
        if self.is_mutable_collection(LORA_INPUTS):  # InfLoRA's statistics: XᵀX of this target's inputs
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            self.sow(LORA_INPUTS, "gram", rows.T @ rows)
        x_lora = x
        if cfg.dropout > 0.0 and not deterministic:
            x_lora = nn.Dropout(cfg.dropout)(x, deterministic=False)
        return lora_linear(x, x_lora, kernel, a, b, cfg.scale, self.dtype)


def project(parent: Any, name: str, features: int, x: jax.Array, deterministic: bool) -> jax.Array:
    """Run the `Linear` named `name` inside `parent` (which has `config`, `dtype` and `lora`);
    it has a bias when the config lists `name` in `biases`."""
    use_bias = name in parent.config.biases
    return Linear(features, parent.dtype, parent.lora_config, use_bias, name=name)(x, deterministic)


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


def rope_inv_freq(rope: RopeConfig, head_dim: int, long: bool = False) -> jax.Array:
    """(head_dim // 2,) float32 inverse frequencies, with linear / llama3 / longrope scaling
    (`long`: LongRoPE's factors for sequences beyond the original context)."""
    powers = rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if rope.kind == "longrope":  # the divisor goes inside the reciprocal, as in transformers
        return 1.0 / (jnp.asarray(rope.long_factor if long else rope.short_factor, jnp.float32) * powers)
    inv_freq = 1.0 / powers
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
    """cos, sin of shape (B, T, head_dim), float32, computed once per forward pass.

    LongRoPE picks its long factors when the largest position in the batch is at or beyond the
    original context (as transformers does, per forward pass), and scales cos/sin by its
    attention factor."""
    inv_freq = rope_inv_freq(rope, head_dim)
    if rope.kind == "longrope":
        beyond = jnp.max(positions) + 1 > rope.original_max_position_embeddings
        inv_freq = jnp.where(beyond, rope_inv_freq(rope, head_dim, long=True), inv_freq)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = rope.attention_factor if rope.kind == "longrope" else 1.0
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half RoPE on x (B, T, heads, head_dim); tables broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention without repeating K/V (`crma_jax.attention`).

    `impl` picks the attention implementation ("auto", "xla", "blockwise", "cudnn"; see
    `crma_jax.attention.dot_product_attention`) and `block` its (query, key) tile size. Projection outputs carry checkpoint names
    (`query_proj`, `key_proj`, `value_proj`, `context`, `out_proj`) for the remat policies.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora_config: LoraConfig | None = None
    impl: str = "auto"
    block: int = 512

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: MaskInfo,
        deterministic: bool = True,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """(output (B, T, d), updated cache). With `kv_cache` ((B, S, kv, hd) keys and values),
        this step's keys/values are written at `cache_index` and queries attend all S slots
        (`mask.offset` must then be `cache_index`)."""
        cfg = self.config
        b, t, _ = x.shape
        kv, hd = cfg.num_kv_heads, cfg.head_dim

        def proj(name: str, features: int, inputs: jax.Array) -> jax.Array:
            return project(self, name, features, inputs, deterministic)

        q = checkpoint_name(proj("q_proj", cfg.num_heads * hd, x), "query_proj").reshape(b, t, cfg.num_heads, hd)
        k = checkpoint_name(proj("k_proj", kv * hd, x), "key_proj").reshape(b, t, kv, hd)
        v = checkpoint_name(proj("v_proj", kv * hd, x), "value_proj").reshape(b, t, kv, hd)
        if cfg.qk_norm:  # Qwen3 / Gemma-3: per-head RMSNorm on q and k, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norm, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norm, self.dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
            kv_cache = (k, v)
        out = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask,
            scale=cfg.attn_scale, softcap=cfg.attn_logit_softcap or None, impl=self.impl,
            block_q=self.block, block_k=self.block,
        )
        out = checkpoint_name(out.reshape(b, t, cfg.num_heads * hd), "context")
        return checkpoint_name(proj("o_proj", cfg.hidden_size, out), "out_proj"), kv_cache


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for Llama/Mistral, GeGLU (tanh) for Gemma.

    Projection outputs carry checkpoint names `mlpwi_0` (gate), `mlpwi_1` (up), `mlpwo` (down).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora_config: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config

        def proj(name: str, features: int, inputs: jax.Array) -> jax.Array:
            return project(self, name, features, inputs, deterministic)

        gate = checkpoint_name(proj("gate_proj", cfg.intermediate_size, x), "mlpwi_0")
        up = checkpoint_name(proj("up_proj", cfg.intermediate_size, x), "mlpwi_1")
        if cfg.activation == "silu":
            act = jax.nn.silu(gate)
        else:
            act = jax.nn.gelu(gate, approximate=cfg.activation == "gelu_tanh")
        return checkpoint_name(proj("down_proj", cfg.hidden_size, constrain_batch(act * up)), "mlpwo")
