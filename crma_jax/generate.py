"""Text generation with a KV cache: greedy or nucleus (top-p) sampling, all in JAX.

The prompt is run once (prefill) into a cache sized for prompt + new tokens; each new token is
then one `Decoder.decode` step of length 1 inside a `lax.fori_loop`, so the whole generation
is a single compiled program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from crma_jax.model import Decoder, init_cache


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of tokens whose probability mass reaches `top_p`; mask the rest."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # the top token is always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def next_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """(B,) int32: argmax when temperature == 0, else a top-p sample at that temperature."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, top_p_filter(logits / temperature, top_p), axis=-1).astype(jnp.int32)


def generate(
    model: Decoder,
    variables: dict[str, Any],
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    crma_enabled: bool = True,
) -> jax.Array:
    """Continue `prompt` (B, P) int32 by `max_new_tokens`; returns (B, P + max_new_tokens) int32.

    Compiled once per (model, prompt shape, max_new_tokens, sampling settings, crma_enabled).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, variables, jnp.asarray(prompt, jnp.int32), rng, max_new_tokens, float(temperature),
                     float(top_p), crma_enabled)


def longrope_switch(config: Any, prompt_len: int, total: int) -> int | None:
    """The step whose token first lies beyond LongRoPE's original context, if decoding reaches
    it: there transformers (Phi-3) drops the cache built with the short factors and recomputes
    the whole sequence with the long ones; so do we, once."""
    if config.rope.kind != "longrope":
        return None
    at = config.rope.original_max_position_embeddings
    return at if prompt_len <= at < total - 1 else None


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(model: Decoder, variables: dict[str, Any], prompt: jax.Array, rng: jax.Array, max_new_tokens: int,
              temperature: float, top_p: float, crma_enabled: bool) -> jax.Array:
    b, p = prompt.shape
    total = p + max_new_tokens
    cache = init_cache(model.config, b, total, model.dtype)
    logits, cache = model.apply(variables, prompt, cache, 0, crma_enabled, method=Decoder.decode)
    rng, sub = jax.random.split(rng)
    tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)
    tokens = tokens.at[:, p].set(next_token(logits[:, -1], sub, temperature, top_p))

    switch = longrope_switch(model.config, p, total)

    def incremental(tokens: jax.Array, cache: Any, i: jax.Array) -> tuple[jax.Array, Any]:
        last = jax.lax.dynamic_slice(tokens, (0, i), (b, 1))
        return model.apply(variables, last, cache, i, crma_enabled, method=Decoder.decode)

    def recompute(tokens: jax.Array, cache: Any, i: jax.Array) -> tuple[jax.Array, Any]:
        # Every slot is rewritten with the long factors; slots after i are causally masked now
        # and overwritten by their own steps before they are attended.
        logits, cache = model.apply(variables, tokens, init_cache(model.config, b, total, model.dtype), 0,
                                    crma_enabled, method=Decoder.decode)
        return jax.lax.dynamic_slice_in_dim(logits, i, 1, axis=1), cache

    def step(i: jax.Array, carry: Any) -> Any:
        tokens, cache, rng = carry
        if switch is None:
            logits, cache = incremental(tokens, cache, i)
        else:
            logits, cache = jax.lax.cond(i == switch, recompute, incremental, tokens, cache, i)
        rng, sub = jax.random.split(rng)
        return tokens.at[:, i + 1].set(next_token(logits[:, -1], sub, temperature, top_p)), cache, rng

    tokens, _, _ = jax.lax.fori_loop(p, total - 1, step, (tokens, cache, rng))
    return tokens
