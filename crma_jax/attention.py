"""Scaled dot-product attention for the decoder: one contract, three implementations.

Every implementation takes the same arguments and returns the same thing:

    q (B, T, H, hd), k and v (B, S, KV, hd) with H a multiple of KV (grouped-query attention:
    query head h reads KV head h // (H // KV); K/V are never repeated), a `MaskInfo` saying
    which keys each query may see, the `scale` applied to q·k and an optional tanh soft-cap
    of the scores. Output (B, T, H, hd) in q's dtype. Scores and softmax statistics are float32
    whatever the input dtype (float32 or bfloat16).

- `reference_attention`: the plain einsum path. It materialises (B, KV, G, T, S) float32 scores
  and a (B, T, S) mask, so its memory is quadratic in T; it is the numerical reference.
- `blockwise_attention`: online-softmax attention over (block_q, block_k) tiles with a custom
  VJP that recomputes each tile in the backward pass (FlashAttention-2), so forward and backward
  memory is linear in T.
- cuDNN's fused kernel through `jax.nn.dot_product_attention`, for the cases it covers.

`dot_product_attention(..., impl=...)` picks one; see its docstring for the "auto" rule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A window this large excludes nothing: the encoding of "no window" when the window is a traced
# per-layer value (Gemma-2 alternates windowed and full layers inside one scanned layer body).
NO_WINDOW = 1 << 30
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
_MASKED = float(jnp.finfo(jnp.float32).min)


class MaskInfo(NamedTuple):
    """Which keys each query may see, carried as O(T + S) arrays, never as a (B, T, S) mask.

    Query t sits at absolute index `offset + t` and key s at index s. Query t may see key s iff

        s <= offset + t                                   (causal)
        and offset + t - s < window                       (sliding window, if any)
        and kv_valid[b, s]                                (key padding, if given)
        and q_segment[b, t] == kv_segment[b, s]           (packed documents, if given)

    Fields: `q_segment` (B, T) and `kv_segment` (B, S) integer ids (both or neither);
    `kv_valid` (B, S) bool or int with 0 = padding; `offset` an int or int32 scalar (may be
    traced, e.g. the KV-cache write index); `window` None, an int, or an int32 scalar (may be
    traced); values >= NO_WINDOW mean no window.
    """

    q_segment: jax.Array | None = None
    kv_segment: jax.Array | None = None
    kv_valid: jax.Array | None = None
    offset: jax.Array | int = 0
    window: jax.Array | int | None = None


def allowed(
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: jax.Array | int | None,
    q_segment: jax.Array | None,
    kv_segment: jax.Array | None,
    kv_valid: jax.Array | None,
) -> jax.Array:
    """Bool (B or 1, tq, tk): may query at absolute index q_pos[i] see key k_pos[j]?

    `q_segment` (B, tq), `kv_segment` and `kv_valid` (B, tk) are the matching slices of a
    `MaskInfo`'s arrays (or None).
    """
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    ok = ok[None]
    if kv_valid is not None:
        ok = ok & (kv_valid[:, None, :] != 0)
    if q_segment is not None:
        ok = ok & (q_segment[:, :, None] == kv_segment[:, None, :])
    return ok


def mask_matrix(mask: MaskInfo, length: int, kv_length: int) -> jax.Array:
    """The dense bool (B or 1, T, S) form of `mask`; only the reference path builds it."""
    q_pos = mask.offset + jnp.arange(length)
    return allowed(q_pos, jnp.arange(kv_length), mask.window, mask.q_segment, mask.kv_segment, mask.kv_valid)


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float, softcap: float | None = None
) -> jax.Array:
    """Quadratic-memory attention: (B, T, H, hd) in q's dtype (see the module docstring).

    Op order matches transformers' eager attention: q is scaled in its own dtype, q·k runs in
    that dtype, scores are soft-capped in float32, and the probabilities are cast back to q's
    dtype before the PV product. A fully masked row (a padding query) gets uniform weights
    over all keys instead of NaN; its output is meaningless but finite.
    """
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    # Heads-major with each KV head's G query heads folded into the rows: (B, KV, G·T, hd).
    # Both products are then plain batched matmuls over (B, KV), which XLA:CPU runs about
    # 1.7x faster (forward + backward) than the same einsums on the (B, T, KV, G, hd) layout.
    qf = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    kf, vf = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qf, kf).astype(jnp.float32)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    ok = mask_matrix(mask, t, s)
    ok = jnp.broadcast_to(ok[:, None], (ok.shape[0], g, t, s)).reshape(ok.shape[0], 1, g * t, s)
    scores = jnp.where(ok, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vf).reshape(b, kv, g, t, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash) attention.


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static facts about one blockwise call (hashable: a custom_vjp non-differentiable arg)."""

    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    kv_length: int  # keys at or past this index are block padding


class _Segs(NamedTuple):
    q_segment: jax.Array | None
    kv_segment: jax.Array | None
    kv_valid: jax.Array | None


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(x: jax.Array | None, axis: int, to: int) -> jax.Array | None:
    if x is None or x.shape[axis] == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def _tile_mask(tl: _Tiling, segs: _Segs, offset: jax.Array, window: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Bool (B or 1, 1, 1, block_q, block_k) for query block i against key block j."""
    bq, bk = tl.block_q, tl.block_k
    q_pos = offset + i * bq + jnp.arange(bq)
    k_pos = j * bk + jnp.arange(bk)

    def rows(x: jax.Array | None, start: jax.Array, size: int) -> jax.Array | None:
        return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)

    kv_valid = rows(segs.kv_valid, j * bk, bk)
    if segs.kv_valid is None and tl.kv_length % bk:
        kv_valid = (k_pos < tl.kv_length)[None]
    elif tl.kv_length % bk:
        kv_valid = kv_valid & (k_pos < tl.kv_length)[None]
    ok = allowed(q_pos, k_pos, window, rows(segs.q_segment, i * bq, bq), rows(segs.kv_segment, j * bk, bk), kv_valid)
    return ok[:, None, None]


def _scores(tl: _Tiling, qs: jax.Array, kj: jax.Array) -> jax.Array:
    """Float32 (soft-capped) scores (B, KV, G, bq, bk) of scaled queries against one key block."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qs, kj, preferred_element_type=jnp.float32)
    return s if not tl.softcap else jnp.tanh(s / tl.softcap) * tl.softcap


def _kv_blocks(tl: _Tiling, n_kv: int, offset: jax.Array, window: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) key blocks that query block i can see (causality and window); the rest are skipped."""
    first_q = offset + i * tl.block_q
    hi = jnp.clip((first_q + tl.block_q - 1) // tl.block_k + 1, 0, n_kv)
    lo = jnp.clip((first_q - window + 1) // tl.block_k, 0, n_kv)
    return lo, hi


def _q_blocks(tl: _Tiling, n_q: int, offset: jax.Array, window: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) query blocks that can see key block j (the transpose of `_kv_blocks`)."""
    bq, bk = tl.block_q, tl.block_k
    lo = jnp.clip((j * bk - offset) // bq, 0, n_q)
    hi = jnp.clip((window + (j + 1) * bk - 2 - offset) // bq + 1, 0, n_q)
    return lo, hi


def _flash_forward(tl: _Tiling, q, k, v, segs, offset, window) -> tuple[jax.Array, jax.Array]:
    """out (B, Tp, KV, G, hd) in q's dtype and the row logsumexp (B, KV, G, Tp) float32."""
    b, tp, kv, g, hd = q.shape
    bq, bk = tl.block_q, tl.block_k
    n_kv = k.shape[1] // bk
    qs = q * jnp.asarray(tl.scale, q.dtype)

    def query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        qi = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)

        def step(j: jax.Array, carry: tuple) -> tuple:
            m, l, acc = carry
            ok = _tile_mask(tl, segs, offset, window, i, j)
            s = jnp.where(ok, _scores(tl, qi, jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)), _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            # Explicit zeros, not exp(MASKED - max): a row with nothing visible yet must stay at 0.
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

        init = (
            jnp.full((b, kv, g, bq), _MASKED, jnp.float32),
            jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, hd), jnp.float32),
        )
        lo, hi = _kv_blocks(tl, n_kv, offset, window, i)
        m, l, acc = jax.lax.fori_loop(lo, hi, step, init)
        seen = l > 0  # False only for a query that may see no key at all: output 0
        l_safe = jnp.where(seen, l, 1.0)
        out = (acc / l_safe[..., None]).astype(q.dtype)
        return jnp.moveaxis(out, 3, 1), jnp.where(seen, m + jnp.log(l_safe), 0.0)

    outs, lses = jax.lax.map(query_block, jnp.arange(tp // bq))
    out = jnp.moveaxis(outs, 0, 1).reshape(b, tp, kv, g, hd)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kv, g, tp)
    return out, lse


def _flash_backward(tl: _Tiling, q, k, v, segs, offset, window, out, lse, dout) -> tuple:
    """(dq, dk, dv) by recomputing each visible tile; key blocks outer, query blocks inner."""
    b, tp, kv, g, hd = q.shape
    bq, bk = tl.block_q, tl.block_k
    n_q, n_kv = tp // bq, k.shape[1] // bk
    scale = jnp.asarray(tl.scale, q.dtype)
    qs = q * scale
    # D_i = rowsum(dO ∘ O) = Σ_s P·dP: the softmax-Jacobian term, computed once per row.
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq: jax.Array, j: jax.Array) -> tuple:
        kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)

        def step(i: jax.Array, carry: tuple) -> tuple:
            dq, dk, dv = carry
            qi = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)
            doi = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=1)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)[..., None]
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)[..., None]
            ok = _tile_mask(tl, segs, offset, window, i, j)
            s = _scores(tl, qi, kj)
            p = jnp.where(ok, jnp.exp(jnp.where(ok, s, _MASKED) - lse_i), 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i)
            if tl.softcap:
                ds = ds * (1.0 - jnp.square(s / tl.softcap))  # d(c·tanh(x/c))/dx = 1 − tanh²
            ds = ds.astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dq_old = jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_old + dqi, i * bq, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros((b, bk, kv, hd), jnp.float32)
        lo, hi = _q_blocks(tl, n_q, offset, window, j)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_kv))
    dk = jnp.moveaxis(dks, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dvs, 0, 1).reshape(v.shape)
    return (dq * scale.astype(jnp.float32)).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tl: _Tiling, q, k, v, segs, offset, window) -> jax.Array:
    return _flash_forward(tl, q, k, v, segs, offset, window)[0]


def _flash_fwd(tl, q, k, v, segs, offset, window):
    out, lse = _flash_forward(tl, q, k, v, segs, offset, window)
    return out, (q, k, v, segs, offset, window, out, lse)


def _flash_bwd(tl, res, dout):
    q, k, v, segs, offset, window, out, lse = res
    dq, dk, dv = _flash_backward(tl, q, k, v, segs, offset, window, out, lse, dout)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskInfo,
    *,
    scale: float,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Linear-memory attention: (B, T, H, hd) in q's dtype (see the module docstring).

    Online softmax over (block_q, block_k) tiles (clipped to T and S; ragged T or S are padded
    and the padding masked). The custom VJP saves only q, k, v, the output and the per-row
    logsumexp, and recomputes every tile in the backward pass, so neither pass holds more than
    O((T + S) · block) scores. Key blocks wholly above the causal diagonal or wholly outside the
    window are skipped (the loop bounds are computed from `offset` and `window`, which may be
    traced). A query that may see no key at all (a padding query) gets output 0 and gradient 0.
    Scores, softmax statistics and gradient accumulators are float32; the probabilities are cast
    to the input dtype before the PV product, as in `reference_attention`.
    """
    b, t, h, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    if (mask.q_segment is None) != (mask.kv_segment is None):
        raise ValueError("MaskInfo needs both q_segment and kv_segment, or neither")
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = _ceil_to(t, bq), _ceil_to(s, bk)
    tl = _Tiling(float(scale), float(softcap) if softcap else None, bq, bk, s)
    segs = _Segs(_pad(mask.q_segment, 1, tp), _pad(mask.kv_segment, 1, sp), _pad(mask.kv_valid, 1, sp))
    offset = jnp.asarray(mask.offset, jnp.int32)
    window = jnp.asarray(NO_WINDOW if mask.window is None else jnp.minimum(mask.window, NO_WINDOW), jnp.int32)
    qg = _pad(q.reshape(b, t, kv, h // kv, hd), 1, tp)
    out = _flash(tl, qg, _pad(k, 1, sp), _pad(v, 1, sp), segs, offset, window)
    return out[:, :t].reshape(b, t, h, hd)


def compiling_for() -> str:
    """The platform the code being traced will run on: that of the mesh a training step is
    traced under (`jit_train_step` sets it), which for a target's compile on a CPU-only host
    is the target's ("gpu", "tpu"); else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _cudnn_gaps(q: jax.Array, k: jax.Array, mask: MaskInfo, softcap: float | None) -> list[str]:
    """What cuDNN's fused kernel (through `jax.nn.dot_product_attention`) cannot express here."""
    gaps = []
    if softcap:
        gaps.append("tanh soft-capping")
    if mask.q_segment is not None:
        gaps.append("packed segment ids")
    if not (isinstance(mask.offset, int) and mask.offset == 0) or q.shape[1] != k.shape[1]:
        gaps.append("a query offset (KV-cache decoding)")
    if mask.window is not None and not isinstance(mask.window, int):
        gaps.append("a traced window")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        gaps.append(f"{q.dtype} inputs (the fused kernel takes bfloat16/float16)")
    return gaps


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float, softcap: float | None = None
) -> jax.Array:
    """cuDNN flash attention on a GPU; raises ValueError for a case it does not cover.

    Causality, a static window and key padding go through the kernel's own arguments (no mask
    array). `kv_valid` becomes per-row key lengths, so it must be right padding (each row's
    valid keys a prefix); "auto" never routes padded batches here for that reason.
    """
    gaps = _cudnn_gaps(q, k, mask, softcap)
    if (platform := compiling_for()) != "gpu":
        gaps.append(f"the {platform!r} backend (cuDNN needs a GPU)")
    if gaps:
        raise ValueError("attention impl 'cudnn' does not cover " + ", ".join(gaps) + "; use 'blockwise' or 'xla'")
    lengths = None if mask.kv_valid is None else jnp.sum(mask.kv_valid != 0, axis=1).astype(jnp.int32)
    window = None if mask.window is None or mask.window >= NO_WINDOW else (mask.window - 1, 0)
    try:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
            local_window_size=window, implementation="cudnn",
        )
    except RuntimeError as e:  # JAX loads cuDNN to trace the kernel, even for a target without its GPU
        if "cuDNN" not in str(e):
            raise
        raise ValueError(f"attention impl 'cudnn': {e} JAX needs the cuDNN library to trace the kernel, also when "
                         "compiling for a GPU target on a host without one: install nvidia-cudnn-cu12, or use "
                         "'blockwise'") from e


def resolve_impl(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    mask: MaskInfo,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
    backend: str | None = None,
) -> str:
    """The implementation `dot_product_attention` runs: "xla", "blockwise" or "cudnn"."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    t, s = q.shape[1], k.shape[1]
    if t * s <= block_q * block_k:
        return "xla"
    backend = compiling_for() if backend is None else backend
    if backend == "gpu" and not _cudnn_gaps(q, k, mask, softcap) and mask.kv_valid is None:
        return "cudnn"
    return "blockwise"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskInfo,
    *,
    scale: float,
    softcap: float | None = None,
    impl: str = "auto",
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Attention (B, T, H, hd) by `impl` in {"auto", "xla", "blockwise", "cudnn"}.

    "xla" is `reference_attention`; "blockwise" is `blockwise_attention` with the given tile
    sizes; "cudnn" is `cudnn_attention` (ValueError where it does not apply). "auto" picks:

    1. "xla" when the whole (T, S) score matrix is no larger than one (block_q, block_k) tile:
       incremental decoding (T == 1 against a KV cache) and short sequences, where tiling only
       adds loop overhead and the quadratic buffer is small anyway. Its backward recomputes the
       scores (`jax.checkpoint`), so, like the others, it keeps no (T, S) residual;
    2. "cudnn" on a GPU backend when the kernel covers the call exactly: no soft-cap, no packed
       segments, no key padding (its lengths would assume right padding), offset 0 with T == S,
       a static window, bfloat16/float16 inputs;
    3. "blockwise" otherwise (training-size sequences on CPU/TPU, Gemma-2's soft-capping,
       packed batches, padded batches, prefill into a KV cache).
    """
    chosen = resolve_impl(impl, q, k, mask, softcap, block_q, block_k)
    if chosen == "xla":
        # Recompute the scores in the backward pass rather than keep them: inside the layer scan
        # every layer's (B, KV, G·T, S) float32 probabilities would otherwise be stacked as a
        # residual, which cost 16% of SmolLM2's training step (BENCHMARKS.md §3).
        return jax.checkpoint(lambda q, k, v: reference_attention(q, k, v, mask, scale=scale, softcap=softcap))(q, k, v)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, mask, scale=scale, softcap=softcap)
    return blockwise_attention(q, k, v, mask, scale=scale, softcap=softcap, block_q=block_q, block_k=block_k)
