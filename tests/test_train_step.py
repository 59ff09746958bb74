"""The pure train step: sharding invariance, gradient accumulation, metrics, non-finite skip.

Runs on the 8 simulated CPU devices that conftest.py asks XLA for.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.cl import OLoRA, concat_lora, olora_penalty
from crma_jax.data import BatchIterator, build_dataset
from crma_jax.optim import make_optimizer, zclip_metrics
from crma_jax.pretrained import load_tokenizer
from crma_jax.sharding import make_mesh, param_shardings
from crma_jax.train_step import forward_loss, jit_train_step, make_train_step

LORA = LoraConfig(rank=4, alpha=8.0)
CRMA = CRMAConfig(rank=4, init_mix_logit=8.0)
LR = {"lora_a": 1e-3, "lora_b": 1e-3, "crma_read_mix": 1e-3, "crma_gate": 1e-2}
B, T, STEPS = 8, 32, 3
WORDS = "the court shall grant a license to any party under the terms of this agreement".split()


def _index(shard) -> tuple:
    """A shard's slice of the global array, hashable."""
    return tuple((sl.start, sl.stop) for sl in shard.index)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def batches(tiny_lm, tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """STEPS real packed (B, T) batches from a small JSONL, tokenized by the tiny LM's tokenizer."""
    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("step_data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 25))}) + "\n" for _ in range(40)))
    train, _ = build_dataset(str(path), load_tokenizer(tiny_lm), T, holdout_fraction=0.1, seed=0)
    it = BatchIterator(train, B, seed=0)
    out = [next(it) for _ in range(STEPS)]
    assert all(b["input_ids"].shape == (B, T) for b in out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_lm):
    """(model, host copies of frozen and trainable) loaded on one device."""
    model, variables = crma_jax.load_pretrained(tiny_lm, lora_config=LORA, crma_config=CRMA, seed=0)
    trainable = {"lora": variables["lora"], "crma": variables["crma"]}
    return model, _host(variables["params"]), _host(trainable)


def _optimizer(trainable, **zclip_kwargs):
    return make_optimizer(crma_jax.param_labels(trainable), LR, total_steps=10, zclip_kwargs=zclip_kwargs or None)


_COMPILED: dict = {}


def _compiled(model, frozen, trainable, mesh, accum_steps=1):
    """(optimizer, jit'ed step, shardings, placer) per (mesh shape, accum_steps), compiled once."""
    key = (tuple(mesh.devices.shape), accum_steps)
    if key not in _COMPILED:
        optimizer = _optimizer(trainable)
        step = make_train_step(model, optimizer, accum_steps=accum_steps)
        t = jax.tree.map(jnp.asarray, trainable)
        compiled, shardings = jit_train_step(step, mesh, t, optimizer.init(t), frozen)
        # Fresh buffers on the step's shardings: the step donates both trees, and optax's init
        # may share one constant buffer between several leaves.
        place = jax.jit(lambda tree: tree, out_shardings=(shardings["trainable"], shardings["opt_state"]))
        _COMPILED[key] = (optimizer, compiled, shardings, place)
    return _COMPILED[key]


def _run(model, frozen, trainable, batches, mesh, accum_steps=1, steps=None, frozen_per_step=None):
    """`steps` jit'ed steps on `mesh`; returns (per-step host metrics, final trainable, opt_state).

    `frozen_per_step`, if given, is a list of frozen trees, one per step (default: `frozen`)."""
    optimizer, compiled, shardings, place = _compiled(model, frozen, trainable, mesh, accum_steps)
    t = jax.tree.map(jnp.asarray, trainable)
    trainable, opt_state = place((t, optimizer.init(t)))
    frozen = jax.device_put(frozen, shardings["frozen"])
    rng = jax.device_put(jax.random.PRNGKey(0), shardings["rng"])
    history = []
    for i, batch in enumerate(batches[: steps or len(batches)]):
        rng, sub = jax.random.split(rng)
        f = frozen if frozen_per_step is None else jax.device_put(frozen_per_step[i], shardings["frozen"])
        trainable, opt_state, metrics = compiled(trainable, opt_state, f, jax.device_put(batch, shardings["batch"]), sub, {})
        history.append(jax.device_get(metrics))
    return history, trainable, opt_state


@pytest.fixture(scope="module")
def single_device_run(reference, batches):
    model, frozen, trainable = reference
    history, final, _ = _run(model, frozen, trainable, batches, make_mesh((1, 1, 1)))
    return history, _host(final)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_steps_match_single_device(shape, tiny_lm, reference, batches, single_device_run):
    model, _, trainable = reference
    mesh = make_mesh(shape)
    # The loader itself places the frozen base on the mesh's shardings.
    _, variables = crma_jax.load_pretrained(tiny_lm, lora_config=LORA, crma_config=CRMA, seed=0, mesh=mesh)
    frozen = variables["params"]
    q = frozen["layers"]["self_attn"]["q_proj"]["kernel"]  # (L, d, H*hd) = (2, 64, 64)
    emb = frozen["embed_tokens"]["embedding"]  # (vocab, d) = (128, 64)
    expected = param_shardings(frozen, mesh)
    assert q.sharding == expected["layers"]["self_attn"]["q_proj"]["kernel"]
    if shape == (1, 4, 2):
        assert q.sharding.spec == P(None, "fsdp", "model")
        assert emb.sharding.spec == P("model", "fsdp")
        assert len(q.sharding.device_set) == 8
        assert q.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)
        assert len({_index(s) for s in q.addressable_shards}) == 8  # 8 distinct blocks, not replicas
        assert len({_index(s) for s in emb.addressable_shards}) == 8
    elif shape == (8, 1, 1):
        assert q.sharding.is_fully_replicated  # pure data parallelism: weights replicated

    history, final, opt_state = _run(model, frozen, trainable, batches, mesh)
    ref_history, ref_final = single_device_run
    # The batch really was split along `data` x `fsdp`, and the frozen base stayed put.
    assert frozen["layers"]["self_attn"]["q_proj"]["kernel"].sharding == q.sharding
    leaf = jax.tree.leaves(final)[0]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh.shape == mesh.shape
    for got, want in zip(history, ref_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        assert got["tokens"] == want["tokens"]
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_host(final)), jax.tree.leaves(ref_final)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert not bool(zclip_metrics(opt_state)["skipped"])


def test_losses_move(single_device_run, reference):
    """The reference run does train: the adapters change and every step's loss is finite."""
    history, final = single_device_run
    _, _, initial = reference
    assert all(np.isfinite(h["loss"]) for h in history)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(initial))]
    assert max(moved) > 1e-4


def test_gradient_accumulation_equals_one_big_batch(reference, batches):
    model, frozen, trainable = reference
    mesh = make_mesh((1, 1, 1))
    one, final_one, _ = _run(model, frozen, trainable, batches, mesh, accum_steps=1, steps=2)
    two, final_two, _ = _run(model, frozen, trainable, batches, mesh, accum_steps=2, steps=2)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_host(final_one)), jax.tree.leaves(_host(final_two))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_accumulation_over_4_micro_batches_on_a_mesh(reference, batches):
    """accum_steps=4 (micro-batch 2) on a (2, 1, 1) mesh still equals the plain step."""
    model, frozen, trainable = reference
    one, final_one, _ = _run(model, frozen, trainable, batches, make_mesh((1, 1, 1)), steps=1)
    four, final_four, _ = _run(model, frozen, trainable, batches, make_mesh((2, 1, 1)), accum_steps=4, steps=1)
    np.testing.assert_allclose(one[0]["loss"], four[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_host(final_one)), jax.tree.leaves(_host(final_four))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_metrics_hold_loss_tokens_grad_norm_and_crma_diagnostics(reference, batches, single_device_run):
    model, _, _ = reference
    history, _ = single_device_run
    first = history[0]
    layers = model.config.num_layers
    for key in ("loss", "tokens", "grad_norm", "crma_spectral_dev", "crma_sinkhorn_residual", "crma_alpha", "crma_gain"):
        assert key in first, key
    for key in ("loss", "tokens", "grad_norm", "crma_spectral_dev", "crma_sinkhorn_residual"):
        assert np.shape(first[key]) == (), key
        assert np.asarray(first[key]).dtype == np.float32, key
    assert first["tokens"] == batches[0]["loss_mask"][:, 1:].sum()
    assert 0 < first["loss"] < 10 and first["grad_norm"] > 0
    assert first["crma_spectral_dev"] <= 1e-6  # M = sinkhorn(8 I) has norm 1 at init
    assert first["crma_sinkhorn_residual"] <= 1e-5
    assert np.shape(first["crma_alpha"]) == (layers,)
    np.testing.assert_allclose(first["crma_alpha"], 1 / (1 + np.exp(-CRMAConfig.init_gate)), atol=1e-6)  # sigmoid(gate)
    assert np.shape(first["crma_gain"]) == (layers,)
    assert np.all(first["crma_gain"] <= 1.0 + 1e-5)  # non-expansive
    np.testing.assert_allclose(first["crma_gain"], 1.0, atol=1e-3)  # ~identity at init


def test_nonfinite_loss_skips_the_update(reference, batches):
    model, frozen, trainable = reference
    bad = jax.tree.map(np.copy, frozen)
    bad["norm"]["scale"][3] = np.nan  # final norm -> NaN logits -> NaN loss and gradients
    history, final, opt_state = _run(model, bad, trainable, batches, make_mesh((1, 1, 1)), steps=2)
    assert np.isnan(history[0]["loss"]) and not np.isfinite(history[0]["grad_norm"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_host(final)), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    zm = zclip_metrics(opt_state)
    assert bool(zm["skipped"])
    assert float(zm["clipped_norm"]) == 0.0
    # No moment, count or schedule moved either: the skip left the inner optimizer state alone.
    fresh = _optimizer(trainable).init(jax.tree.map(jnp.asarray, trainable))
    assert int(opt_state.zclip.count) == 0
    for a, b in zip(jax.tree.leaves(opt_state.inner), jax.tree.leaves(fresh.inner)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_skip_then_recover(reference, batches):
    """A NaN step between finite ones is skipped; the next one trains as if it never happened."""
    model, frozen, trainable = reference
    mesh = make_mesh((1, 1, 1))
    bad = jax.tree.map(np.copy, frozen)
    bad["norm"]["scale"][:] = np.nan
    history, final, opt_state = _run(model, frozen, trainable, batches, mesh, frozen_per_step=[frozen, bad, frozen])
    assert np.isfinite(history[0]["loss"]) and np.isnan(history[1]["loss"]) and np.isfinite(history[2]["loss"])
    assert not bool(zclip_metrics(opt_state)["skipped"])
    assert int(opt_state.zclip.count) == 2
    # Same as two clean steps on batches 0 and 2 (the skipped step moved no state at all).
    _, clean, _ = _run(model, frozen, trainable, [batches[0], batches[2]], mesh)
    for a, b in zip(jax.tree.leaves(_host(final)), jax.tree.leaves(_host(clean))):
        np.testing.assert_array_equal(a, b)


def test_a_method_changes_the_forward_lora_and_adds_its_penalty_gradient(reference, batches):
    """With O-LoRA memory holding an earlier LoRA, the step's loss is that of the model with both
    LoRAs, its `penalty` metric is the method's, and the update is that of loss + penalty."""
    model, frozen, trainable = reference
    trainable = {"lora": trainable["lora"]}
    model = model.clone(crma_config=None)
    method = OLoRA(lam=0.5)
    earlier = jax.tree.map(lambda x: x + 0.05, trainable["lora"])
    memory = method.remember(method.init_memory(trainable["lora"], 2), earlier, 0)
    optimizer = optax.sgd(0.1)
    step = make_train_step(model, optimizer, method=method)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    new, _, metrics = jax.jit(step)(trainable, optimizer.init(trainable), frozen, batch, jax.random.PRNGKey(0), memory)

    def objective(t):
        both = {"params": frozen, "lora": concat_lora([memory["old"], t["lora"]])}
        total, (count, _) = forward_loss(model, both, batch, None)
        return total / count + 0.5 * olora_penalty(t["lora"], memory["old"])

    loss, grads = jax.value_and_grad(objective)(trainable)
    assert float(metrics["penalty"]) == pytest.approx(float(0.5 * olora_penalty(trainable["lora"], memory["old"])), rel=1e-5)
    assert float(metrics["loss"] + metrics["penalty"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["penalty"]) > 0
    want = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(new)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
