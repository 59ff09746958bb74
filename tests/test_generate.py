"""Generation with a KV cache: greedy equals transformers' greedy; sampling is well formed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import crma_jax
from crma_jax.generate import generate, top_p_filter


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "qwen2", "qwen3", "gemma3", "phi3"])
def test_greedy_matches_transformers(arch, tiny_models):
    """Mistral/Gemma-2/3 windows (5) are shorter than the 15 generated positions: the cache must
    honour them. Phi-3's decoding crosses its LongRoPE original context (8), where the whole
    cache is recomputed with the long factors, as transformers does."""
    model, params = crma_jax.load_pretrained(tiny_models[arch])
    prompt = np.random.RandomState(0).randint(3, 128, (2, 5))
    ours = np.asarray(generate(model, {"params": params}, jnp.asarray(prompt), 10))
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                      max_new_tokens=10, min_new_tokens=10, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_forward(tiny_models):
    model, params = crma_jax.load_pretrained(tiny_models["gemma"])
    prompt = jnp.asarray(np.random.RandomState(1).randint(0, 128, (1, 4)))
    out = generate(model, {"params": params}, prompt, 6)
    for t in range(4, 10):
        logits = model.apply({"params": params}, out[:, :t])
        assert int(jnp.argmax(logits[0, -1])) == int(out[0, t])


def test_top_p_keeps_the_nucleus_only():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    assert np.isfinite(np.asarray(top_p_filter(logits, 1e-6))).sum() == 1


def test_sampling_is_seeded_and_in_vocab(tiny_models):
    model, params = crma_jax.load_pretrained(tiny_models["llama"])
    prompt = jnp.zeros((2, 3), jnp.int32)
    a = generate(model, {"params": params}, prompt, 8, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(5))
    b = generate(model, {"params": params}, prompt, 8, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 128
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, {"params": params}, prompt, 0)
