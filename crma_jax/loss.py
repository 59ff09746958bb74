"""Next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and the number of predicted tokens.

    logits (B, T, V) predict input_ids[:, 1:]; `mask` (B, T), if given, marks target tokens that
    count (1) or not (0): padding, prompts, document starts. Returns float32 scalars (sum, count).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)
