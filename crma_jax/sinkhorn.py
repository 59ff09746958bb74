"""Log-domain Sinkhorn normalisation with a spectral bound that holds by construction.

`sinkhorn(log_mix)` maps logits (..., n, n) to a nonnegative (..., n, n) matrix M that is doubly
stochastic up to `sinkhorn_residual(M)` and always satisfies

    ||M||_2 <= sqrt(||M||_1 ||M||_inf) <= 1

(up to float32 rounding, about n * 2**-24), for any finite logits and any iteration count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.typing import ArrayLike

__all__ = ["sinkhorn", "spectral_norm", "sinkhorn_residual"]


def sinkhorn(log_mix: ArrayLike, iters: int = 20) -> jax.Array:
    """Sinkhorn-normalise logits into a (nearly) doubly stochastic matrix with ||M||_2 <= 1.

    Args:
      log_mix: logits, shape (..., n, n), any float dtype; leading axes are a batch.
      iters: number of (row, column) normalisation sweeps; a static Python int >= 0.

    Returns:
      M: float32, shape (..., n, n), M >= 0, every row and column sum <= 1, hence
      ||M||_2 <= 1. Where the iteration has converged, M is doubly stochastic and ||M||_2 = 1.

    Computed in float32 whatever the input dtype. Differentiable (reverse mode), finite value and
    gradient for logits in [-1e4, 1e4].
    """
    z = jnp.asarray(log_mix).astype(jnp.float32)
    if z.ndim < 2 or z.shape[-1] != z.shape[-2]:
        raise ValueError(f"sinkhorn expects (..., n, n) logits, got shape {z.shape}")
    # Sinkhorn is invariant to a constant shift of the logits, so this changes nothing for
    # iters >= 1; it keeps exp() from overflowing when iters == 0. No stop_gradient: for
    # iters == 0 the shift does change the output, and the gradient must say so.
    z = z - jnp.max(z, axis=(-2, -1), keepdims=True)

    def sweep(_: int, z: jax.Array) -> jax.Array:
        z = z - logsumexp(z, axis=-1, keepdims=True)  # rows sum to 1
        return z - logsumexp(z, axis=-2, keepdims=True)  # columns sum to 1

    # A static trip count lowers to a scan, which reverse-mode autodiff supports.
    z = jax.lax.fori_loop(0, iters, sweep, z)
    m = jnp.exp(z)  # z <= 0 here (after the shift or a column sweep), so no overflow

    # Twenty sweeps do not converge for general logits, so the bound cannot rest on convergence:
    # dividing by the largest row/column sum (when above 1) makes ||M||_1, ||M||_inf <= 1.
    # max(1, .) leaves a converged matrix untouched, so there ||M||_2 = 1. The divisor is >= 1
    # and every sum is finite, so value and gradient stay finite; at ties, jnp.max/maximum split
    # the gradient between the tied entries instead of producing NaN.
    max_row = jnp.max(jnp.sum(m, axis=-1), axis=-1)
    max_col = jnp.max(jnp.sum(m, axis=-2), axis=-1)
    scale = jnp.maximum(1.0, jnp.maximum(max_row, max_col))
    return m / scale[..., None, None]


def spectral_norm(m: ArrayLike) -> jax.Array:
    """Largest singular value of each matrix.

    Args:
      m: shape (..., n, k), any float dtype.

    Returns:
      float32, shape (...,). A diagnostic (float32 SVD, accurate to a few float32 ulps); do not
      differentiate it at repeated singular values.
    """
    s = jnp.linalg.svd(jnp.asarray(m).astype(jnp.float32), compute_uv=False)
    return s[..., 0]  # singular values come sorted in descending order


def sinkhorn_residual(m: ArrayLike) -> jax.Array:
    """Distance from double stochasticity: max over |row sum - 1| and |column sum - 1|.

    Args:
      m: shape (..., n, n), any float dtype.

    Returns:
      float32, shape (...,); 0 exactly for a doubly stochastic matrix.
    """
    m = jnp.asarray(m).astype(jnp.float32)
    row_err = jnp.max(jnp.abs(jnp.sum(m, axis=-1) - 1.0), axis=-1)
    col_err = jnp.max(jnp.abs(jnp.sum(m, axis=-2) - 1.0), axis=-1)
    return jnp.maximum(row_err, col_err)
