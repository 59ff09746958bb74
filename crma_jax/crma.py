"""The CRMA adapter: a Sinkhorn-bounded mixing of n residual streams after each decoder layer.

For the residual h (B, T, d) leaving a decoder layer:

    U  = QR(read).Q               (d, n)  orthonormal streams (Gram-Schmidt twice, R's diagonal > 0)
    M  = sinkhorn(log_mix)        (n, n)  doubly stochastic, ||M||_2 <= 1 by construction
    α  = sigmoid(gate)                    in (0, 1)
    s  = h @ U                    (B, T, n)
    h' = h + α · (s @ Mᵀ − s) @ Uᵀ

On span(U) the map is (1−α)I + αMᵀ, elsewhere the identity, so the whole map is
non-expansive: ||h'|| <= ||h||. At init (`CRMAConfig`'s defaults) `log_mix = 4·I` makes
||M − I||_2 = 0.07 (n = 4) and `gate = −2` makes α = 0.12, so h moves by at most 0.8% on
span(U) and not at all outside it: SmolLM2 starts 1.5e-3 nats above its base loss. `read` starts
orthonormal, so no read/write path shrinks h.

The parameters live in the `crma` collection (`read` (d, n), `log_mix` (n, n), `gate` ()).
Diagnostics (||M||_2, the Sinkhorn residual, α, the gain ||h'||/||h||) are sown into the
`diagnostics` collection when it is mutable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crma_jax.sinkhorn import sinkhorn, sinkhorn_residual, spectral_norm

DIAGNOSTICS = "diagnostics"


@dataclasses.dataclass(frozen=True)
class CRMAConfig:
    """CRMA hyper-parameters. `enabled=False` makes every CRMA layer the identity."""

    rank: int = 4
    sinkhorn_iters: int = 20
    # The one default start, for the API and `crma train` alike (RESULTS.md, "Does the substrate
    # learn?"): from 8·I with gate 0 the substrate barely moves in a short run; from 4·I with
    # gate −2 (α = 0.12) it learns, and starts SmolLM2 at +1.5e-3 nats over the base on legal text
    # (tests/test_smollm2.py checks < 2e-3).
    init_mix_logit: float = 4.0
    init_gate: float = -2.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"CRMA rank must be >= 1, got {self.rank}")
        if self.sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters must be >= 0, got {self.sinkhorn_iters}")


def orthonormal_init(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A random (d, n) matrix with orthonormal columns (QR of a Gaussian), float32."""
    q, r = jnp.linalg.qr(jax.random.normal(key, shape, jnp.float32))
    return q * jnp.sign(jnp.diagonal(r))[None, :]  # a sign fix makes the draw Haar-uniform


def orthonormal_columns(read: jax.Array) -> jax.Array:
    """U (d, n) float32: the Q of read = QR with R's diagonal positive, by Gram-Schmidt with one
    re-orthogonalisation pass per column ("twice is enough", Giraud et al. 2005).

    One pass of modified Gram-Schmidt loses orthogonality in proportion to cond(read), and the
    non-expansive bound needs an orthonormal U; the second pass keeps ‖UᵀU − I‖ at float32
    rounding level for condition numbers up to ~1e6. For the few columns CRMA uses, 2n unrolled
    projections cost next to nothing, where the differentiated LAPACK QR inside the layer scan
    took a quarter of a SmolLM2 training step.
    """
    a = read.astype(jnp.float32)
    cols: list[jax.Array] = []
    for j in range(a.shape[-1]):
        v = a[:, j]
        for _ in range(2):
            for q in cols:
                v = v - jnp.dot(q, v) * q
        cols.append(v * jax.lax.rsqrt(jnp.maximum(jnp.dot(v, v), 1e-30)))
    return jnp.stack(cols, axis=-1)


def mixing_operator(read: jax.Array, log_mix: jax.Array, gate: jax.Array, iters: int) -> tuple[jax.Array, ...]:
    """(U (d, n), M (n, n), α (), K (n, n)) in float32, with K = α (Mᵀ − I), so h' = h + (h U) K Uᵀ."""
    u = orthonormal_columns(read)
    m = sinkhorn(log_mix, iters)
    alpha = jax.nn.sigmoid(gate.astype(jnp.float32))
    k = alpha * (m.T - jnp.eye(m.shape[-1], dtype=jnp.float32))
    return u, m, alpha, k


def mix_displacement(crma: dict[str, Any], iters: int) -> jax.Array:
    """(L,) float32 ‖α(Mᵀ − I)‖_F per layer of a stacked `crma` collection: how far each
    layer's map has moved from the identity on its streams (0 for M = I or α = 0)."""
    p = crma["layers"]["crma"]
    return jax.vmap(lambda r, lm, g: jnp.linalg.norm(mixing_operator(r, lm, g, iters)[3]))(
        p["read"], p["log_mix"], p["gate"])


class CRMA(nn.Module):
    """h (B, T, d) -> h' (B, T, d) in h's dtype; the identity when `enabled` is False."""

    config: CRMAConfig

    @nn.compact
    def __call__(self, h: jax.Array, enabled: bool = True) -> jax.Array:
        cfg = self.config
        d, n = h.shape[-1], cfg.rank
        if not self.has_variable("crma", "read") and not self.is_mutable_collection("crma"):
            return h  # a base-only apply: {"params": ...} without the `crma` collection
        read = self.variable("crma", "read", lambda: orthonormal_init(self.make_rng("params"), (d, n))).value
        log_mix = self.variable("crma", "log_mix", lambda: cfg.init_mix_logit * jnp.eye(n, dtype=jnp.float32)).value
        gate = self.variable("crma", "gate", lambda: jnp.asarray(cfg.init_gate, jnp.float32)).value
        if not (enabled and cfg.enabled):
            return h
        u, m, alpha, k = mixing_operator(read, log_mix, gate, cfg.sinkhorn_iters)
        u_h = u.astype(h.dtype)
        delta = ((h @ u_h) @ k.astype(h.dtype)) @ u_h.T
        out = h + delta
        if self.is_mutable_collection(DIAGNOSTICS):
            h32, out32 = h.astype(jnp.float32), out.astype(jnp.float32)
            gain = jnp.sqrt(jnp.sum(out32 * out32) / jnp.maximum(jnp.sum(h32 * h32), 1e-30))
            self.sow(DIAGNOSTICS, "spectral_norm", spectral_norm(m))
            self.sow(DIAGNOSTICS, "sinkhorn_residual", sinkhorn_residual(m))
            self.sow(DIAGNOSTICS, "alpha", alpha)
            self.sow(DIAGNOSTICS, "gain", gain)
        return out


def crma_diagnostics(state: dict[str, Any]) -> dict[str, jax.Array]:
    """Per-layer (L,) arrays from the state of `model.apply(..., mutable=["diagnostics"])`."""
    sown = state[DIAGNOSTICS]["layers"]["crma"]
    return {k: v[0] for k, v in sown.items()}  # sow stores a 1-tuple per name
