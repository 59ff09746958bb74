"""Next-token loss: the chunked LM head + cross-entropy equals the full-logits version (values
and gradients), through `Decoder.loss` too, and its compiled memory plan holds no (B, T, V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.loss import chunked_next_token_loss, next_token_loss


def _full_loss(hidden, ids, mask, head, tied, softcap):
    """The unchunked path, written as `Decoder.logits` does it."""
    logits = (hidden @ (head.T if tied else head)).astype(jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return next_token_loss(logits, ids, mask)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("vocab_block,full_max", [(16, 0), (64, 0), (64, 10**9)])  # 50 = 16+16+16+2: overlap
def test_chunked_equals_full_values_and_gradients(tied, softcap, vocab_block, full_max):
    b, t, d, v = 2, 7, 16, 50
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(b, t, d), jnp.float32)
    head = jnp.asarray(rng.randn(*((v, d) if tied else (d, v))) * 0.3, jnp.float32)
    ids = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.3, jnp.int32)

    def chunked(h, w):
        kw = {"embedding": w} if tied else {"kernel": w}
        return chunked_next_token_loss(h, ids, mask, softcap=softcap, chunk_size=5, vocab_block=vocab_block,
                                       full_logits_max=full_max, **kw)  # 14 rows: 3 chunks, or all at once

    def full(h, w):
        return _full_loss(h, ids, mask, w, tied, softcap)

    got, got_n = chunked(hidden, head)
    got_g = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, head)
    want, want_n = full(hidden, head)
    want_g = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(hidden, head)
    assert float(got_n) == float(want_n) == float(mask[:, 1:].sum())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert float(jnp.abs(got_g[0][:, -1]).max()) == 0.0  # the last position predicts nothing


def test_chunked_without_mask_counts_every_next_token():
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(3, 4, 8), jnp.float32)
    kernel = jnp.asarray(rng.randn(8, 11), jnp.float32)
    ids = jnp.asarray(rng.randint(0, 11, (3, 4)), jnp.int32)
    total, count = chunked_next_token_loss(hidden, ids, kernel=kernel)
    want, want_n = _full_loss(hidden, ids, None, kernel, False, None)
    assert float(count) == float(want_n) == 9.0
    np.testing.assert_allclose(total, want, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        chunked_next_token_loss(hidden, ids)


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=64)
GEMMA2 = dict(model_type="gemma2", tie_word_embeddings=True, gemma_norm=True, scale_embedding=True,
              sandwich_norms=True, attn_logit_softcap=5.0, final_logit_softcap=3.0,
              query_pre_attn_scalar=8.0, layer_windows=(4, None), activation="gelu_tanh")


@pytest.mark.parametrize("kind", ["llama_untied_lora", "gemma2_tied_softcap_lora_crma"])
def test_decoder_loss_equals_logits_path_with_adapter_gradients(kind):
    """`Decoder.loss` == next_token_loss(logits), and so are the LoRA/CRMA gradients."""
    gemma2 = kind.startswith("gemma2")
    cfg = crma_jax.ModelConfig(**TINY, **(GEMMA2 if gemma2 else dict(model_type="llama")))
    crma = CRMAConfig(rank=2, init_mix_logit=0.0) if gemma2 else None  # CRMA once: it is slow to compile
    model = crma_jax.Decoder(cfg, lora_config=LoraConfig(rank=2, alpha=4.0), crma_config=crma)
    rng = np.random.RandomState(2)
    ids = jnp.asarray(rng.randint(0, 96, (2, 9)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
    # LoRA B starts at zero, which would make every LoRA A gradient zero: perturb it.
    variables["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                                     variables["lora"])
    frozen = variables["params"]
    trainable = {c: variables[c] for c in ("lora", "crma") if c in variables}
    assert ("crma" in trainable) == gemma2
    mask = jnp.asarray(rng.rand(2, 9) > 0.2, jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 4, [1] * 9])
    positions = jnp.asarray([list(range(5)) + list(range(4)), list(range(9))])
    kw = dict(positions=positions, segment_ids=segments)

    @jax.jit
    def both(t):
        def chunked(t):
            return model.apply({"params": frozen, **t}, ids, mask, chunk_size=4, full_logits_max=0, method="loss", **kw)

        def full(t):
            return next_token_loss(model.apply({"params": frozen, **t}, ids, **kw), ids, mask)

        return [(f(t), jax.grad(lambda t: f(t)[0])(t)) for f in (chunked, full)]

    ((got, n), got_g), ((want, want_n), want_g) = both(trainable)
    assert float(n) == float(want_n)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    leaves = jax.tree.leaves(got_g)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got_g, want_g)


def test_chunked_loss_memory_holds_no_full_logits():
    """fwd+bwd (w.r.t. hidden and head) at B·T = 4096, V = 32000, 256-token chunks: the temp
    buffers are a few chunks of logits, not the (B, T, V) ones the full path holds."""
    b, t, d, v = 1, 4096, 64, 32000
    logits_bytes = b * t * v * 4  # one (B, T, V) float32 buffer: 500 MiB
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    specs = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32), ids)

    def temp(loss):
        grad = jax.grad(lambda h, w, i: loss(h, w, i)[0], argnums=(0, 1))
        return jax.jit(grad).lower(*specs).compile().memory_analysis().temp_size_in_bytes

    chunked = temp(lambda h, w, i: chunked_next_token_loss(h, i, kernel=w, chunk_size=256, full_logits_max=0))
    full = temp(lambda h, w, i: _full_loss(h, i, None, w, False, None))
    assert full > logits_bytes
    # Measured: two (256, V) float32 chunk buffers (65.6 MB) against 1.5 GB for the full path.
    assert chunked < 3 * 256 * v * 4 < logits_bytes / 5


def test_frozen_bf16_head_is_never_copied_whole():
    """Differentiating the hidden states only (the head frozen, as in every adapter run): no
    (V, d) head gradient, and no float32 copy of the bf16 head, which XLA:CPU makes when it
    slices a 16-bit float array."""
    b, t, d, v = 1, 512, 64, 65536
    head_bytes = v * d * 2
    specs = (jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16), jax.ShapeDtypeStruct((v, d), jnp.bfloat16),
             jax.ShapeDtypeStruct((b, t), jnp.int32))

    def loss(h, w, i):
        return chunked_next_token_loss(h, i, embedding=w, softcap=30.0, chunk_size=256, vocab_block=1024,
                                       full_logits_max=0)[0]

    temp = jax.jit(jax.grad(loss)).lower(*specs).compile().memory_analysis().temp_size_in_bytes
    # Measured: one bf16 bit-copy of the head (the bitcast) plus (256, 1024) blocks; a float32
    # copy or an f32 gradient would each add 2 × head_bytes.
    assert temp < 1.5 * head_bytes
