"""LoRA on the decoder's projections, with default (Kaiming A, zero B) or PiSSA init.

For a target projection with frozen kernel W (in, out):

    y = x·W + scale · (dropout(x)·A)·B,   A (in, r), B (r, out),   scale = alpha / r
                                                                  (alpha / √r with rsLoRA)

The factors live in the `lora` collection at `layers/<module>/<proj>/{a, b}`, stacked over
layers like every per-layer parameter. One collection holds one LoRA *set*; several named sets
(one per domain) are simply a dict `{name: lora_tree}`, and the set to use is the one passed as
`{"lora": sets[name]}` to `apply`: nothing else in the model changes.

PiSSA (`init="pissa"`) puts the top-r singular directions of W into the adapter,
A = U_r·√(S_r/scale), B = √(S_r/scale)·V_rᵀ, and leaves the residual W − scale·A·B frozen, so the
output is unchanged at init. `pissa_niter` selects a randomized SVD with that many power
iterations for large layers.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A collection each LoRA target sows XᵀX of its inputs into (the sum over batch and time) when
# it is mutable: `apply(..., mutable=[LORA_INPUTS])` measures them (InfLoRA, `crma_jax.cl`).
LORA_INPUTS = "lora_inputs"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters; `targets` are projection names (a subset of ALL_TARGETS)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False
    dropout: float = 0.0
    init: str = "default"  # "default" | "pissa"
    pissa_niter: int | None = None  # None: exact SVD; k: randomized SVD with k power iterations

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {ALL_TARGETS}")
        if self.init not in ("default", "pissa"):
            raise ValueError(f"LoRA init must be 'default' or 'pissa', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# PEFT's Kaiming-uniform with a=√5 on (r, in): U(−1/√in, 1/√in). Flax's fan_in of (in, r) is `in`.
lora_a_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def top_singular(w: jax.Array, rank: int, niter: int | None, key: jax.Array) -> tuple[jax.Array, ...]:
    """(U_r (in, r), S_r (r,), V_rᵀ (r, out)) of w (in, out) in float32: exact or randomized SVD."""
    w = w.astype(jnp.float32)
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    # Halko et al.: a Gaussian sketch with oversampling, `niter` re-orthonormalized power steps.
    sketch = min(rank + 8, min(w.shape))
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], sketch), jnp.float32))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    ub, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def pissa_residual(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W_res = W − scale·A·B in float32: the frozen base of a PiSSA adapter (A, B) on W."""
    return w.astype(jnp.float32) - scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))


def pissa_factors(w: jax.Array, cfg: LoraConfig, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A (in, r), B (r, out), W_res (in, out)) for one kernel, float32, with W = W_res + scale·A·B."""
    u, s, vt = top_singular(w, cfg.rank, cfg.pissa_niter, key)
    root = jnp.sqrt(s / cfg.scale)
    a = u * root[None, :]
    b = root[:, None] * vt
    return a, b, pissa_residual(w, a, b, cfg.scale)


def layer_keys_seed(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """The key whose split over layers seeds PiSSA's randomized SVD of the kernels at `path`."""
    return jax.random.fold_in(key, zlib.crc32("/".join(path).encode()))


def apply_pissa(params: Any, lora: Any, cfg: LoraConfig, key: jax.Array) -> tuple[Any, Any]:
    """PiSSA-initialize every LoRA pair in `lora` from the matching kernels of `params`.

    Returns (params with residual kernels in their original dtype, lora with the new factors).
    Kernels are stacked (L, in, out); each layer gets its own SVD.
    """
    flat_p = traverse_util.flatten_dict(params)
    flat_l = traverse_util.flatten_dict(lora)
    for path in sorted({p[:-1] for p in flat_l}):
        kernel = flat_p[path + ("kernel",)]
        keys = jax.random.split(layer_keys_seed(key, path), kernel.shape[0])
        a, b, res = jax.vmap(lambda w, k: pissa_factors(w, cfg, k))(kernel, keys)
        flat_l[path + ("a",)] = a.astype(flat_l[path + ("a",)].dtype)
        flat_l[path + ("b",)] = b.astype(flat_l[path + ("b",)].dtype)
        flat_p[path + ("kernel",)] = res.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat_p), traverse_util.unflatten_dict(flat_l)


def merge_lora(params: Any, lora: Any, cfg: LoraConfig) -> Any:
    """Fold a LoRA set into the (unquantized) kernels: W + scale·A·B, in each kernel's dtype."""
    flat_p = traverse_util.flatten_dict(params)
    flat_l = traverse_util.flatten_dict(lora)
    for path in {p[:-1] for p in flat_l}:
        kernel = flat_p[path + ("kernel",)]
        delta = jnp.einsum("lir,lro->lio", flat_l[path + ("a",)], flat_l[path + ("b",)])
        flat_p[path + ("kernel",)] = (kernel.astype(jnp.float32) + cfg.scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat_p)


def subtract_pissa(params: Any, lora_init: Any, cfg: LoraConfig) -> Any:
    """The base a PiSSA run trained on: every target kernel W -> W − scale·A0·B0, in its dtype.

    `lora_init` holds the initial factors (A0, B0) stacked over layers, as `apply_pissa` made
    them; reloading with them rebuilds the run's frozen base without another SVD.
    """
    flat_p = traverse_util.flatten_dict(params)
    flat_l = traverse_util.flatten_dict(lora_init)
    for path in {p[:-1] for p in flat_l}:
        kernel = flat_p[path + ("kernel",)]
        res = jax.vmap(lambda w, a, b: pissa_residual(w, a, b, cfg.scale))(
            kernel, flat_l[path + ("a",)], flat_l[path + ("b",)])
        flat_p[path + ("kernel",)] = res.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat_p)


def pissa_as_lora(lora: Any, lora_init: Any, cfg: LoraConfig) -> tuple[Any, LoraConfig]:
    """A trained PiSSA set as a plain LoRA on the *original* W: (tree, config) of rank 2r.

    The trained model is (W − s·A0·B0) + s·A·B = W + s·(A·B − A0·B0) = W + s·[A | A0]·[B ; −B0],
    so the concatenated factors with the same scale s reproduce it on W; this is the conversion
    PEFT users apply to PiSSA adapters. The returned config keeps `scale` (alpha is rescaled for
    rank 2r) and has `init="default"` (it is an ordinary LoRA now).
    """
    flat_l = traverse_util.flatten_dict(lora)
    flat_0 = traverse_util.flatten_dict(lora_init)
    out = {}
    for path, value in flat_l.items():
        init = jnp.asarray(flat_0[path], value.dtype)
        out[path] = jnp.concatenate([value, init], axis=-1) if path[-1] == "a" else jnp.concatenate([value, -init], axis=-2)
    return traverse_util.unflatten_dict(out), dataclasses.replace(with_rank(cfg, 2 * cfg.rank), init="default")


def with_rank(cfg: LoraConfig, rank: int) -> LoraConfig:
    """`cfg` for factors of rank `rank`, with the same `scale` (alpha rescaled), so a wider set
    built by joining factors (PiSSA's [A | A0], O-LoRA's [A₁ | … | A_k]) keeps its function."""
    return dataclasses.replace(cfg, rank=rank, alpha=cfg.scale * (math.sqrt(rank) if cfg.rslora else rank))


def lora_rank(lora: Any) -> int:
    """The rank of a LoRA set: the last axis of its `a` factors (every `a` must agree)."""
    ranks = {v.shape[-1] for path, v in traverse_util.flatten_dict(lora).items() if path[-1] == "a"}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA set's `a` factors must share one rank, got {sorted(ranks)}")
    return ranks.pop()
