"""The statistics of a domain's training data that EWC and InfLoRA gather (`train/cl_stats.py`):
the batches they are measured on, and EWC's Fisher through the production forward pass."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

import crma_jax
from crma_jax import LoraConfig
from crma_jax.data import PackedData
from crma_jax.train import cl_stats
from crma_jax.train_step import forward_loss

B, T = 4, 16


def _rows(n: int, vocab: int = 64) -> PackedData:
    """n packed rows; row i's tokens start with i, so a batch tells which rows it holds."""
    ids = np.asarray(np.random.default_rng(0).integers(0, vocab, (n, T)), np.int32)
    ids[:, 0] = np.arange(n) % vocab
    mask = np.ones((n, T), np.int32)
    mask[:, 0] = 0
    return PackedData(ids, np.ones((n, T), np.int32), np.tile(np.arange(T, dtype=np.int32), (n, 1)), mask)


def test_both_statistics_see_the_same_shuffled_batches_from_the_whole_domain(monkeypatch):
    seen: dict[str, list[list[int]]] = {}

    def record(name):
        return lambda session, method, lora, memory, batches: seen.setdefault(name, [list(b["input_ids"][:, 0])
                                                                                      for b in batches])

    monkeypatch.setattr(cl_stats, "TASK_STATS", {"fisher": record("fisher"), "input_gram": record("input_gram")})
    session = SimpleNamespace(cfg=SimpleNamespace(batch_size=B))
    cl_stats.task_stats(("fisher", "input_gram"), session, None, None, None, _rows(40), batches=3, seed=7)
    drawn = [row for batch in seen["fisher"] for row in batch]
    assert seen["input_gram"] == seen["fisher"] and len(drawn) == 3 * B == len(set(drawn))
    assert drawn != list(range(3 * B)) and max(drawn) >= 3 * B  # not the first documents only
    seen.clear()
    cl_stats.task_stats(("fisher",), session, None, None, None, _rows(40), batches=3, seed=8)
    assert [row for batch in seen["fisher"] for row in batch] != drawn  # the seed draws the order


def test_the_fisher_of_a_real_decoder_is_the_mean_squared_gradient_of_each_sequence(tiny_lm):
    model, variables = crma_jax.load_pretrained(tiny_lm, lora_config=LoraConfig(rank=2, alpha=4.0), seed=0)
    key = jax.random.PRNGKey(3)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(key, x.shape, x.dtype), variables["lora"])
    data = _rows(2 * B, model.config.vocab_size)
    data.loss_mask[1] = 0  # a row without targets does not count
    batches = [data.rows(slice(0, B)), data.rows(slice(B, 2 * B))]
    session = SimpleNamespace(model=model, frozen=variables["params"], place=lambda b: b, cfg=SimpleNamespace(batch_size=B))
    fisher = cl_stats.task_fisher(session, None, lora, None, batches)

    def row_loss(x, row):
        total, (count, _) = forward_loss(model, {"params": variables["params"], "lora": x}, row, None)
        return total / count

    rows = [{k: v[i:i + 1] for k, v in batch.items()} for batch in batches for i in range(B)]
    grads = [jax.grad(row_loss)(lora, row) for row in rows if row["loss_mask"].sum()]
    assert len(grads) == 2 * B - 1
    want = jax.tree.map(lambda *g: np.mean([np.square(np.asarray(x, np.float32)) for x in g], axis=0), *grads)
    for got, expected in zip(jax.tree.leaves(fisher), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=1e-10)
    assert sum(float(jnp.sum(g)) for g in jax.tree.leaves(fisher)) > 0
