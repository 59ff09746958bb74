"""`crma_jax.cl`: continual-learning methods' defining properties and the transfer metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crma_jax.cl import (METHODS, EWC, InfLoRA, OLoRA, concat_lora, diagonal_fisher, ewc_accumulate, ewc_penalty,
                         frozen, gpm_extend, naive, olora_penalty, orthogonal_top, per_sequence_grads,
                         transfer_metrics)

LAYERS, D_IN, D_OUT = 2, 6, 5


def _lora(key, rank: int = 2) -> dict:
    """A two-target LoRA set shaped like the model's: layers/<module>/<proj>/{a, b}, stacked."""
    k = jax.random.split(key, 4)
    pair = lambda ka, kb: {"a": jax.random.normal(ka, (LAYERS, D_IN, rank)),  # noqa: E731
                           "b": jax.random.normal(kb, (LAYERS, rank, D_OUT))}
    return {"layers": {"self_attn": {"q_proj": pair(k[0], k[1])}, "mlp": {"up_proj": pair(k[2], k[3])}}}


def _delta(lora, x):
    """Σ over targets of x·A·B per layer: what a LoRA set adds to the projections' outputs."""
    pairs = [lora["layers"]["self_attn"]["q_proj"], lora["layers"]["mlp"]["up_proj"]]
    return sum(jnp.einsum("ni,lir,lro->lno", x, p["a"], p["b"]) for p in pairs)


def test_transfer_metrics_match_a_hand_computed_matrix():
    losses = np.array([[2.0, 3.0, 4.0],
                       [2.2, 1.5, 3.5],
                       [2.4, 1.8, 1.0]])
    base = np.array([3.0, 3.2, 4.2])
    m = transfer_metrics(losses, base)
    assert m["acc"] == pytest.approx((2.4 + 1.8 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((2.0 - 2.4) + (1.5 - 1.8)) / 2)  # forgetting: negative
    assert m["fwt"] == pytest.approx(((3.2 - 3.0) + (4.2 - 3.5)) / 2)  # earlier tasks helped: positive
    assert m["drift"] == pytest.approx([0.4 / 2.0, 0.3 / 1.5])
    with pytest.raises(ValueError, match="K x K"):
        transfer_metrics(losses[:2], base)


@settings(max_examples=20, deadline=None)
@given(n_sets=st.integers(1, 4), rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_concatenated_lora_adds_up_its_sets(n_sets, rank, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), n_sets + 1)
    sets = [_lora(k, rank) for k in keys[:-1]]
    x = jax.random.normal(keys[-1], (3, D_IN))
    joined = concat_lora(sets)
    assert joined["layers"]["mlp"]["up_proj"]["a"].shape == (LAYERS, D_IN, n_sets * rank)
    np.testing.assert_allclose(_delta(joined, x), sum(_delta(s, x) for s in sets), rtol=1e-5, atol=1e-5)


def test_olora_penalty_is_zero_for_orthogonal_a_and_its_gradient_moves_toward_orthogonality():
    q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (LAYERS, D_IN, D_IN)))[0]  # orthonormal columns
    old, new = _lora(jax.random.PRNGKey(1)), _lora(jax.random.PRNGKey(2))
    for module, proj in (("self_attn", "q_proj"), ("mlp", "up_proj")):
        old["layers"][module][proj]["a"] = q[..., :2]
        new["layers"][module][proj]["a"] = q[..., 2:4]
    assert float(olora_penalty(new, old)) == pytest.approx(0.0, abs=1e-5)
    overlapping = _lora(jax.random.PRNGKey(3))
    before = olora_penalty(overlapping, old)
    assert float(before) > 0.1
    grad = jax.grad(olora_penalty)(overlapping, old)
    stepped = jax.tree.map(lambda p, g: p - 0.01 * g, overlapping, grad)
    assert float(olora_penalty(stepped, old)) < float(before)
    assert float(jnp.abs(grad["layers"]["mlp"]["up_proj"]["b"]).max()) == 0.0  # only A is penalised


@settings(max_examples=15, deadline=None)
@given(tasks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ewc_accumulated_memory_has_the_gradient_of_one_penalty_per_task(tasks, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * tasks + 1)
    optima = [_lora(keys[2 * t]) for t in range(tasks)]
    fishers = [jax.tree.map(jnp.abs, _lora(keys[2 * t + 1])) for t in range(tasks)]
    theta = _lora(keys[-1])
    memory = EWC().init_memory(theta, tasks)
    for t in range(tasks):
        memory["fisher"], memory["anchor"] = ewc_accumulate(memory["fisher"], memory["anchor"], fishers[t], optima[t])

    def per_task(p):
        return sum(ewc_penalty(p, f, a) for f, a in zip(fishers, optima))

    want, got = jax.grad(per_task)(theta), jax.grad(lambda p: ewc_penalty(p, memory["fisher"], memory["anchor"]))(theta)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_ewc_penalty_is_zero_at_the_optimum_and_grows_away_from_it():
    method = EWC(lam=10.0)
    optimum = _lora(jax.random.PRNGKey(0))
    fisher = jax.tree.map(lambda x: jnp.abs(x) + 0.1, _lora(jax.random.PRNGKey(1)))
    memory = method.remember(method.init_memory(optimum, 3), optimum, 0, {"fisher": fisher})
    assert float(method.penalty(optimum, memory)) == pytest.approx(0.0, abs=1e-5)
    moved = jax.tree.map(lambda x: x + 0.1, optimum)
    expected = 0.5 * 10.0 * sum(float(jnp.sum(f * 0.01)) for f in jax.tree.leaves(fisher))
    assert float(method.penalty(moved, memory)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="Fisher"):
        method.remember(memory, optimum, 1)


def test_diagonal_fisher_is_the_mean_over_sequences_of_their_squared_gradients():
    # grad_fn gives per-row gradients (B, ...) and weights; a padding row (weight 0) counts for nothing.
    def grad_fn(p, batch):
        return {"w": batch[:, None] * p["w"]}, (batch != 0).astype(jnp.float32)

    fisher = diagonal_fisher(grad_fn, {"w": jnp.array([1.0, 2.0])}, [jnp.array([1.0, 3.0]), jnp.array([2.0, 0.0])])
    np.testing.assert_allclose(fisher["w"], [(1 + 9 + 4) / 3, (4 + 36 + 16) / 3])
    with pytest.raises(ValueError, match="at least one sequence"):
        diagonal_fisher(grad_fn, {"w": jnp.ones(2)}, [jnp.zeros(2)])


def test_per_sequence_fisher_matches_a_hand_computed_one_on_a_tiny_model():
    """A tiny bigram language model: the Fisher from `per_sequence_grads` is the mean of each
    sequence's own squared gradient, computed here by a Python loop, not the square of the batch
    gradient (smaller, which made the old EWC penalty too weak)."""
    key = jax.random.PRNGKey(0)
    params = {"emb": jax.random.normal(key, (7, 3)), "out": jax.random.normal(jax.random.fold_in(key, 1), (3, 7))}
    ids = jax.random.randint(jax.random.fold_in(key, 2), (4, 6), 0, 7)
    mask = jnp.ones((4, 6), jnp.int32).at[:, 0].set(0).at[3].set(0)  # row 3: padding, no targets
    batch = {"input_ids": ids, "loss_mask": mask}

    def mean_loss(p, b):
        logits = p["emb"][b["input_ids"][:, :-1]] @ p["out"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["input_ids"][:, 1:, None], -1)[..., 0]
        m = b["loss_mask"][:, 1:]
        return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1)

    fisher = diagonal_fisher(jax.jit(per_sequence_grads(mean_loss)), params, [batch])
    rows = [jax.grad(mean_loss)(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(3)]
    for leaf in params:
        want = np.mean([np.square(np.asarray(g[leaf])) for g in rows], axis=0)
        np.testing.assert_allclose(fisher[leaf], want, rtol=1e-5, atol=1e-8)
        # The rows hold equal numbers of targets, so the batch gradient is their mean: by Jensen
        # its square is at most the mean square, elementwise, and smaller in total.
        batch_square = np.square(np.asarray(jax.grad(mean_loss)(params, batch)[leaf]))
        assert np.all(batch_square <= want + 1e-7) and batch_square.sum() < 0.95 * want.sum()


def test_olora_keeps_earlier_loras_frozen_in_the_forward_pass_at_a_fixed_shape():
    method = OLoRA()
    first, second = _lora(jax.random.PRNGKey(0)), _lora(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, D_IN))
    memory = method.init_memory(first, tasks=3)
    memory = method.remember(memory, first, 0)
    shape = jax.tree.map(jnp.shape, memory)
    # Training task 1: the forward pass is task 0's LoRA plus the trainable one, and only the
    # trainable one gets gradients.
    np.testing.assert_allclose(_delta(method.forward_lora(second, memory), x), _delta(first, x) + _delta(second, x),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda m: jnp.sum(_delta(method.forward_lora(second, m), x)) + method.penalty(second, m))(memory)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    memory = method.remember(memory, second, 1)
    assert jax.tree.map(jnp.shape, memory) == shape
    # One model for every task, no task id: the sum of the trained LoRAs.
    model = method.eval_lora([first, second], memory, None, fresh=None)
    np.testing.assert_allclose(_delta(model, x), _delta(first, x) + _delta(second, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past the 3 tasks"):
        method.remember(memory, second, 3)


def test_routed_methods_need_a_task_id_and_start_untrained_tasks_fresh():
    trained, fresh = [_lora(jax.random.PRNGKey(0))], _lora(jax.random.PRNGKey(9))
    assert frozen().eval_lora(trained, {}, 0, fresh) is trained[0]
    assert frozen().eval_lora(trained, {}, 1, fresh) is fresh
    with pytest.raises(ValueError, match="routing"):
        frozen().eval_lora(trained, {}, None, fresh)
    assert naive().eval_lora(trained, {}, None, fresh) is trained[0]
    assert set(METHODS) == {"naive", "frozen", "modular", "replay", "ewc", "olora", "inflora", "frozen_substrate",
                            "isolated"}
    assert METHODS["modular"]().uses_crma and not METHODS["replay"]().uses_crma and METHODS["replay"]().replay == 0.1


def _inputs_in(basis: jax.Array, n: int, key: jax.Array, noise: float = 0.0) -> jax.Array:
    """n inputs (n, D_IN) spanned by `basis` (D_IN, k), plus isotropic noise of scale `noise`."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (n, basis.shape[1])) @ basis.T
    return x + noise * jax.random.normal(k2, (n, D_IN))


def test_gpm_grows_the_subspace_just_enough_to_hold_the_threshold_of_the_energy():
    basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (D_IN, 2)))
    x = _inputs_in(basis, 200, jax.random.PRNGKey(1), noise=0.05)
    projector = gpm_extend(jnp.zeros((D_IN, D_IN)), x.T @ x, threshold=0.97)
    np.testing.assert_allclose(projector @ projector, projector, atol=1e-5)  # a projector
    assert int(round(float(jnp.trace(projector)))) == 2  # two directions hold ≥ 97% of the energy
    np.testing.assert_allclose(projector @ basis, basis, atol=0.05)  # ... and they are the inputs' span
    assert float(jnp.sum((x @ projector) ** 2) / jnp.sum(x ** 2)) >= 0.97
    # Inputs already in the span add nothing; new directions are added on top, orthogonally.
    np.testing.assert_allclose(gpm_extend(projector, x.T @ x, 0.97), projector, atol=1e-6)
    other, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (D_IN, 1)))
    y = _inputs_in(other, 100, jax.random.PRNGKey(3))
    grown = gpm_extend(projector, y.T @ y, 0.97)
    assert int(round(float(jnp.trace(grown)))) == 3 and float(jnp.abs(grown @ grown - grown).max()) < 1e-5


def test_inflora_fixes_a_new_a_outside_the_old_inputs_so_old_tasks_see_no_change():
    method = InfLoRA()
    basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (D_IN, 2)))
    old_x = _inputs_in(basis, 100, jax.random.PRNGKey(1))
    new_x = jax.random.normal(jax.random.PRNGKey(2), (100, D_IN))
    gram = lambda x: jax.tree.map(lambda _: jnp.broadcast_to(x.T @ x, (LAYERS, D_IN, D_IN)),  # noqa: E731
                                  {"layers": {"self_attn": {"q_proj": 0}, "mlp": {"up_proj": 0}}})
    first = method.start(_lora(jax.random.PRNGKey(3)), method.init_memory(_lora(jax.random.PRNGKey(3)), 3),
                         {"input_gram": gram(old_x)})
    memory = method.init_memory(first, 3)
    memory = method.remember(memory, first, 0, {"input_gram": gram(old_x)})
    second = method.start(_lora(jax.random.PRNGKey(4)), memory, {"input_gram": gram(new_x)})
    for pair in jax.tree.leaves(second, is_leaf=lambda n: isinstance(n, dict) and "a" in n):
        a = pair["a"]  # (L, in, r): orthonormal columns outside the old inputs' span
        np.testing.assert_allclose(jnp.einsum("lir,lis->lrs", a, a), jnp.broadcast_to(jnp.eye(2), (LAYERS, 2, 2)),
                                   atol=1e-5)
        assert float(jnp.abs(old_x @ a).max()) < 1e-4
        assert float(jnp.abs(pair["b"]).max()) == 0.0  # B starts at zero: the model is unchanged
    # Train the new B: old inputs still see exactly the old model, and only B gets gradients.
    trained = jax.tree.map(lambda x: x + 0.5, second)
    trained = jax.tree.map(lambda t, s: s if t.ndim and t.shape[-1] == 2 and t.shape[-2] == D_IN else t,
                           trained, second)  # keep A (in, r) fixed, B moved
    forward = method.forward_lora(trained, memory)
    np.testing.assert_allclose(_delta(forward, old_x), _delta(first, old_x), atol=1e-4)
    assert float(jnp.abs(_delta(forward, new_x) - _delta(first, new_x)).max()) > 1e-2
    grads = jax.grad(lambda l: jnp.sum(_delta(method.forward_lora(l, memory), new_x)))(trained)
    assert all(float(jnp.abs(p["a"]).max()) == 0.0 and float(jnp.abs(p["b"]).max()) > 0
               for p in jax.tree.leaves(grads, is_leaf=lambda n: isinstance(n, dict) and "a" in n))
    assert float(method.penalty(trained, memory)) == 0.0
    with pytest.raises(ValueError, match="input Gram"):
        method.remember(memory, trained, 1)


def test_orthogonal_top_follows_the_largest_inputs_outside_the_span():
    e = jnp.eye(D_IN)
    projector = jnp.outer(e[0], e[0])
    gram = jnp.diag(jnp.array([100.0, 1.0, 9.0, 4.0, 0.5, 0.1]))
    a = orthogonal_top(gram, projector, 2)
    # Direction 0 is taken (despite its energy); the next largest are 2 and 3.
    np.testing.assert_allclose(jnp.abs(a), e[:, [2, 3]], atol=1e-5)
    # Inputs with energy only inside the span: A still lies outside it, orthonormal.
    projector = jnp.outer(e[4], e[4]) + jnp.outer(e[5], e[5])
    for gram in (jnp.diag(jnp.array([0, 0, 0, 0, 5.0, 3.0])), jnp.zeros((D_IN, D_IN))):
        a = orthogonal_top(gram, projector, 3)
        np.testing.assert_allclose(projector @ a, 0.0, atol=1e-5)
        np.testing.assert_allclose(a.T @ a, jnp.eye(3), atol=1e-5)


def test_frozen_substrate_stops_the_substrates_gradient_once_remembered():
    from crma_jax.cl import FrozenSubstrate

    method = FrozenSubstrate()
    lora, crma = _lora(jax.random.PRNGKey(0)), {"mix": jnp.array([1.0, 2.0])}
    memory = method.init_memory(lora, 3)

    def loss(t, mem):
        used = method.forward(t, mem)
        return jnp.sum(used["crma"]["mix"] ** 2) + sum(jnp.sum(x) for x in jax.tree.leaves(used["lora"]))

    trainable = {"lora": lora, "crma": crma}
    assert float(jnp.abs(jax.grad(loss)(trainable, memory)["crma"]["mix"]).sum()) > 0  # the first task trains it
    memory = method.remember(memory, lora, 0)
    g = jax.grad(loss)(trainable, memory)
    np.testing.assert_array_equal(g["crma"]["mix"], 0.0)  # every later task: frozen
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g["lora"]))  # the LoRA still trains
    assert float(loss(trainable, memory)) == float(loss(trainable, method.init_memory(lora, 3)))  # same forward
