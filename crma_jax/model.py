"""The decoder: one pure Flax Linen module for every family in `crma_jax.families`.

Layers are stacked with `nn.scan`, so every per-layer parameter has a leading `layers` axis
(e.g. `layers/self_attn/q_proj/kernel`: (L, d, H·hd)). One compiled layer body serves all L
layers, which keeps compile time flat in depth, and the stacked arrays shard as one tensor.

Parameter tree (`params` collection), named after HF modules:

    embed_tokens/embedding   (V, d)
    layers/input_layernorm/scale, layers/self_attn/{q,k,v,o}_proj/kernel,
    layers/post_attention_layernorm/scale, layers/mlp/{gate,up,down}_proj/kernel
    layers/self_attn/{q,k,v,o}_proj/bias, layers/mlp/*/bias     (projections in `biases`)
    layers/self_attn/{q,k}_norm/scale                          (Qwen3, Gemma-3)
    layers/{pre,post}_feedforward_layernorm/scale              (Gemma-2, Gemma-3)
    norm/scale               (d,)
    lm_head/kernel           (d, V)   (untied embeddings only)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crma_jax.attention import IMPLEMENTATIONS, NO_WINDOW, MaskInfo
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMA, DIAGNOSTICS, CRMAConfig
from crma_jax.layers import MLP, Attention, RMSNorm, rope_tables
from crma_jax.loss import FULL_LOGITS_MAX, chunked_token_nll, target_count
from crma_jax.lora import LORA_INPUTS, LoraConfig
from crma_jax.sharding import constrain_batch

Dtype = Any
# Collections that hold one slice per layer under `layers/`; adapters added later live here too.
LAYER_COLLECTIONS = ("params", "lora", "crma", DIAGNOSTICS, LORA_INPUTS)

_ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "context", "out_proj")
_MLP_NAMES = ("mlpwi_0", "mlpwi_1", "mlpwo")
_save = jax.checkpoint_policies.save_only_these_names
# What each decoder layer keeps for the backward pass (names as in MaxText). `None`: no remat,
# every activation is saved. The others keep the layer input plus the named projection outputs
# and recompute the rest. No policy saves a dequantized kernel: the matmuls' custom VJP
# (`crma_jax.matmul`) keeps quantized kernels as stored.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_qkv_proj": _save("query_proj", "key_proj", "value_proj"),
    "save_dot_except_mlp": _save(*_ATTENTION_NAMES),
    "minimal": _save(*_ATTENTION_NAMES, *_MLP_NAMES),
}
LOSS_CHUNK = 1024  # rows per chunk of the LM head + cross-entropy (see `crma_jax.loss`)


class DecoderLayer(nn.Module):
    """Pre-norm block, then CRMA on the residual. Llama/Mistral/Gemma: h + attn(norm(h)), then
    h + mlp(norm(h)). Gemma-2/3 also normalize each branch's output (sandwich norms).

    `mask` carries the key padding and segment ids; the layer adds the causal offset
    (`cache_index`, None outside decoding) and its sliding window. `layer_info` is this layer's
    (window, rope index): the window is used unless every layer has the same one (then the
    config's static int or None is), a traced int32, `NO_WINDOW` for a full-attention layer;
    the rope index picks this layer's cos/sin from the stacked tables (R, B, T, hd) (Gemma-3's
    local layers use their own RoPE base).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora_config: LoraConfig | None = None
    crma_config: CRMAConfig | None = None
    attention: str = "auto"
    attention_block: int = 512

    @nn.compact
    def __call__(
        self,
        h: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: MaskInfo,
        deterministic: bool,
        crma_enabled: bool,
        cache_index: jax.Array | int | None,
        layer_info: tuple[jax.Array, jax.Array],
        kv_cache: tuple[jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        layer_window, rope_index = layer_info
        cos, sin = (cos[0], sin[0]) if cos.shape[0] == 1 else (cos[rope_index], sin[rope_index])

        def norm(name: str) -> RMSNorm:
            return RMSNorm(cfg.rms_norm_eps, cfg.gemma_norm, self.dtype, name=name)

        window = cfg.windows[0] if len(set(cfg.windows)) == 1 else layer_window
        mask = mask._replace(offset=0 if cache_index is None else cache_index, window=window)
        attn = Attention(cfg, self.dtype, self.lora_config, self.attention, self.attention_block, name="self_attn")
        mlp = MLP(cfg, self.dtype, self.lora_config, name="mlp")
        index = 0 if cache_index is None else cache_index
        # The barrier keeps XLA from hoisting this layer's float32 upcast of h out of the layer
        # scan's backward loop, where it would convert every layer's saved input at once.
        h = jax.lax.optimization_barrier(constrain_batch(h))
        a, kv_cache = attn(norm("input_layernorm")(h), cos, sin, mask, deterministic, kv_cache, index)
        if cfg.sandwich_norms:
            h = h + norm("post_attention_layernorm")(a)
            h = h + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(h), deterministic))
        else:
            h = h + a
            h = h + mlp(norm("post_attention_layernorm")(h), deterministic)
        if self.crma_config is not None:
            h = CRMA(self.crma_config, name="crma")(h, crma_enabled)
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

    `remat` names a `REMAT_POLICIES` entry for what each layer saves for the backward pass;
    `attention` picks the attention implementation (`crma_jax.attention`) and
    `attention_block` its tile size; `unroll_layers` writes the layer loop out (for cost
    counting). None of these changes the numbers, only memory and speed.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    lora_config: LoraConfig | None = None
    crma_config: CRMAConfig | None = None
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 512
    unroll_layers: bool = False

    def setup(self) -> None:
        cfg = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}")
        layer = DecoderLayer
        if self.remat != "none":
            # static_argnums count `self` as 0: `deterministic` and `crma_enabled` are Python bools.
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False, static_argnums=(5, 6))
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=nn.initializers.normal(0.02)
        )
        self.layers = nn.scan(
            layer,
            variable_axes={c: 0 for c in LAYER_COLLECTIONS},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 6 + (0, 0),
            length=cfg.num_layers,
            # Unrolled, the program is the same computation written out layer by layer; XLA's
            # cost analysis counts a loop body once, so costing (`crma_jax.roofline`) unrolls.
            unroll=cfg.num_layers if self.unroll_layers else 1,
        )(cfg, self.dtype, self.lora_config, self.crma_config, self.attention, self.attention_block)
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
        ropes = [cfg.rope] if cfg.local_rope is None else [cfg.rope, cfg.local_rope]
        tables = [rope_tables(positions, rope, cfg.head_dim) for rope in ropes]
        cos, sin = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        mask = MaskInfo(q_segment=segment_ids, kv_segment=segment_ids, kv_valid=attention_mask)
        windows = jnp.asarray([NO_WINDOW if w is None else w for w in cfg.windows], jnp.int32)
        layer_info = (windows, jnp.asarray(cfg.layer_ropes, jnp.int32))
        h, kv_cache = self.layers(
            h, cos, sin, mask, deterministic, crma_enabled, None if kv_cache is None else cache_index, layer_info,
            kv_cache,
        )
        return self.norm(h), kv_cache

    def head(self) -> dict[str, jax.Array]:
        """The LM head as `chunked_token_nll` takes it: {"kernel": (d, V)} or {"embedding": (V, d)}."""
        if self.config.tie_word_embeddings:
            return {"embedding": self.embed_tokens.embedding}
        return {"kernel": self.variables["params"]["lm_head"]["kernel"]}

    def token_nll(
        self,
        input_ids: jax.Array,
        loss_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        crma_enabled: bool = True,
        chunk_size: int = LOSS_CHUNK,
        full_logits_max: int = FULL_LOGITS_MAX,
    ) -> jax.Array:
        """(B, T) float32 per-token next-token NLL (column 0 and masked targets are 0), through
        the chunked LM head + cross-entropy: no (B, T, V) logits are ever materialised."""
        h, _ = self.hidden(input_ids, None, positions, segment_ids, deterministic, crma_enabled)
        softcap = self.config.final_logit_softcap or None
        return chunked_token_nll(h, input_ids, loss_mask, softcap=softcap, chunk_size=chunk_size,
                                 full_logits_max=full_logits_max, **self.head())

    def loss(
        self,
        input_ids: jax.Array,
        loss_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        crma_enabled: bool = True,
        chunk_size: int = LOSS_CHUNK,
        full_logits_max: int = FULL_LOGITS_MAX,
    ) -> tuple[jax.Array, jax.Array]:
        """float32 (summed next-token NLL, number of target tokens): `next_token_loss` of the
        logits, computed chunk by chunk (see `token_nll`)."""
        nll = self.token_nll(input_ids, loss_mask, positions, segment_ids, deterministic, crma_enabled, chunk_size,
                             full_logits_max)
        return jnp.sum(nll), target_count(input_ids, loss_mask)

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

