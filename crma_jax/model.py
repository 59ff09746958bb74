"""The decoder: one pure Flax Linen module for Llama, Mistral, Gemma and Gemma-2.

Layers are stacked with `nn.scan`, so every per-layer parameter has a leading `layers` axis
(e.g. `layers/self_attn/q_proj/kernel`: (L, d, H·hd)). One compiled layer body serves all L
layers, which keeps compile time flat in depth, and the stacked arrays shard as one tensor.

Parameter tree (`params` collection), named after HF modules:

    embed_tokens/embedding   (V, d)
    layers/input_layernorm/scale, layers/self_attn/{q,k,v,o}_proj/kernel,
    layers/post_attention_layernorm/scale, layers/mlp/{gate,up,down}_proj/kernel
    layers/{pre,post}_feedforward_layernorm/scale     (Gemma-2 only)
    norm/scale               (d,)
    lm_head/kernel           (d, V)   (untied embeddings only)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crma_jax.config import ModelConfig
from crma_jax.crma import CRMA, DIAGNOSTICS, CRMAConfig
from crma_jax.layers import MLP, Attention, RMSNorm, rope_tables
from crma_jax.layers import attention_mask as build_mask
from crma_jax.lora import LoraConfig

Dtype = Any
# Collections that hold one slice per layer under `layers/`; adapters added later live here too.
LAYER_COLLECTIONS = ("params", "lora", "crma", DIAGNOSTICS)


class DecoderLayer(nn.Module):
    """Pre-norm block, then CRMA on the residual. Llama/Mistral/Gemma: h + attn(norm(h)), then
    h + mlp(norm(h)). Gemma-2 also normalizes each branch's output (sandwich norms)."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None
    crma: CRMAConfig | None = None

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        full_mask: jax.Array,
        window_mask: jax.Array,
        deterministic: bool,
        crma_enabled: bool,
        cache_index: jax.Array | int,
        slides: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config

        def norm(name: str) -> RMSNorm:
            return RMSNorm(cfg.rms_norm_eps, cfg.gemma_norm, self.dtype, name=name)

        mask = jnp.where(slides, window_mask, full_mask)
        attn = Attention(cfg, self.dtype, self.lora, name="self_attn")
        mlp = MLP(cfg, self.dtype, self.lora, name="mlp")
        a, kv_cache = attn(norm("input_layernorm")(h), cos, sin, mask, deterministic, kv_cache, cache_index)
        if cfg.sandwich_norms:
            h = h + norm("post_attention_layernorm")(a)
            h = h + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(h), deterministic))
        else:
            h = h + a
            h = h + mlp(norm("post_attention_layernorm")(h), deterministic)
        if self.crma is not None:
            h = CRMA(self.crma, name="crma")(h, crma_enabled)
        return h, kv_cache


class Decoder(nn.Module):
    """Causal LM. `__call__(input_ids)` -> float32 logits (B, T, V).

    `attention_mask` (B, T) hides padded keys; `positions` (B, T) drive RoPE (default arange);
    `segment_ids` (B, T) keep packed documents apart. `dtype` is the compute dtype
    (float32 or bfloat16); parameters are cast to it inside each matmul.

    With `lora`, the target projections read A/B from the `lora` collection; with `crma`, a
    CRMA adapter (the `crma` collection) follows every layer. Both are skipped when their
    collection is absent from `apply`'s variables. `crma_enabled=False` turns CRMA into the
    identity on the same weights; `deterministic=False` enables LoRA dropout (needs a
    `dropout` rng).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None
    crma: CRMAConfig | None = None

    def setup(self) -> None:
        cfg = self.config
        windows = {w for w in cfg.windows if w is not None}
        if len(windows) > 1:
            raise ValueError(f"at most one sliding-window size is supported, got {sorted(windows)}")
        self.window = windows.pop() if windows else None
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=nn.initializers.normal(0.02)
        )
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={c: 0 for c in LAYER_COLLECTIONS},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 7 + (0, 0),
            length=cfg.num_layers,
        )(cfg, self.dtype, self.lora, self.crma)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norm, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02)
            )

    def hidden(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        crma_enabled: bool = True,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """(final normalized hidden states (B, T, d) in the compute dtype, updated KV cache).

        `kv_cache` is ((L, B, S, kv, hd), (L, B, S, kv, hd)) keys and values (see `init_cache`);
        the T new tokens sit at absolute positions cache_index .. cache_index + T − 1.
        """
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        h = self.embed_tokens(input_ids)
        if cfg.scale_embedding:
            # HF casts sqrt(d) to the activation dtype before multiplying (bf16 rounds it).
            h = h * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        cos, sin = rope_tables(positions, cfg.rope, cfg.head_dim)
        s = t if kv_cache is None else kv_cache[0].shape[2]

        def mask(window: int | None) -> jax.Array:
            return build_mask(attention_mask, segment_ids, b, t, window, s, cache_index)

        full = mask(None)
        windowed = mask(self.window) if self.window else full
        slides = jnp.asarray([w is not None for w in cfg.windows])
        h, kv_cache = self.layers(
            h, cos, sin, full, windowed, deterministic, crma_enabled, cache_index, slides, kv_cache
        )
        return self.norm(h), kv_cache

    def logits(self, h: jax.Array) -> jax.Array:
        """Project hidden states (B, T, d) to float32 logits (B, T, V), with soft-capping."""
        cfg = self.config
        out = self.embed_tokens.attend(h) if cfg.tie_word_embeddings else self.lm_head(h)
        out = out.astype(jnp.float32)
        if cfg.final_logit_softcap:
            out = jnp.tanh(out / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return out

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        crma_enabled: bool = True,
    ) -> jax.Array:
        h, _ = self.hidden(input_ids, attention_mask, positions, segment_ids, deterministic, crma_enabled)
        return self.logits(h)

    def decode(
        self,
        input_ids: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array],
        cache_index: jax.Array | int,
        crma_enabled: bool = True,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One incremental step: logits (B, T, V) of the new tokens and the updated KV cache."""
        h, kv_cache = self.hidden(input_ids, crma_enabled=crma_enabled, kv_cache=kv_cache, cache_index=cache_index)
        return self.logits(h), kv_cache


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Zeroed KV cache ((L, B, S, kv_heads, head_dim) keys, same for values)."""
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

