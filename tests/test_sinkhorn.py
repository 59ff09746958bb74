"""Properties of crma_jax.sinkhorn: the spectral bound by construction, convergence, finiteness."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crma_jax.crma import CRMAConfig
from crma_jax.sinkhorn import sinkhorn, sinkhorn_residual, spectral_norm

# One jitted function per (shape, dtype, iters); hypothesis examples reuse compiled shapes.
_sinkhorn = jax.jit(sinkhorn, static_argnames="iters")


@jax.jit
def _grad_20(logits: jax.Array, weights: jax.Array) -> jax.Array:
    return jax.grad(lambda z: jnp.sum(sinkhorn(z, 20) * weights) + jnp.max(sinkhorn(z, 20)))(logits)


@jax.jit
def _grad_0(logits: jax.Array, weights: jax.Array) -> jax.Array:
    return jax.grad(lambda z: jnp.sum(sinkhorn(z, 0) * weights))(logits)


SETTINGS = settings(max_examples=40, deadline=None)
BATCHES = st.sampled_from([(), (3,), (2, 2)])
# A few sizes shared by the slower tests, so compiled shapes are reused across examples.
SIZES = st.sampled_from([2, 3, 5, 8, 16])
# float32 rounding of an n-term sum: the bound holds to within this (measured max overshoot of
# row/column sums and of ||M||_2 over 20k random draws: 1.9e-7).
BOUND_TOL = 1e-6


def _logits(batch: tuple[int, ...], n: int, limit: float) -> st.SearchStrategy[np.ndarray]:
    entries = st.floats(-limit, limit, width=32, allow_subnormal=False)
    return hnp.arrays(np.float32, batch + (n, n), elements=entries)


def _np_logsumexp(z: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(z, axis=axis, keepdims=True)
    return peak + np.log(np.sum(np.exp(z - peak), axis=axis, keepdims=True))


def _reference(logits: np.ndarray, iters: int) -> np.ndarray:
    """Independent float64 Sinkhorn with the final rescale (the contract, written out)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=(-2, -1), keepdims=True)
    for _ in range(iters):
        z = z - _np_logsumexp(z, -1)
        z = z - _np_logsumexp(z, -2)
    m = np.exp(z)
    scale = np.maximum(1.0, np.maximum(m.sum(-1).max(-1), m.sum(-2).max(-1)))
    return m / scale[..., None, None]


@SETTINGS
@given(
    data=st.data(),
    batch=BATCHES,
    n=st.integers(2, 16),
    iters=st.sampled_from([0, 1, 5, 20]),
    bf16=st.booleans(),
)
def test_bound_holds_for_any_logits(data, batch, n, iters, bf16):
    logits = data.draw(_logits(batch, n, 30.0))
    x = logits.astype(ml_dtypes.bfloat16) if bf16 else logits
    m = _sinkhorn(x, iters=iters)
    chex.assert_shape(m, batch + (n, n))
    chex.assert_type(m, jnp.float32)
    chex.assert_tree_all_finite(m)
    m64 = np.asarray(m, np.float64)
    assert (m64 >= 0).all()
    assert m64.sum(-1).max(initial=0) <= 1 + BOUND_TOL
    assert m64.sum(-2).max(initial=0) <= 1 + BOUND_TOL
    # The true 2-norm of the stored matrix (float64 SVD), and our float32 diagnostic.
    assert np.linalg.norm(m64, 2, axis=(-2, -1)).max(initial=0) <= 1 + BOUND_TOL
    assert float(jnp.max(spectral_norm(m))) <= 1 + BOUND_TOL


@SETTINGS
@given(data=st.data(), batch=BATCHES, n=SIZES)
def test_converged_matrix_is_doubly_stochastic_with_unit_norm(data, batch, n):
    logits = data.draw(_logits(batch, n, 1.0))  # entries in [-1, 1]: std <= 1
    m = _sinkhorn(logits, iters=200)
    res = np.asarray(sinkhorn_residual(m)).reshape(-1)
    converged = res <= 1e-6
    assume(converged.any())
    m64 = np.asarray(m, np.float64).reshape(-1, n, n)[converged]
    np.testing.assert_allclose(m64.sum(-1), 1.0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(m64.sum(-2), 1.0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(m64, 2, axis=(-2, -1)), 1.0, atol=1e-5, rtol=0)
    norms = np.asarray(spectral_norm(m)).reshape(-1)[converged]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5, rtol=0)


def test_unit_variance_logits_converge_in_200_iterations():
    # Guards the test above against passing vacuously: nearly every N(0, 1) draw converges.
    rng = np.random.default_rng(0)
    for n in (2, 4, 16):
        logits = rng.standard_normal((200, n, n)).astype(np.float32)
        res = np.asarray(sinkhorn_residual(_sinkhorn(logits, iters=200)))
        assert (res <= 1e-6).mean() >= 0.99, (n, res.max())


_EXTREME = st.one_of(
    st.sampled_from([-1e4, 1e4, 0.0]), st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
)


@SETTINGS
@given(data=st.data(), n=st.sampled_from([2, 5, 8]), bf16=st.booleans())
def test_value_and_gradient_finite_at_extreme_logits(data, n, bf16):
    logits = data.draw(hnp.arrays(np.float32, (2, n, n), elements=_EXTREME))
    weights = data.draw(hnp.arrays(np.float32, (2, n, n), elements=st.floats(-1, 1, width=32)))
    x = jnp.asarray(logits.astype(ml_dtypes.bfloat16) if bf16 else logits)
    for iters in (0, 1, 20):
        chex.assert_tree_all_finite(_sinkhorn(x, iters=iters))
    g20, g0 = _grad_20(x, weights), _grad_0(x, weights)
    chex.assert_shape([g20, g0], x.shape)
    chex.assert_tree_all_finite([g20, g0])


@pytest.mark.parametrize("value", [-1e4, 0.0, 1e4])
def test_gradient_finite_for_constant_logits(value):
    # Every entry ties for the max, every row and column sum ties in the rescale.
    x = jnp.full((3, 5, 5), value, jnp.float32)
    w = jnp.arange(75, dtype=jnp.float32).reshape(3, 5, 5)
    chex.assert_tree_all_finite([_grad_20(x, w), _grad_0(x, w)])
    np.testing.assert_allclose(np.asarray(_sinkhorn(x, iters=20)), 0.2, atol=1e-6)


@SETTINGS
@given(
    data=st.data(),
    batch=BATCHES,
    n=st.integers(2, 16),
    iters=st.sampled_from([0, 1, 5, 20]),
    bf16=st.booleans(),
)
def test_matches_float64_reference(data, batch, n, iters, bf16):
    logits = data.draw(_logits(batch, n, 30.0))
    if bf16:
        logits = logits.astype(ml_dtypes.bfloat16)
    expected = _reference(logits.astype(np.float64), iters)
    # Measured worst absolute difference from float64 over 23k random and adversarial +-30
    # logits: 1.3e-6.
    actual = np.asarray(_sinkhorn(logits, iters=iters))
    np.testing.assert_allclose(actual, expected, atol=5e-6, rtol=0)


@SETTINGS
@given(data=st.data(), b=st.sampled_from([1, 3]), n=SIZES)
def test_batched_equals_per_matrix(data, b, n):
    logits = data.draw(_logits((b,), n, 30.0))
    batched = np.asarray(_sinkhorn(logits, iters=20))
    single = np.stack([np.asarray(_sinkhorn(logits[i], iters=20)) for i in range(b)])
    np.testing.assert_allclose(batched, single, atol=1e-7, rtol=0)
    np.testing.assert_allclose(
        np.asarray(sinkhorn_residual(batched)),
        [float(sinkhorn_residual(s)) for s in single],
        atol=1e-7,
    )


def test_bf16_input_gives_float32_output():
    x = jnp.zeros((4, 4), jnp.bfloat16)
    m = sinkhorn(x)
    chex.assert_type(m, jnp.float32)
    np.testing.assert_allclose(np.asarray(m), 0.25, atol=1e-7)


def test_identity_init_gives_near_identity():
    # A diagonal log_mix makes M close to I: CRMA starts as nearly the identity. At the default
    # start (4·I) M is within 0.07 of I in the spectral norm; at 8·I within 2e-3 elementwise.
    m = np.asarray(sinkhorn(8.0 * jnp.eye(4)))
    assert np.abs(m - np.eye(4)).max() < 2e-3
    start = np.asarray(sinkhorn(CRMAConfig().init_mix_logit * jnp.eye(CRMAConfig().rank)))
    assert np.linalg.norm(start - np.eye(CRMAConfig().rank), 2) < 0.075


@SETTINGS
@given(data=st.data(), batch=BATCHES, n=st.integers(1, 9), k=st.integers(1, 9))
def test_diagnostics_match_numpy(data, batch, n, k):
    m = data.draw(hnp.arrays(np.float32, batch + (n, k), elements=st.floats(-2, 2, width=32)))
    norms = spectral_norm(m)
    chex.assert_shape(norms, batch)
    chex.assert_type(norms, jnp.float32)
    expected = np.linalg.norm(m.astype(np.float64), 2, axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(norms), expected, rtol=1e-5, atol=1e-6)
    if n == k:
        res = sinkhorn_residual(m)
        chex.assert_shape(res, batch)
        m64 = m.astype(np.float64)
        expected_res = np.maximum(
            np.abs(m64.sum(-1) - 1).max(-1), np.abs(m64.sum(-2) - 1).max(-1)
        )
        np.testing.assert_allclose(np.asarray(res), expected_res, atol=1e-5)


def test_residual_is_zero_for_permutations():
    perm = jnp.eye(5)[jnp.array([3, 0, 4, 1, 2])]
    assert float(sinkhorn_residual(perm)) == 0.0
    np.testing.assert_allclose(float(spectral_norm(perm)), 1.0, atol=1e-6)


def test_rejects_non_square_logits():
    with pytest.raises(ValueError, match="n, n"):
        sinkhorn(jnp.zeros((3, 4)))
