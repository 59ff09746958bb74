"""LoRA: zero-B identity, PiSSA init (also against PEFT), merge, dropout, named sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crma_jax
from crma_jax import LoraConfig
from crma_jax.lora import lora_rank, pissa_factors, top_singular, with_rank


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)


def _base(path, ids):
    model, params = crma_jax.load_pretrained(path)
    return model.apply({"params": params}, ids)


def _randomize_b(lora, seed=0):
    leaves, tree = jax.tree.flatten_with_path(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [
        0.05 * jax.random.normal(k, x.shape) if str(p[-1].key) == "b" else x for (p, x), k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(tree, new)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "qwen3", "gemma3", "phi3"])
def test_zero_b_gives_the_base_logits(arch, tiny_models, ids):
    model, variables = crma_jax.load_pretrained(tiny_models[arch], lora_config=LoraConfig())
    b_leaves = [x for p, x in jax.tree.flatten_with_path(variables["lora"])[0] if str(p[-1].key) == "b"]
    assert len(b_leaves) == 7 and all(float(jnp.abs(b).max()) == 0 for b in b_leaves)
    np.testing.assert_array_equal(model.apply(variables, ids), _base(tiny_models[arch], ids))


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma", "qwen2", "qwen3", "gemma3", "phi3"])
def test_pissa_init_leaves_logits_unchanged(arch, tiny_models, ids):
    model, variables = crma_jax.load_pretrained(tiny_models[arch], lora_config=LoraConfig(rank=4, init="pissa"))
    a = variables["lora"]["layers"]["mlp"]["up_proj"]["a"]
    assert float(jnp.abs(a).max()) > 0
    np.testing.assert_allclose(model.apply(variables, ids), _base(tiny_models[arch], ids), atol=1e-4, rtol=0)


def test_merged_equals_unmerged(tiny_models, ids):
    cfg = LoraConfig(rank=4, alpha=8.0, rslora=True)
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], lora_config=cfg)
    lora = _randomize_b(variables["lora"])
    unmerged = model.apply({**variables, "lora": lora}, ids)
    merged = model.apply({"params": crma_jax.merge_lora(variables["params"], lora, cfg)}, ids)
    assert float(jnp.abs(unmerged - _base(tiny_models["llama"], ids)).max()) > 1e-3
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)


def test_named_sets_side_by_side(tiny_models, ids):
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], lora_config=LoraConfig(rank=2))
    sets = {"legal": _randomize_b(variables["lora"], 1), "code": _randomize_b(variables["lora"], 2)}
    legal = model.apply({**variables, "lora": sets["legal"]}, ids)
    code = model.apply({**variables, "lora": sets["code"]}, ids)
    assert float(jnp.abs(legal - code).max()) > 1e-3
    np.testing.assert_array_equal(legal, model.apply({**variables, "lora": sets["legal"]}, ids))


def test_dropout_only_when_not_deterministic(tiny_models, ids):
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], lora_config=LoraConfig(dropout=0.5))
    variables = {**variables, "lora": _randomize_b(variables["lora"])}
    det = model.apply(variables, ids)
    np.testing.assert_array_equal(det, model.apply(variables, ids, deterministic=True))
    drop = model.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.abs(drop - det).max()) > 1e-4


def test_pissa_matches_peft():
    """Compare scale·B·A and the residual base weight: both are independent of SVD signs."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(64, 48, bias=False))
    w_hf = net.q_proj.weight.detach().numpy().copy()  # (out, in)
    peft_model = get_peft_model(net, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = peft_model.base_model.model.q_proj
    peft_delta = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy()
    peft_res = layer.base_layer.weight.detach().numpy()

    cfg = LoraConfig(rank=4, alpha=8.0, init="pissa")
    a, b, res = pissa_factors(jnp.asarray(w_hf.T), cfg, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(cfg.scale * (a @ b)).T, peft_delta, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res).T, peft_res, atol=1e-5)


def test_randomized_svd_finds_the_top_subspace():
    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(0), 3)
    low = jax.random.normal(key1, (256, 6)) @ jax.random.normal(key2, (6, 192))
    w = low + 0.01 * jax.random.normal(key3, (256, 192))
    u, s, vt = top_singular(w, 6, None, key1)
    ur, sr, vtr = top_singular(w, 6, 4, key1)
    np.testing.assert_allclose(sr, s, rtol=1e-4)
    np.testing.assert_allclose((ur * sr) @ vtr, (u * s) @ vt, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"rank": 0}, "rank"), ({"targets": ("qkv",)}, "unknown LoRA targets"), ({"init": "olora"}, "init"),
     ({"dropout": 1.0}, "dropout")],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("rslora", [False, True])
def test_with_rank_keeps_the_scale_and_lora_rank_reads_it(rslora):
    cfg = LoraConfig(rank=8, alpha=16.0, rslora=rslora)
    wide = with_rank(cfg, 24)
    assert wide.rank == 24 and wide.scale == pytest.approx(cfg.scale) and wide.alpha != cfg.alpha
    lora = {"q": {"a": jnp.zeros((5, 24)), "b": jnp.zeros((24, 5))}, "k": {"a": jnp.zeros((5, 24)), "b": jnp.zeros((24, 3))}}
    assert lora_rank(lora) == 24
    with pytest.raises(ValueError, match="share one rank"):
        lora_rank({**lora, "v": {"a": jnp.zeros((5, 8)), "b": jnp.zeros((8, 5))}})
