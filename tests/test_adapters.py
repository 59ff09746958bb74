"""Adapter bookkeeping: labels for the optimizer, parameter counts, quantized bases."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.quant import Int8Tensor, NF4Tensor, nbytes


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return crma_jax.load_pretrained(tiny_models["llama"], lora_config=LoraConfig(rank=8), crma_config=CRMAConfig(rank=4))


def test_labels_name_every_leaf_by_role(loaded):
    _, variables = loaded
    labels = crma_jax.param_labels(variables)
    assert jax.tree.structure(labels) == jax.tree.structure(variables)
    assert set(jax.tree.leaves(labels["params"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["lora"])) == {"lora_a", "lora_b"}
    crma = labels["crma"]["layers"]["crma"]
    assert (crma["read"], crma["log_mix"], crma["gate"]) == ("crma_read_mix", "crma_read_mix", "crma_gate")


def test_counts_follow_the_shapes(loaded):
    model, variables = loaded
    cfg = model.config
    d, L, hd = cfg.hidden_size, cfg.num_layers, cfg.head_dim
    dims = {"q_proj": (d, cfg.num_heads * hd), "k_proj": (d, cfg.num_kv_heads * hd),
            "v_proj": (d, cfg.num_kv_heads * hd), "o_proj": (cfg.num_heads * hd, d),
            "gate_proj": (d, cfg.intermediate_size), "up_proj": (d, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, d)}
    lora = L * sum(8 * (i + o) for i, o in dims.values())
    crma = L * (d * 4 + 4 * 4 + 1)
    counts = crma_jax.count_params(variables)
    assert counts["trainable"] == lora + crma
    assert counts["frozen"] == sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("kind,cls", [("nf4", NF4Tensor), ("int8", Int8Tensor)])
def test_quantized_base_keeps_labels_counts_and_runs_under_jit(kind, cls, tiny_models, loaded):
    _, fp32 = loaded
    model, variables = crma_jax.load_pretrained(tiny_models["llama"], lora_config=LoraConfig(rank=8), crma_config=CRMAConfig(), quant=kind)
    q = variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, cls)
    assert not isinstance(variables["params"]["embed_tokens"]["embedding"], (NF4Tensor, Int8Tensor))
    assert crma_jax.count_params(variables) == crma_jax.count_params(fp32)
    labels = jax.tree.leaves(crma_jax.param_labels(variables)["params"], is_leaf=lambda x: isinstance(x, str))
    assert collections.Counter(labels) == {"frozen": len(jax.tree.leaves(fp32["params"]))}
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)
    out = jax.jit(model.apply)(variables, ids)
    ref = jax.jit(model.apply)(fp32, ids)
    assert float(jnp.abs(out - ref).max()) < 0.3 * float(jnp.abs(ref).max())
    assert nbytes(variables["params"]) < nbytes(fp32["params"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_new_families_train_on_a_quantized_base_with_pissa_lora_and_crma(arch, kind, tiny_models):
    """Every projection of every new family is a LoRA target on an NF4/int8 base (PiSSA init),
    biases and q/k norms stay frozen float leaves, and the adapters get gradients."""
    path = tiny_models[arch]
    model, variables = crma_jax.load_pretrained(path, lora_config=LoraConfig(rank=4, init="pissa"), crma_config=CRMAConfig(),
                                                quant=kind)
    _, fp32 = crma_jax.load_pretrained(path)
    layer = variables["params"]["layers"]
    assert all(isinstance(layer[m][p]["kernel"], (NF4Tensor, Int8Tensor)) for m, p in
               [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")])
    assert len(jax.tree.leaves(variables["lora"])) == 14  # a and b on all 7 projections
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)
    out = jax.jit(model.apply)(variables, ids)
    ref = model.clone(lora_config=None, crma_config=None).apply({"params": fp32}, ids)
    # Random tiny weights quantize badly (NF4 over 7 Gemma-3 layers drifts most), but the
    # quantized model must still track the full-precision one.
    assert np.corrcoef(np.ravel(out), np.ravel(ref))[0, 1] > 0.8

    def loss(trainable):
        return model.apply({"params": variables["params"], **trainable}, ids, method="loss")[0]

    grads = jax.jit(jax.grad(loss))({"lora": variables["lora"], "crma": variables["crma"]})
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["lora"]))


def test_unknown_quant_kind(tiny_models):
    with pytest.raises(ValueError, match="quant must be one of"):
        crma_jax.load_pretrained(tiny_models["llama"], quant="fp8")


def test_bf16_kernels_stored_as_bits_give_the_same_model_and_gradients(tiny_models):
    """`store_as_bits` is lossless: same logits and adapter gradients, same labels and counts;
    float32 and quantized kernels are left alone."""
    from crma_jax.adapters import store_as_bits
    from crma_jax.quant import Float16Bits

    model, variables = crma_jax.load_pretrained(tiny_models["llama"], dtype="bfloat16", lora_config=LoraConfig(rank=4),
                                                crma_config=CRMAConfig(rank=2))
    bits = {**variables, "params": store_as_bits(jax.tree.map(jnp.copy, variables["params"]))}
    q = bits["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, Float16Bits) and q.bits.dtype == jnp.uint16 and q.dtype == "bfloat16"
    assert bits["params"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16  # not a layer kernel
    assert crma_jax.count_params(bits) == crma_jax.count_params(variables)
    labels = jax.tree.leaves(crma_jax.param_labels(bits)["params"], is_leaf=lambda x: isinstance(x, str))
    assert collections.Counter(labels) == {"frozen": len(jax.tree.leaves(variables["params"]))}
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)

    @jax.jit
    def loss_and_grads(v):
        def loss(t):
            return model.apply({**v, **t}, ids, method="loss")[0]
        trainable = {c: v[c] for c in ("lora", "crma")}
        return jax.value_and_grad(loss)(trainable)

    got, want = loss_and_grads(bits), loss_and_grads(variables)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got, want)
    nf4 = crma_jax.load_pretrained(tiny_models["llama"], dtype="bfloat16", quant="nf4")[1]
    assert jax.tree.structure(store_as_bits(nf4)) == jax.tree.structure(nf4)
    fp32 = crma_jax.load_pretrained(tiny_models["llama"])[1]
    assert jax.tree.structure(store_as_bits(fp32)) == jax.tree.structure(fp32)
