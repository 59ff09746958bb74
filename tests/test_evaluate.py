"""crma_jax.evaluate: every held-out token counted exactly once; routing never scores the tokens
it chose on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.data import BATCH_KEYS, PackedData, pack_documents
from crma_jax.evaluate import batch_token_nll, crma_effect, eval_batches, evaluate, route
from crma_jax.loss import next_token_loss


def token_nll(logits, input_ids, loss_mask):
    """Reference per-token NLL from full logits: column t scores input_ids[:, t]."""
    lg = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(lg, input_ids[:, 1:, None], axis=-1)[..., 0]
    nll = (jax.nn.logsumexp(lg, axis=-1) - picked) * loss_mask[:, 1:].astype(jnp.float32)
    return jnp.pad(nll, ((0, 0), (1, 0)))


def _packed(rows: int, seq_len: int = 16, seed: int = 0) -> PackedData:
    rng = np.random.RandomState(seed)
    docs, remaining = [], rows * seq_len - int(rng.randint(0, seq_len // 2))  # tokens incl. one EOS per doc
    while remaining > 0:
        n = min(int(rng.randint(3, 2 * seq_len)), remaining - 1)
        n = remaining - 1 if remaining - (n + 1) < 4 else n
        docs.append((rng.randint(3, 100, n).tolist(), [1] * n))
        remaining -= n + 1
    packed = pack_documents(docs, seq_len, eos_id=1)
    assert packed.num_rows == rows
    return packed


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), batch_size=st.integers(1, 5))
def test_batches_visit_every_row_once_and_pad_with_masked_rows(rows, batch_size):
    data = _packed(rows)
    batches = list(eval_batches(data, batch_size))
    assert len(batches) == -(-rows // batch_size)
    assert all(b["input_ids"].shape == (batch_size, data.seq_len) for b in batches)
    stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for k in ("input_ids", "segment_ids", "positions", "loss_mask"):
        np.testing.assert_array_equal(stacked[k][:rows], getattr(data, k))
        assert not stacked[k][rows:].any()  # padding rows: no tokens, no targets


@pytest.fixture(scope="module")
def lora_model(tiny_models):
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], lora_config=LoraConfig(rank=4))
    leaves, tree = jax.tree.flatten(variables["lora"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trained = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model, variables, trained


@pytest.mark.parametrize("rows,batch_size", [(5, 4), (3, 4), (8, 4)])
def test_loss_counts_each_target_once_whatever_the_batch(rows, batch_size, lora_model):
    model, variables, _ = lora_model
    data = _packed(rows)
    result = evaluate(model, variables, data, batch_size)
    assert result.tokens == int(data.loss_mask[:, 1:].sum())
    logits = model.apply(variables, jnp.asarray(data.input_ids), positions=jnp.asarray(data.positions),
                         segment_ids=jnp.asarray(data.segment_ids))
    total, count = next_token_loss(logits, jnp.asarray(data.input_ids), jnp.asarray(data.loss_mask))
    assert result.tokens == int(count)
    assert result.loss == pytest.approx(float(total) / float(count), rel=1e-5)
    # The per-token NLL that routing scores with is the reference's, token by token (column t
    # scores input_ids[:, t]; 0 where nothing is predicted).
    per_token = batch_token_nll(model, variables, {k: jnp.asarray(getattr(data, k)) for k in BATCH_KEYS})
    reference = token_nll(logits, jnp.asarray(data.input_ids), jnp.asarray(data.loss_mask))
    np.testing.assert_allclose(np.asarray(per_token), np.asarray(reference), rtol=1e-5, atol=1e-5)
    assert float(jnp.sum(per_token)) == pytest.approx(float(total), rel=1e-5)


def test_routing_chooses_on_the_prefix_and_scores_only_the_suffix(lora_model):
    """Recompute routing by hand from per-token NLLs: the choice is the argmin of the mean NLL of
    each row's first k targets, and only the later targets are scored."""
    model, variables, trained = lora_model
    data = _packed(6)
    k = 5
    sets = {"plain": variables["lora"], "trained": trained, "half": jax.tree.map(lambda x: 0.5 * x, trained)}
    result = route(model, variables["params"], sets, data, "half", batch_size=4, prefix_tokens=k)
    ids, pos, seg = (jnp.asarray(getattr(data, f)) for f in ("input_ids", "positions", "segment_ids"))
    nll = np.stack([np.asarray(token_nll(model.apply({"params": variables["params"], "lora": lora}, ids,
                                                     positions=pos, segment_ids=seg),
                                         ids, jnp.asarray(data.loss_mask)), np.float64) for lora in sets.values()])
    mask = data.loss_mask.astype(bool)
    seen = np.cumsum(mask, axis=1)
    prefix, suffix = mask & (seen <= k), mask & (seen > k)
    choice = ((nll * prefix).sum(-1) / prefix.sum(-1)).argmin(axis=0)
    rows = np.arange(data.num_rows)
    np.testing.assert_array_equal(result.choices, choice)
    assert len(set(choice.tolist())) > 1  # the sets really compete
    assert result.accuracy == pytest.approx(np.mean(choice == 2))
    assert result.routed.tokens == result.oracle.tokens == int(suffix.sum()) == int(np.maximum(mask.sum(1) - k, 0).sum())
    assert result.routed.nll_sum == pytest.approx(float((nll[choice, rows] * suffix).sum()), rel=1e-6)
    assert result.oracle.nll_sum == pytest.approx(float((nll[2] * suffix).sum()), rel=1e-6)


def test_routing_refuses_bad_arguments(lora_model):
    model, variables, trained = lora_model
    with pytest.raises(ValueError, match="not among"):
        route(model, variables["params"], {"a": trained}, _packed(2), "b", 2, 4)
    with pytest.raises(ValueError, match="prefix_tokens"):
        route(model, variables["params"], {"a": trained}, _packed(2), "a", 2, 0)


def test_crma_effect_is_the_mean_relative_change_of_the_final_hidden_states(tiny_models):
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], crma_config=CRMAConfig(rank=2, init_mix_logit=0.0))
    data = _packed(5)
    moved = crma_effect(model, variables, data, batch_size=2)
    # By hand over all rows at once: per real token ‖h_on − h_off‖ / ‖h_off‖, then the mean.
    rows = {k: jnp.asarray(getattr(data, k)) for k in ("input_ids", "positions", "segment_ids")}
    on, off = (model.apply(variables, rows["input_ids"], positions=rows["positions"], segment_ids=rows["segment_ids"],
                           crma_enabled=e, method="hidden")[0] for e in (True, False))
    ratio = np.asarray(jnp.linalg.norm(on - off, axis=-1) / jnp.linalg.norm(off, axis=-1))
    assert moved == pytest.approx(float(ratio[data.segment_ids > 0].mean()), rel=1e-4)
    assert moved > 1e-3  # uniform mixing with α = 1/2 changes the function
    shut = {**variables, "crma": jax.tree.map(lambda x: x, variables["crma"])}
    shut["crma"]["layers"]["crma"]["gate"] = jnp.full_like(variables["crma"]["layers"]["crma"]["gate"], -1e4)
    assert crma_effect(model, shut, data, batch_size=2) < 1e-6  # α = 0: the identity, up to rounding
