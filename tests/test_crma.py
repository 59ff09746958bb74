"""CRMA invariants: identity-like init, non-expansive for any parameters, gradients, toggle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.sinkhorn import sinkhorn
from crma_jax.crma import CRMA, mix_displacement, mixing_operator, orthonormal_columns, orthonormal_init


@pytest.fixture(scope="module")
def tiny_ids():
    return jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_init_leaves_logits_within_5e3_relative(arch, tiny_models, tiny_ids):
    # The default start (4·I, gate −2) moves a tiny random model's logits by 2.6e-3 (llama) and
    # 3.1e-3 (gemma2) of their largest; 8·I with gate 0 moved them by less than 1e-3 but did not learn.
    model, params = crma_jax.load_pretrained(tiny_models[arch])
    base = model.apply({"params": params}, tiny_ids)
    cmodel, variables = crma_jax.load_pretrained(tiny_models[arch], crma_config=CRMAConfig())
    out = cmodel.apply(variables, tiny_ids)
    rel = float(jnp.abs(out - base).max() / jnp.abs(base).max())
    assert 0 < rel <= 5e-3


def test_init_read_is_orthonormal_and_does_not_shrink_h():
    read = orthonormal_init(jax.random.PRNGKey(3), (576, 4))
    chex.assert_shape(read, (576, 4))
    np.testing.assert_allclose(read.T @ read, np.eye(4), atol=1e-5)
    h = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 576))
    variables = CRMA(CRMAConfig()).init(jax.random.PRNGKey(0), h)
    out = CRMA(CRMAConfig()).apply(variables, h)
    gain = jnp.linalg.norm(out, axis=-1) / jnp.linalg.norm(h, axis=-1)
    assert float(gain.min()) > 1 - 1e-3 and float(gain.max()) <= 1 + 1e-5


def test_orthonormal_columns_equal_qr_with_positive_diagonal():
    read = jax.random.normal(jax.random.PRNGKey(7), (3, 64, 5)) * 3.0
    for r in read:
        q, rr = jnp.linalg.qr(r)
        expected = q * jnp.sign(jnp.diagonal(rr))[None, :]
        np.testing.assert_allclose(orthonormal_columns(r), expected, atol=2e-5)
    chex.assert_tree_all_finite(jax.grad(lambda r: jnp.sum(orthonormal_columns(r) ** 3))(read[0]))


def _ill_conditioned(key: jax.Array, d: int, n: int, cond: float) -> jax.Array:
    """A (d, n) matrix with singular values spread log-uniformly over [1/cond, 1]."""
    k1, k2 = jax.random.split(key)
    left, _ = jnp.linalg.qr(jax.random.normal(k1, (d, n)))
    right, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    return (left * jnp.logspace(0.0, -np.log10(cond), n)) @ right.T


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 8), log_cond=st.floats(0.0, 6.0))
def test_streams_stay_orthonormal_for_ill_conditioned_read(seed, n, log_cond):
    """One Gram-Schmidt pass leaves ‖UᵀU − I‖ ≈ 7e-2 at cond 1e6; the second keeps 1e-5."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    read = _ill_conditioned(k1, 576, n, 10.0**log_cond)
    u = orthonormal_columns(read)
    assert float(jnp.abs(u.T @ u - jnp.eye(n)).max()) <= 1e-5
    log_mix = 3.0 * jax.random.normal(k2, (n, n))
    h = jax.random.normal(k3, (2, 5, 576)) * 10.0
    out = CRMA(CRMAConfig(rank=n)).apply({"crma": {"read": read, "log_mix": log_mix, "gate": jnp.float32(4.0)}}, h)
    assert float((jnp.linalg.norm(out, axis=-1) / jnp.linalg.norm(h, axis=-1)).max()) <= 1 + 1e-5


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.sampled_from([8, 33, 64]),
    n=st.integers(2, 8),
    spread=st.floats(0.0, 30.0),
    gate=st.floats(-10.0, 10.0),
)
def test_map_is_non_expansive_for_any_parameters(seed, d, n, spread, gate):
    n = min(n, d)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    crma = {
        "read": jax.random.normal(k1, (d, n)),  # arbitrary, not orthonormal: QR takes care of it
        "log_mix": spread * jax.random.normal(k2, (n, n)),
        "gate": jnp.asarray(gate, jnp.float32),
    }
    h = jax.random.normal(k3, (3, 5, d)) * 10.0
    out = CRMA(CRMAConfig(rank=n)).apply({"crma": crma}, h)
    chex.assert_shape(out, h.shape)
    chex.assert_tree_all_finite(out)
    ratio = jnp.linalg.norm(out, axis=-1) / jnp.linalg.norm(h, axis=-1)
    assert float(ratio.max()) <= 1 + 1e-5
    # The whole linear map I + U K Uᵀ has spectral norm <= 1, not just M.
    u, _, _, k = mixing_operator(crma["read"], crma["log_mix"], crma["gate"], 20)
    assert float(jnp.linalg.norm(jnp.eye(d) + u @ k @ u.T, ord=2)) <= 1 + 1e-5


def test_gradients_reach_read_log_mix_and_gate(tiny_models, tiny_ids):
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], crma_config=CRMAConfig(init_mix_logit=2.0))

    def loss(crma):
        logits = model.apply({**variables, "crma": crma}, tiny_ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    grads = jax.grad(loss)(variables["crma"])["layers"]["crma"]
    chex.assert_tree_all_finite(grads)
    for name in ("read", "log_mix", "gate"):
        assert float(jnp.abs(grads[name]).max()) > 0, name


def test_disabled_crma_gives_exactly_the_base_logits(tiny_models, tiny_ids):
    model, params = crma_jax.load_pretrained(tiny_models["gemma"])
    base = model.apply({"params": params}, tiny_ids)
    cmodel, variables = crma_jax.load_pretrained(tiny_models["gemma"], crma_config=CRMAConfig(init_mix_logit=0.0))
    assert not np.array_equal(cmodel.apply(variables, tiny_ids), base)  # CRMA really does something
    np.testing.assert_array_equal(cmodel.apply(variables, tiny_ids, crma_enabled=False), base)
    off = cmodel.clone(crma_config=CRMAConfig(init_mix_logit=0.0, enabled=False))
    np.testing.assert_array_equal(off.apply(variables, tiny_ids), base)


def test_diagnostics_per_layer(tiny_models, tiny_ids):
    model, variables = crma_jax.load_pretrained(
        tiny_models["llama"], crma_config=CRMAConfig(), lora_config=LoraConfig(targets=("q_proj",))
    )
    _, state = model.apply(variables, tiny_ids, mutable=["diagnostics"])
    diag = crma_jax.crma_diagnostics(state)
    assert set(diag) == {"spectral_norm", "sinkhorn_residual", "alpha", "gain"}
    for v in diag.values():
        chex.assert_shape(v, (2,))
    assert float(jnp.abs(diag["spectral_norm"] - 1).max()) <= 1e-6
    np.testing.assert_allclose(diag["alpha"], 1 / (1 + np.exp(-CRMAConfig.init_gate)), rtol=1e-6)  # sigmoid(gate)


def test_bf16_activations_keep_their_dtype():
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16)).astype(jnp.bfloat16)
    variables = CRMA(CRMAConfig()).init(jax.random.PRNGKey(1), h)
    out = CRMA(CRMAConfig()).apply(variables, h)
    assert out.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(out)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="rank"):
        CRMAConfig(rank=0)


def test_mix_displacement_is_the_norm_of_alpha_times_m_transpose_minus_identity():
    key = jax.random.PRNGKey(0)
    layers, d, n = 3, 8, 4
    read = jax.random.normal(key, (layers, d, n))
    log_mix = jax.random.normal(jax.random.fold_in(key, 1), (layers, n, n))
    gate = jnp.array([-1.0, 0.0, 2.0])
    got = mix_displacement({"layers": {"crma": {"read": read, "log_mix": log_mix, "gate": gate}}}, iters=20)
    for i in range(layers):
        m = sinkhorn(log_mix[i], 20)
        want = jax.nn.sigmoid(gate[i]) * jnp.linalg.norm(m.T - jnp.eye(n))
        assert float(got[i]) == pytest.approx(float(want), rel=1e-5)
    # The identity mixing (a huge diagonal logit) has not moved, whatever the gate.
    still = mix_displacement({"layers": {"crma": {"read": read, "log_mix": 1e4 * jnp.eye(n)[None].repeat(layers, 0),
                                                  "gate": gate}}}, iters=20)
    assert float(jnp.max(still)) < 1e-6
