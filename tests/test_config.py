"""ModelConfig.from_hf on HF config dicts of each family, old and new rope layouts."""

from __future__ import annotations

import pytest

from crma_jax.config import ModelConfig


def _llama(**kw):
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1)
    return {**base, **kw}


def test_rope_theta_old_and_new_layouts_agree():
    old = ModelConfig.from_hf(_llama(rope_theta=5e5))
    new = ModelConfig.from_hf(_llama(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    assert old.rope == new.rope and old.rope.theta == 5e5


def test_llama3_rope_scaling_is_parsed():
    cfg = ModelConfig.from_hf(_llama(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    assert cfg.rope.kind == "llama3" and cfg.rope.factor == 8.0


@pytest.mark.parametrize("bad", [{"model_type": "bert"}, {"model_type": None}])
def test_unknown_model_type_is_refused(bad):
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf(_llama(**bad))


def test_unsupported_rope_and_bias_are_refused():
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf(_llama(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(_llama(attention_bias=True))


def test_gemma2_windows_alternate_and_mistral_windows_everywhere():
    g2 = ModelConfig.from_hf(_llama(model_type="gemma2", num_hidden_layers=4, sliding_window=7))
    assert g2.windows == (7, None, 7, None) and g2.sandwich_norms and g2.gemma_norm
    m = ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=7))
    assert m.windows == (7, 7)
    assert ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=None)).windows == (None, None)


def test_gqa_must_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig.from_hf(_llama(num_attention_heads=3, num_key_value_heads=2))


def test_legacy_gemma_gelu_is_the_tanh_form_as_in_transformers():
    from transformers import GemmaConfig

    legacy = _llama(model_type="gemma", hidden_act="gelu", hidden_activation=None)
    assert GemmaConfig(hidden_act="gelu").hidden_act == "gelu_pytorch_tanh"  # what transformers runs
    assert ModelConfig.from_hf(legacy).activation == "gelu_tanh"
    # Only Gemma has that legacy reading: elsewhere "gelu" is the exact erf GELU.
    assert ModelConfig.from_hf(_llama(hidden_act="gelu")).activation == "gelu"
