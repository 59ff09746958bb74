"""assemble_params' per-layer transform hook: streaming order, stacking, placement, refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from crma_jax.hf_params import assemble_params
from crma_jax.pretrained import load_source, open_source

Q = ("layers", "self_attn", "q_proj", "kernel")


class RecordingSource:
    """A tensor source that logs every `get`, so the order of reads can be checked."""

    def __init__(self, inner, log):
        self._inner, self._log, self.path = inner, log, inner.path

    def keys(self):
        return self._inner.keys()

    def hf_config(self):
        return self._inner.hf_config()

    def get(self, name):
        self._log.append(("get", name))
        return self._inner.get(name)


def test_transform_sees_one_layer_at_a_time_and_is_stacked(tiny_models):
    model, plain = load_source(open_source(tiny_models["llama"]), "float32", "float32")
    log: list = []

    def fn(i, w):
        log.append(("fn", i, w.dtype.name, w.shape, w.flags.c_contiguous))
        return (w.astype(np.float32) * 2, np.float32(i))

    device = SingleDeviceSharding(jax.devices()[1])
    src = RecordingSource(open_source(tiny_models["llama"]), log)
    got = assemble_params(model, src, "bfloat16", shardings={"layers": {"self_attn": {"q_proj": {"kernel": device}}}},
                          transforms={Q: fn})
    q_reads = [k for k, e in enumerate(log) if e[0] == "get" and "q_proj" in e[1]]
    calls = [k for k, e in enumerate(log) if e[0] == "fn"]
    # Streaming: each layer's transform runs right after that layer's read, before the next read.
    assert calls == [k + 1 for k in q_reads] and len(calls) == model.config.num_layers
    d = model.config.hidden_size
    assert all(e[1:] == (i, "bfloat16", (d, d), True) for i, e in enumerate(log[k] for k in calls))
    doubled, index = got["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(index), np.arange(model.config.num_layers, dtype=np.float32))
    ref = np.asarray(plain["layers"]["self_attn"]["q_proj"]["kernel"]).astype(jax.numpy.bfloat16)
    np.testing.assert_array_equal(np.asarray(doubled), ref.astype(np.float32) * 2)
    assert doubled.sharding == device and index.sharding == device
    # Untransformed leaves load as before.
    np.testing.assert_array_equal(np.asarray(got["layers"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(plain["layers"]["mlp"]["up_proj"]["kernel"]).astype(jax.numpy.bfloat16))


def test_transform_on_an_unstacked_leaf_is_refused(tiny_models):
    model, _ = load_source(open_source(tiny_models["llama"]), "float32", "float32")
    with pytest.raises(ValueError, match="layer-stacked leaf, not embed_tokens/embedding"):
        assemble_params(model, open_source(tiny_models["llama"]), transforms={("embed_tokens", "embedding"): lambda i, w: w})
