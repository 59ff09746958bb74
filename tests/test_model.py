"""The decoder against transformers' PyTorch models: fp32 parity, bf16 bound, masks, packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCHS, hf_logits

import crma_jax

# bf16 compute on these tiny models: measured max |ours_bf16 - torch_fp32| / max|torch_fp32|
# was 0.005-0.019 across the five fixtures (bf16 has an 8-bit mantissa; errors compound over
# 2 layers and the head). The bound leaves ~1.5x headroom.
BF16_REL_BOUND = 0.03


# "blockwise" with 4-token tiles: T = 12 gives 3 x 3 tiles, so the online softmax, the skipped
# causal/window tiles and the padding all take part.
ATTENTION = {"xla": {"attention": "xla"}, "blockwise": {"attention": "blockwise", "attention_block": 4}}


@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp32_logits_match_transformers_on_padded_batch(arch, attention, tiny_models, batch):
    ids, mask = batch
    ref = hf_logits(tiny_models[arch], ids, mask)
    model, params = crma_jax.load_pretrained(tiny_models[arch])
    model = model.clone(**ATTENTION[attention])
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert ours.shape == ref.shape == (2, 12, 128)
    assert ours.dtype == np.float32
    real = mask.astype(bool)  # padded query positions have no defined output
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)
    if attention == "blockwise":  # and it equals the quadratic reference path tightly
        dense = np.asarray(model.clone(attention="xla").apply({"params": params}, jnp.asarray(ids),
                                                              attention_mask=jnp.asarray(mask)))
        np.testing.assert_array_less(np.abs(ours - dense)[real].max(), 1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_compute_within_stated_bound(arch, tiny_models, batch):
    ids, _ = batch
    ref = hf_logits(tiny_models[arch], ids)
    model, params = crma_jax.load_pretrained(tiny_models[arch], dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert ours.dtype == np.float32
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 0 < rel <= BF16_REL_BOUND


def test_sliding_window_changes_the_result(tiny_models, batch):
    """The window (5 < T=12) must matter, or the Mistral parity test proves nothing about it."""
    ids, _ = batch
    model, params = crma_jax.load_pretrained(tiny_models["mistral"])
    full = model.clone(config=crma_jax.ModelConfig(**{**model.config.__dict__, "layer_windows": ()}))
    a = model.apply({"params": params}, jnp.asarray(ids))
    b = full.apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)  # inside the window: identical
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_sequences_equal_separate_ones(arch, tiny_models):
    """Two documents packed in one row (segment ids + restarted positions) = each run alone."""
    model, params = crma_jax.load_pretrained(tiny_models[arch])
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, 128, 7), rng.randint(0, 128, 5)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray([[1] * 7 + [2] * 5])
    positions = jnp.asarray([list(range(7)) + list(range(5))])
    out = model.apply({"params": params}, packed, positions=positions, segment_ids=segments)
    alone_a = model.apply({"params": params}, jnp.asarray(a[None]))
    alone_b = model.apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(out[:, :7], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], alone_b, atol=1e-5)


def test_random_init_has_the_documented_tree():
    cfg = crma_jax.ModelConfig(
        model_type="gemma2", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=8, sandwich_norms=True, gemma_norm=True,
        tie_word_embeddings=True,
    )
    params = crma_jax.Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert set(params) == {"embed_tokens", "layers", "norm"}
    layer = params["layers"]
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (3, 16, 32)
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (3, 16, 16)
    assert layer["mlp"]["down_proj"]["kernel"].shape == (3, 24, 16)
    assert set(layer) >= {"pre_feedforward_layernorm", "post_feedforward_layernorm"}


def _remat_problem(quant=None):
    """A tiny Gemma-2 (windows, soft-caps, sandwich norms) with LoRA + CRMA, its frozen params,
    trainable adapters (LoRA B perturbed so every gradient is non-zero) and a packed batch."""
    from crma_jax.adapters import quantize_params

    cfg = crma_jax.ModelConfig(
        model_type="gemma2", vocab_size=80, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, sandwich_norms=True, gemma_norm=True,
        tie_word_embeddings=True, attn_logit_softcap=5.0, final_logit_softcap=3.0,
        layer_windows=(4, None), activation="gelu_tanh", scale_embedding=True,
    )
    model = crma_jax.Decoder(cfg, lora_config=crma_jax.LoraConfig(rank=2, alpha=4.0),
                             crma_config=crma_jax.CRMAConfig(rank=2, init_mix_logit=0.0), attention_block=4)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 80, (2, 10)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ids)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), variables["lora"])
    frozen = quantize_params(variables["params"], quant) if quant else variables["params"]
    batch = dict(loss_mask=jnp.ones_like(ids), segment_ids=jnp.asarray([[1] * 6 + [2] * 4, [1] * 10]),
                 positions=jnp.asarray([list(range(6)) + list(range(4)), list(range(10))]))
    return model, frozen, {"lora": lora, "crma": variables["crma"]}, ids, batch


def _loss_fn(model, frozen, ids, batch):
    def loss(trainable):
        return model.apply({"params": frozen, **trainable}, ids, batch["loss_mask"], batch["positions"],
                           batch["segment_ids"], method="loss")[0]
    return loss


@pytest.mark.parametrize("policy", [p for p in crma_jax.model.REMAT_POLICIES if p != "none"])
def test_remat_policies_give_the_gradients_of_no_remat(policy):
    model, frozen, trainable, ids, batch = _remat_problem()
    want = jax.jit(jax.grad(_loss_fn(model, frozen, ids, batch)))(trainable)
    got = jax.jit(jax.grad(_loss_fn(model.clone(remat=policy), frozen, ids, batch)))(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want["lora"]))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=0), got, want)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("policy", list(crma_jax.model.REMAT_POLICIES))
def test_no_remat_policy_saves_a_dequantized_kernel(policy, quant):
    """The backward's saved residuals hold quantized kernels as stored, never a float (in, out)
    projection kernel (which would undo what NF4/int8 saves)."""
    model, frozen, trainable, ids, batch = _remat_problem(quant)
    cfg = model.config
    kernel_shapes = {(cfg.hidden_size, cfg.num_heads * cfg.head_dim), (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
                     (cfg.num_heads * cfg.head_dim, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size),
                     (cfg.intermediate_size, cfg.hidden_size)}
    # A vjp function is a pytree whose leaves are exactly the residuals saved for the backward.
    _, backward = jax.vjp(_loss_fn(model.clone(remat=policy), frozen, ids, batch), trainable)
    saved = [(a.shape, a.dtype) for a in jax.tree.leaves(backward)]
    floats = [(shape, dt) for shape, dt in saved if jnp.issubdtype(dt, jnp.floating)]
    assert not [sd for sd in floats if tuple(sd[0][-2:]) in kernel_shapes], saved
    # The stored codes are what the backward keeps (uint8 NF4 nibbles / int8 codes).
    assert any(not jnp.issubdtype(dt, jnp.floating) and len(shape) >= 2 for shape, dt in saved)


def test_unknown_remat_policy_and_attention_are_refused():
    model, frozen, trainable, ids, batch = _remat_problem()
    for bad in (dict(remat="everything"), dict(attention="flash")):
        with pytest.raises(ValueError, match="must be one of"):
            model.clone(**bad).apply({"params": frozen, **trainable}, ids)


def _fp32_error(model, params, path, ids, mask=None):
    ref = hf_logits(path, ids, mask)
    kwargs = {} if mask is None else {"attention_mask": jnp.asarray(mask)}
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), **kwargs))
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    return np.abs(ours - ref)[real].max(), ours


def test_phi3_longrope_short_factors_within_the_original_context(tiny_models, batch):
    """T=6 <= 8 (the tiny original context) takes the short factors, T=12 the long ones (the
    padded-batch parity test); both match transformers, and the choice changes the logits."""
    ids, _ = batch
    model, params = crma_jax.load_pretrained(tiny_models["phi3"])
    err, short = _fp32_error(model, params, tiny_models["phi3"], ids[:, :6])
    assert err < 1e-4
    long = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))[:, :6]
    assert np.abs(long - short).max() > 1e-3


def test_gemma3_local_layers_use_their_own_rope(tiny_models, batch):
    """Gemma-3 parity must depend on the local RoPE base: swapping in the global one breaks it."""
    import dataclasses

    ids, _ = batch
    model, params = crma_jax.load_pretrained(tiny_models["gemma3"])
    assert model.config.layer_ropes == (1, 1, 1, 1, 1, 0, 1)
    same = model.clone(config=dataclasses.replace(model.config, local_rope=model.config.rope))
    a = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    b = np.asarray(same.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(a - b).max() > 1e-3


def test_llama_attention_and_mlp_biases_match_transformers(tmp_path, batch):
    from conftest import make_tiny_hf

    ids, mask = batch
    path = make_tiny_hf("llama", tmp_path / "llama_bias", attention_bias=True, mlp_bias=True)
    model, params = crma_jax.load_pretrained(path)
    assert params["layers"]["mlp"]["down_proj"]["bias"].shape == (2, 64)
    err, _ = _fp32_error(model, params, path, ids, mask)
    assert err < 1e-4
