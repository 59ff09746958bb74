"""`load_pretrained` with a quantized base streams: each layer kernel is quantized (after
PiSSA's SVD when asked) as it is read, and the result is exactly the load-then-quantize one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from crma_jax import hf_params
from crma_jax.adapters import init_adapters, pissa_init, quantize_params
from crma_jax.lora import LoraConfig
from crma_jax.pretrained import load_pretrained


def _load_then_quantize(path, quant, lora):
    """What `load_pretrained` did before streaming: the dense model, PiSSA, then quantize."""
    model, params = load_pretrained(path, "bfloat16")
    model = model.clone(lora_config=lora)
    adapters = init_adapters(model, params, jax.random.PRNGKey(0))
    if lora.init == "pissa":
        params, adapters["lora"] = pissa_init(params, adapters["lora"], lora, jax.random.PRNGKey(1))
    return {"params": quantize_params(params, quant), **adapters}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("init", ["default", "pissa"])
def test_streaming_quantized_load_equals_load_then_quantize(tiny_models, monkeypatch, quant, init):
    lora = LoraConfig(rank=2, alpha=4.0, init=init)
    transformed = []
    assemble = hf_params.assemble_params

    def spy(model, source, dtype, shardings=None, progress=None, transforms=None):
        transformed.extend(transforms or {})
        return assemble(model, source, dtype, shardings, progress, transforms)

    monkeypatch.setattr("crma_jax.pretrained.assemble_params", spy)
    _, got = load_pretrained(tiny_models["llama"], "bfloat16", lora_config=lora, quant=quant)
    monkeypatch.undo()
    want = _load_then_quantize(tiny_models["llama"], quant, lora)
    # Every layer kernel was quantized on the way in, none after.
    kernels = [p for p in hf_params.traverse_util.flatten_dict(got["params"]) if p[0] == "layers" and "norm" not in p[1]]
    assert {p[:4] for p in kernels} == set(transformed) and len(transformed) == 7
    assert jax.tree.structure(got) == jax.tree.structure(want)
    if init == "pissa":  # the same SVD per layer, run alone rather than vmapped over layers
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got["lora"], want["lora"])
        a = got["lora"]["layers"]["self_attn"]["q_proj"]["a"]
        assert float(np.abs(a).max()) > 0.0
        codes = [(g, w) for g, w in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]))
                 if np.dtype(g.dtype) in (np.uint8, np.int8)]
        # Identical codes except where the residual sits on a rounding boundary.
        assert all(np.mean(np.asarray(g) == np.asarray(w)) > 0.99 for g, w in codes)
    else:
        jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got, want)


def test_unknown_quant_is_refused_before_reading(tiny_models):
    with pytest.raises(ValueError, match="quant must be one of"):
        load_pretrained(tiny_models["llama"], quant="nf3")
