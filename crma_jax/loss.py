"""Next-token cross-entropy: from full logits, or blockwise from hidden states (no (B, T, V) logits)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


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


VOCAB_BLOCK = 8192  # vocabulary columns per block of the blockwise LM head + cross-entropy
FULL_LOGITS_MAX = 2**26  # logits (rows x V) up to which the loss takes them all at once: 256 MiB f32


def _head_block(head: jax.Array, j: jax.Array, size: int, tied: bool, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Vocabulary block `j` of the head as (size, d) in `dtype`, its token ids, and which of them
    block `j` owns. The last block is shifted back to end at V (no padded copy of the head);
    columns an earlier block already covered are marked not owned."""
    vocab = head.shape[0 if tied else 1]
    start = jnp.minimum(j * size, vocab - size)
    block = slice_bits(head, start, size, axis=0 if tied else 1).astype(dtype)
    cols = start + jnp.arange(size)
    return (block if tied else block.T), cols, cols >= j * size


def slice_bits(x: jax.Array, start: jax.Array, size: int, axis: int) -> jax.Array:
    """`lax.dynamic_slice_in_dim` that slices 16-bit floats through their bits: XLA:CPU does not
    slice bf16/f16 natively and otherwise converts the *whole* operand to float32 first (3.4 GiB
    for Gemma-2's embedding). Not differentiable; for frozen arrays."""
    if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_slice_in_dim(bits, start, size, axis=axis), x.dtype)


def _block_logits(h: jax.Array, w: jax.Array, softcap: float | None) -> jax.Array:
    """float32 (R, size) logits of rows h (R, d) against head block w (size, d), soft-capped."""
    logits = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.tanh(logits / softcap) * softcap if softcap else logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blockwise_nll(h: jax.Array, targets: jax.Array, head: jax.Array, tied: bool, softcap: float | None,
                   vocab_block: int) -> jax.Array:
    """(n, R) float32 NLL of targets (n, R) from row chunks h (n, R, d) and the LM head."""
    return _nll_and_lse(h, targets, head, tied, softcap, vocab_block)[0]


def _n_blocks(head: jax.Array, tied: bool, vocab_block: int) -> tuple[int, int]:
    vocab = head.shape[0 if tied else 1]
    size = min(vocab_block, vocab)
    return -(-vocab // size), size


def _nll_and_lse(h, targets, head, tied, softcap, vocab_block):
    n_blocks, size = _n_blocks(head, tied, vocab_block)

    def chunk(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        hc, tc = xs

        def block(j, carry):  # online logsumexp over vocabulary blocks
            m, s, picked = carry
            w, cols, owned = _head_block(head, j, size, tied, hc.dtype)
            logits = jnp.where(owned, _block_logits(hc, w, softcap), -jnp.inf)
            m_new = jnp.maximum(m, logits.max(-1))
            s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
            hit = (cols == tc[:, None]) & owned
            return m_new, s, picked + jnp.where(hit, logits, 0.0).sum(-1)

        rows = tc.shape[0]
        init = (jnp.full((rows,), -jnp.inf), jnp.zeros((rows,)), jnp.zeros((rows,)))
        m, s, picked = jax.lax.fori_loop(0, n_blocks, block, init)
        lse = m + jnp.log(s)
        return lse - picked, lse

    return jax.lax.map(chunk, (h, targets))


def _nll_fwd(h, targets, head, tied, softcap, vocab_block):
    # Symbolic zeros tell whether the head is differentiated at all: a frozen head (every
    # adapter run) must not pay for, nor hold, a (V, d) float32 gradient.
    h, targets, head_needed, head = h.value, targets.value, head.perturbed, head.value
    nll, lse = _nll_and_lse(h, targets, head, tied, softcap, vocab_block)
    return nll, (h, targets, head, lse, () if head_needed else None)


def _dlogits(hc, tc, lse, g, w, cols, owned, softcap):
    """float32 (R, size) cotangent of the pre-cap logits of one block."""
    logits = _block_logits(hc, w, softcap)
    p = jnp.exp(logits - lse[:, None])
    dlogits = (p - (cols == tc[:, None])) * g[:, None]
    if softcap:
        dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
    return jnp.where(owned, dlogits, 0.0)


def _nll_bwd(tied, softcap, vocab_block, residuals, g):
    h, targets, head, lse, head_needed = residuals
    n_blocks, size = _n_blocks(head, tied, vocab_block)
    if isinstance(g, SymbolicZero):
        return None, None, None if head_needed is None else jnp.zeros(head.shape, head.dtype)

    def dh_chunk(xs):
        hc, tc, lc, gc = xs

        def block(j, dh):
            w, cols, owned = _head_block(head, j, size, tied, hc.dtype)
            dz = _dlogits(hc, tc, lc, gc, w, cols, owned, softcap).astype(hc.dtype)
            return dh + jnp.matmul(dz, w, preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(0, n_blocks, block, jnp.zeros(hc.shape, jnp.float32)).astype(hc.dtype)

    def dhead_block(j, dhead):
        w, cols, owned = _head_block(head, j, size, tied, h.dtype)

        def chunk(acc, xs):
            hc, tc, lc, gc = xs
            dz = _dlogits(hc, tc, lc, gc, w, cols, owned, softcap).astype(hc.dtype)
            return acc + jax.lax.dot_general(dz, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), None

        dw, _ = jax.lax.scan(chunk, jnp.zeros((size, h.shape[-1]), jnp.float32), (h, targets, lse, g))
        start = jnp.minimum(j * size, head.shape[0 if tied else 1] - size)
        axis = 0 if tied else 1
        old = jax.lax.dynamic_slice_in_dim(dhead, start, size, axis=axis)  # unowned columns add 0
        return jax.lax.dynamic_update_slice_in_dim(dhead, old + (dw if tied else dw.T), start, axis=axis)

    dh = jax.lax.map(dh_chunk, (h, targets, lse, g))
    if head_needed is None:
        return dh, None, None
    dhead = jax.lax.fori_loop(0, n_blocks, dhead_block, jnp.zeros(head.shape, jnp.float32))
    return dh, None, dhead.astype(head.dtype)


_blockwise_nll.defvjp(_nll_fwd, _nll_bwd, symbolic_zeros=True)


def chunked_token_nll(
    hidden: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    kernel: jax.Array | None = None,
    embedding: jax.Array | None = None,
    softcap: float | None = None,
    chunk_size: int = 1024,
    vocab_block: int = VOCAB_BLOCK,
    full_logits_max: int = FULL_LOGITS_MAX,
) -> jax.Array:
    """(B, T) float32 per-token NLL from final hidden states, holding no (B, T, V) logits
    beyond `full_logits_max` elements.

    hidden (B, T, d) in the compute dtype; the LM head is `kernel` (d, V) or a tied
    `embedding` (V, d) (exactly one), cast to hidden's dtype as `Decoder.logits` does, and the
    logits are float32 with optional tanh soft-capping. Column t holds the NLL of input_ids[:, t]
    predicted from position t − 1, times `loss_mask[:, t]`; column 0 is 0.

    The B·(T − 1) predicting rows are cut into chunks of `chunk_size` and the vocabulary into
    blocks of `vocab_block`: the logsumexp runs online over the blocks (as flash attention's
    softmax does) and the custom backward recomputes each block. Forward and backward hold
    O(chunk_size · vocab_block) logits and one head block in the compute dtype, never the
    (B, T, V) logits nor a float32 copy of the whole head (which XLA:CPU would otherwise make:
    3.4 GiB for Gemma-2's tied 256k × 3584 embedding). When all the logits number at most
    `full_logits_max`, they are computed at once and differentiated by autodiff instead: the
    blockwise backward recomputes the logits, one more head matmul (measured: value_and_grad
    of a SmolLM2 step at B·T = 1024 takes 5.21 s blockwise, 4.86 s at once; BENCHMARKS.md §3),
    which only pays off when the logits would not fit.
    """
    if (kernel is None) == (embedding is None):
        raise ValueError("pass exactly one of kernel (d, V) or embedding (V, d)")
    if chunk_size < 1 or vocab_block < 1:
        raise ValueError(f"chunk_size and vocab_block must be >= 1, got {chunk_size} and {vocab_block}")
    b, t, d = hidden.shape
    rows = b * (t - 1)
    h = hidden[:, :-1].reshape(rows, d)
    targets = input_ids[:, 1:].reshape(rows)
    tied = embedding is not None
    head = embedding if tied else kernel
    if rows * head.shape[0 if tied else 1] <= full_logits_max:
        nll = _full_nll(h, targets, head, tied, softcap or None).reshape(b, t - 1)
    else:
        nll = _rows_nll(h, targets, head, tied, softcap or None, chunk_size, vocab_block).reshape(b, t - 1)
    if loss_mask is not None:
        nll = nll * loss_mask[:, 1:].astype(jnp.float32)
    return jnp.pad(nll, ((0, 0), (1, 0)))


def _full_nll(h: jax.Array, targets: jax.Array, head: jax.Array, tied: bool, softcap: float | None) -> jax.Array:
    """(rows,) NLL from all the logits at once (small problems; plain autodiff)."""
    logits = _block_logits(h, head.astype(h.dtype) if tied else head.astype(h.dtype).T, softcap)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _rows_nll(h: jax.Array, targets: jax.Array, head: jax.Array, tied: bool, softcap: float | None,
              chunk_size: int, vocab_block: int) -> jax.Array:
    """(rows,) NLL through `_blockwise_nll` over row chunks of `chunk_size`."""
    rows, d = h.shape
    size = max(1, min(chunk_size, rows))
    n = -(-rows // size)
    h = jnp.pad(h, ((0, n * size - rows), (0, 0))).reshape(n, size, d)
    targets = jnp.pad(targets, (0, n * size - rows)).reshape(n, size)
    return _blockwise_nll(h, targets, head, tied, softcap, vocab_block).reshape(-1)[:rows]


def chunked_next_token_loss(
    hidden: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    kernel: jax.Array | None = None,
    embedding: jax.Array | None = None,
    softcap: float | None = None,
    chunk_size: int = 1024,
    vocab_block: int = VOCAB_BLOCK,
    full_logits_max: int = FULL_LOGITS_MAX,
) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss` from hidden states through `chunked_token_nll`: float32 (sum, count)."""
    nll = chunked_token_nll(hidden, input_ids, loss_mask, kernel=kernel, embedding=embedding, softcap=softcap,
                            chunk_size=chunk_size, vocab_block=vocab_block, full_logits_max=full_logits_max)
    return jnp.sum(nll), target_count(input_ids, loss_mask)


def target_count(input_ids: jax.Array, loss_mask: jax.Array | None) -> jax.Array:
    """float32 number of predicted target tokens (columns 1.. where `loss_mask` is 1)."""
    if loss_mask is None:
        return jnp.asarray(input_ids.shape[0] * (input_ids.shape[1] - 1), jnp.float32)
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32))
