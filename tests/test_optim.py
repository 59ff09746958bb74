"""The optimizer: ZClip against an independent NumPy reference, the whole-chain non-finite skip,
per-label learning rates and schedules, frozen leaves, label validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import crma_jax
from crma_jax.optim import learning_rates, lr_schedule, make_optimizer, zclip, zclip_metrics

LR = {"lora_a": 1e-2, "lora_b": 2e-2, "crma_read_mix": 3e-2, "crma_gate": 4e-2}


def zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup_steps=25, eps=1e-6, max_grad_norm=None):
    """ZClip as `crma_jax.optim.zclip` documents it, in float64 Python: one dict of expected state per step."""
    buf: list[float] = []
    mu = var = 0.0
    rows = []
    for g in norms:
        if not math.isfinite(g):
            rows.append(dict(mu=mu, var=var, z=0.0, clipped=False, clipped_norm=0.0, skipped=True))
            continue
        z, g_z, fired = 0.0, g, False
        if len(buf) < warmup_steps:
            buf.append(g)
            if len(buf) == warmup_steps:
                mu = sum(buf) / len(buf)
                var = sum((b - mu) ** 2 for b in buf) / len(buf)
        else:
            sigma = math.sqrt(var)
            z = (g - mu) / (sigma + eps)
            if z > z_thresh:
                g_z, fired = mu + (z_thresh**2 / z) * sigma, True
            mu = alpha * mu + (1 - alpha) * g_z
            var = alpha * var + (1 - alpha) * (g_z - mu) ** 2
        g_c = g_z if max_grad_norm is None else min(g_z, max_grad_norm)
        rows.append(dict(mu=mu, var=var, z=z, clipped=fired or g_c < g_z, clipped_norm=g_c, skipped=False))
    return rows


def grad_with_norm(n: float) -> dict[str, jax.Array]:
    """A two-leaf gradient whose global L2 norm is n (a 3-4-5 triangle); NaN/inf pass through."""
    return {"a": jnp.array([0.6 * n, 0.0], jnp.float32), "b": jnp.array([0.8 * n], jnp.float32)}


def steady(n: int = 50) -> list[float]:
    return [1.0 + 0.1 * math.sin(0.7 * k) for k in range(n)]


def spike() -> list[float]:
    seq = steady()
    seq[35] = 10.0
    return seq


def with_nan() -> list[float]:
    seq = steady()
    seq[2], seq[30], seq[31], seq[33] = math.nan, math.nan, math.inf, 8.0
    return seq


def ramp() -> list[float]:
    return [1.0 + 0.2 * k for k in range(60)]


CASES = {
    "steady": (steady(), {}),
    "spike": (spike(), {}),
    "nan": (with_nan(), {}),
    "ramp": (ramp(), {"warmup_steps": 10}),
    "short_warmup_spikes": ([1.0, 1.2, 0.9, 1.1, 5.0, 1.0, 6.0, 7.0, 1.0, 0.0, 1.0], {"warmup_steps": 4}),
    "hard_cap": (spike(), {"max_grad_norm": 1.05}),
    "hard_cap_and_nan": (with_nan(), {"max_grad_norm": 0.95, "alpha": 0.9, "z_thresh": 2.0}),
}


def run_steps(tx: optax.GradientTransformation, norms: list[float]) -> tuple[list, list]:
    update = jax.jit(tx.update)
    state = tx.init(grad_with_norm(1.0))
    states, outs = [], []
    for n in norms:
        out, state = update(grad_with_norm(n), state)
        states.append(state)
        outs.append(out)
    return states, outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_zclip_matches_numpy_reference(case: str) -> None:
    norms, kwargs = CASES[case]
    ref = zclip_reference(norms, **kwargs)
    states, outs = run_steps(zclip(**kwargs), norms)
    for k, (r, s, out) in enumerate(zip(ref, states, outs)):
        msg = f"{case} step {k} (norm {norms[k]})"
        assert bool(s.skipped) == r["skipped"], msg
        assert bool(s.clipped) == r["clipped"], msg
        np.testing.assert_allclose(float(s.mu), r["mu"], rtol=1e-5, err_msg=msg)
        np.testing.assert_allclose(float(s.var), r["var"], rtol=1e-5, atol=1e-9, err_msg=msg)
        np.testing.assert_allclose(float(s.z), r["z"], rtol=1e-5, atol=1e-4, err_msg=msg)
        np.testing.assert_allclose(float(s.clipped_norm), r["clipped_norm"], rtol=1e-5, err_msg=msg)
        applied = float(optax.global_norm(out))
        assert math.isfinite(applied), msg
        np.testing.assert_allclose(applied, r["clipped_norm"], rtol=1e-5, err_msg=msg)
        if not r["skipped"] and norms[k] > 0:  # one common factor: the direction is kept
            np.testing.assert_allclose(np.asarray(out["b"]) / np.asarray(out["a"][:1]), [4 / 3], rtol=1e-5, err_msg=msg)
    metrics = zclip_metrics(states[-1])
    assert set(metrics) == {"mu", "sigma", "z", "clipped", "raw_norm", "clipped_norm", "skipped"}
    np.testing.assert_allclose(float(metrics["sigma"]), math.sqrt(ref[-1]["var"]), rtol=1e-5, atol=1e-6)


def test_reference_cases_exercise_each_rule() -> None:
    """Guard the test data: the sequences really clip, skip and cap where intended."""
    assert not any(r["clipped"] for r in zclip_reference(steady()))
    assert [k for k, r in enumerate(zclip_reference(spike())) if r["clipped"]] == [35]
    nan_rows = zclip_reference(with_nan())
    assert [k for k, r in enumerate(nan_rows) if r["skipped"]] == [2, 30, 31]
    assert nan_rows[33]["clipped"]
    assert [k for k, r in enumerate(zclip_reference(ramp(), warmup_steps=10)) if r["clipped"]] == [15, 16, 17, 18]
    capped = zclip_reference(spike(), max_grad_norm=1.05)
    assert any(r["clipped"] for r in capped[:25])  # the cap acts during warmup too
    assert max(r["clipped_norm"] for r in capped) <= 1.05


def test_nonfinite_step_keeps_statistics() -> None:
    states, _ = run_steps(zclip(warmup_steps=4), [1.0, 2.0, 1.5, 1.2, 1.4, math.nan, 1.3])
    before, skipped = states[4], states[5]
    for field in ("count", "buffer", "mu", "var"):
        np.testing.assert_array_equal(np.asarray(getattr(skipped, field)), np.asarray(getattr(before, field)))
    assert bool(skipped.skipped) and math.isnan(float(skipped.raw_norm))
    assert int(states[6].count) == 6 and not bool(states[6].skipped)


def test_scan_inside_one_jit_equals_step_by_step() -> None:
    norms, kwargs = with_nan(), {"max_grad_norm": 1.08}
    norms[40] = 20.0
    tx = zclip(**kwargs)
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[grad_with_norm(n) for n in norms])

    @jax.jit
    def run(state, grads):
        return jax.lax.scan(lambda s, g: tuple(reversed(tx.update(g, s))), state, grads)

    state0 = tx.init(grad_with_norm(1.0))
    jaxpr = str(jax.make_jaxpr(run)(state0, grads))
    assert "callback" not in jaxpr and "scan" in jaxpr
    final, outs = run(state0, grads)
    states, step_outs = run_steps(tx, norms)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), final, states[-1])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *step_outs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), outs, stacked)


def test_zclip_keeps_dtype() -> None:
    tx = zclip(warmup_steps=2)
    g = {"w": jnp.ones((4,), jnp.bfloat16)}
    out, state = tx.update(g, tx.init(g))
    assert out["w"].dtype == jnp.bfloat16 and state.raw_norm.dtype == jnp.float32


# --- make_optimizer -----------------------------------------------------------------------------


def model_tree() -> dict:
    k = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    return {
        "params": {
            "embed": jax.random.normal(next(k), (5, 4)),
            "q_proj": crma_jax.quantize_int8(jax.random.normal(next(k), (4, 4))),
        },
        "lora": {"q_proj": {"a": jax.random.normal(next(k), (4, 2)), "b": jax.random.normal(next(k), (2, 4))}},
        "crma": {"read": jax.random.normal(next(k), (4, 2)), "log_mix": jax.random.normal(next(k), (2, 2)),
                 "gate": jax.random.normal(next(k), ())},
    }


def grads_for(tree: dict, seed: int, scale: float = 1.0) -> dict:
    """Nonzero gradients everywhere, frozen float leaves included; quantized leaves keep their
    own (integer) arrays, which the optimizer must ignore."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        scale * jax.random.normal(key, x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for key, x in zip(keys, leaves)
    ])


def train(tx: optax.GradientTransformation, tree: dict, grads: list[dict]) -> tuple[dict, object, list]:
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(tree)
    history = [(tree, state)]
    for g in grads:
        tree, state = step(tree, state, g)
        history.append((tree, state))
    return tree, state, history


def leaves_of(tree, label: str) -> list[np.ndarray]:
    labels = crma_jax.param_labels(model_tree())
    picked = jax.tree.map(lambda lab, x: x if lab == label else None, labels, tree)
    return [np.asarray(x) for x in jax.tree.leaves(picked)]


def assert_tree_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_gradient_skips_the_whole_chain() -> None:
    tree = model_tree()
    tx = make_optimizer(crma_jax.param_labels(tree), LR, total_steps=20, warmup_steps=2,
                        weight_decay=0.1, zclip_kwargs={"warmup_steps": 3})
    bad = grads_for(tree, 99)
    bad["lora"]["q_proj"]["a"] = bad["lora"]["q_proj"]["a"].at[0, 0].set(jnp.nan)
    grads = [grads_for(tree, s) for s in range(5)] + [bad, grads_for(tree, 5)]
    _, _, hist = train(tx, tree, grads)
    (p_before, s_before), (p_nan, s_nan), (p_next, s_next) = hist[5], hist[6], hist[7]

    assert_tree_equal(p_nan, p_before)  # params, frozen and trainable
    assert_tree_equal(s_nan.inner, s_before.inner)  # AdamW moments, counts, schedule positions
    for field in ("count", "buffer", "mu", "var"):
        np.testing.assert_array_equal(getattr(s_nan.zclip, field), getattr(s_before.zclip, field))
    assert bool(zclip_metrics(s_nan)["skipped"]) and not bool(zclip_metrics(s_next)["skipped"])
    assert_tree_equal(learning_rates(s_nan), learning_rates(s_before))

    # The next finite step is the one that would have followed step 5 without the NaN.
    for label in ("lora_a", "lora_b", "crma_read_mix", "crma_gate"):
        for x, y in zip(leaves_of(p_next, label), leaves_of(p_nan, label)):
            assert not np.array_equal(x, y), label
    _, _, clean = train(tx, tree, grads[:5] + grads[6:])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_next, clean[6][0])


def test_per_label_lr_frozen_and_schedule() -> None:
    tree = model_tree()
    lr = {**LR, "crma_gate": 0.0}
    total, warm = 8, 3
    tx = make_optimizer(crma_jax.param_labels(tree), lr, total_steps=total, warmup_steps=warm, weight_decay=0.1)
    final, _, hist = train(tx, tree, [grads_for(tree, s) for s in range(total)])

    # The state keeps its structure and dtypes across updates (donation and checkpoints rely on it).
    first, last = hist[0][1], hist[-1][1]
    assert jax.tree.structure(first) == jax.tree.structure(last)
    assert [x.dtype for x in jax.tree.leaves(first)] == [x.dtype for x in jax.tree.leaves(last)]
    for x, y in zip(leaves_of(final, "crma_gate"), leaves_of(tree, "crma_gate")):
        assert x.tobytes() == y.tobytes()
    assert_tree_equal(final["params"], tree["params"])  # frozen, despite nonzero gradients
    for label in ("lora_a", "lora_b", "crma_read_mix"):
        for x, y in zip(leaves_of(final, label), leaves_of(tree, label)):
            assert not np.allclose(x, y), label

    for k, (_, state) in enumerate(hist):
        got = learning_rates(state)
        assert set(got) == set(lr)
        for label, peak in lr.items():
            want = optax.warmup_cosine_decay_schedule(0.0, peak, warm, total, 0.0)(max(k - 1, 0))
            np.testing.assert_allclose(float(got[label]), float(want), rtol=1e-6, atol=1e-12, err_msg=f"{label} {k}")
    assert float(learning_rates(hist[warm + 1][1])["lora_a"]) == pytest.approx(LR["lora_a"])


def test_constant_schedule_callable_labels_and_no_zclip() -> None:
    tree = model_tree()
    tx = make_optimizer(crma_jax.param_labels, LR, total_steps=0, use_zclip=False,
                        zclip_kwargs={"warmup_steps": 2})
    spike_grad = grads_for(tree, 7, scale=1e3)
    nan_grad = jax.tree.map(lambda g: g * jnp.nan if jnp.issubdtype(g.dtype, jnp.floating) else g, spike_grad)
    _, state, hist = train(tx, tree, [grads_for(tree, s) for s in range(4)] + [spike_grad, nan_grad])
    assert {k: float(v) for k, v in learning_rates(state).items()} == pytest.approx(LR)
    spike_metrics, nan_metrics = zclip_metrics(hist[5][1]), zclip_metrics(hist[6][1])
    assert not bool(spike_metrics["clipped"]) and float(spike_metrics["z"]) > 2.5  # z-rule off
    assert bool(nan_metrics["skipped"])  # the skip stays
    assert_tree_equal(hist[6][0], hist[5][0])


def test_lr_zero_adamw_gives_exact_zero_updates() -> None:
    tx = make_optimizer({"w": "crma_gate"}, {"crma_gate": 0.0}, total_steps=0, weight_decay=0.5)
    params = {"w": jnp.array([1.5, -2.0, 3.0])}
    state = tx.init(params)
    for s in range(3):
        updates, state = tx.update({"w": jax.random.normal(jax.random.PRNGKey(s), (3,))}, state, params)
        assert not np.any(np.asarray(updates["w"]))


def test_missing_label_raises_naming_it() -> None:
    labels = crma_jax.param_labels(model_tree())
    lr = {k: v for k, v in LR.items() if k != "crma_gate"}
    with pytest.raises(ValueError, match="crma_gate"):
        make_optimizer(labels, lr, total_steps=10)
    tx = make_optimizer(crma_jax.param_labels, lr, total_steps=10)
    with pytest.raises(ValueError, match="crma_gate"):
        tx.init(model_tree())
    with pytest.raises(ValueError, match="frozen"):
        make_optimizer(labels, {**LR, "frozen": 0.0}, total_steps=10)
    with pytest.raises(ValueError, match="lora_c"):
        make_optimizer(labels, LR, total_steps=10, weight_decay={"lora_c": 0.1})


def test_schedule_and_zclip_argument_checks() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule(1.0, total_steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        zclip(warmup_steps=0)
    assert float(lr_schedule(1.0, 0, 4)(2)) == pytest.approx(0.5)
    assert float(lr_schedule(1.0, 0, 4)(100)) == pytest.approx(1.0)
