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


def test_unsupported_rope_is_refused():
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf(_llama(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="partial rotary"):
        ModelConfig.from_hf(_llama(model_type="phi3", partial_rotary_factor=0.75))


def test_biases_come_from_the_family_and_the_hf_flags():
    assert ModelConfig.from_hf(_llama()).biases == ()
    assert ModelConfig.from_hf(_llama(attention_bias=True)).biases == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert ModelConfig.from_hf(_llama(mlp_bias=True)).biases == ("gate_proj", "up_proj", "down_proj")
    assert ModelConfig.from_hf(_llama(model_type="qwen2")).biases == ("q_proj", "k_proj", "v_proj")
    assert ModelConfig.from_hf(_llama(model_type="qwen3", attention_bias=True)).biases[-1] == "o_proj"


def test_qwen_windows_need_use_sliding_window():
    """Qwen2.5 hub configs carry sliding_window=32768 with use_sliding_window=false: no window."""
    hub = _llama(model_type="qwen2", num_hidden_layers=4, sliding_window=32768, use_sliding_window=False,
                 max_window_layers=2)
    assert ModelConfig.from_hf(hub).windows == (None,) * 4
    on = ModelConfig.from_hf({**hub, "use_sliding_window": True})
    assert on.windows == (None, None, 32768, 32768)


def test_gemma3_old_hub_layout_pattern_local_base_and_global_scaling():
    """The released Gemma-3 config.json layout (before `layer_types`/`rope_parameters`)."""
    cfg = ModelConfig.from_hf(_llama(
        model_type="gemma3_text", num_hidden_layers=7, sliding_window=512, sliding_window_pattern=6,
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=256))
    assert cfg.windows == (512,) * 5 + (None, 512) and cfg.layer_ropes == (1,) * 5 + (0, 1)
    assert (cfg.rope.theta, cfg.rope.kind, cfg.rope.factor) == (1e6, "linear", 8.0)
    assert (cfg.local_rope.theta, cfg.local_rope.kind) == (1e4, "default")
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.gemma_norm and cfg.tie_word_embeddings
    assert cfg.attn_scale == pytest.approx(256 ** -0.5)


def test_phi3_longrope_attention_factor_from_the_context_extension():
    """Phi-3-mini-128k's layout: `su` renamed longrope, factor from 131072 / 4096."""
    import math

    cfg = ModelConfig.from_hf(_llama(
        model_type="phi3", hidden_size=8, num_attention_heads=2, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": [1.0, 1.1], "long_factor": [2.0, 3.0]}))
    assert cfg.rope.kind == "longrope" and cfg.rope.long_factor == (2.0, 3.0)
    assert cfg.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    with pytest.raises(ValueError, match="head_dim/2"):
        ModelConfig.from_hf(_llama(model_type="phi3", rope_scaling={"type": "su", "short_factor": [1.0],
                                                                     "long_factor": [1.0]}))


def test_gemma2_windows_alternate_and_mistral_windows_everywhere():
    g2 = ModelConfig.from_hf(_llama(model_type="gemma2", num_hidden_layers=4, sliding_window=7))
    assert g2.windows == (7, None, 7, None) and g2.sandwich_norms and g2.gemma_norm
    m = ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=7))
    assert m.windows == (7, 7)
    assert ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=None)).windows == (None, None)


def test_gqa_must_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig.from_hf(_llama(num_attention_heads=3, num_key_value_heads=2))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", -8, "hidden_size must be a positive integer, got -8"),
    ("vocab_size", "32000", "vocab_size must be a positive integer, got '32000'"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be a positive integer, got 2.5"),
    ("intermediate_size", float("inf"), "intermediate_size must be a positive integer, got inf"),
    ("num_key_value_heads", True, "num_key_value_heads must be a positive integer, got True"),
    ("hidden_size", 1e9, r"hidden_size x num_attention_heads x head_dim = 1e\+18 elements in one weight matrix, "
                         r"more than any real model has \(6.87e\+10\); is the config right\?"),
    ("vocab_size", 1e12, r"vocab_size x hidden_size = 8e\+12 elements"),
])
def test_absurd_sizes_are_refused_by_key_before_anything_is_allocated(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(_llama(**{field: value}))


def test_legacy_gemma_gelu_is_the_tanh_form_as_in_transformers():
    from transformers import GemmaConfig

    legacy = _llama(model_type="gemma", hidden_act="gelu", hidden_activation=None)
    assert GemmaConfig(hidden_act="gelu").hidden_act == "gelu_pytorch_tanh"  # what transformers runs
    assert ModelConfig.from_hf(legacy).activation == "gelu_tanh"
    # Only Gemma has that legacy reading: elsewhere "gelu" is the exact erf GELU.
    assert ModelConfig.from_hf(_llama(hidden_act="gelu")).activation == "gelu"


@pytest.mark.parametrize("arch,billions", [("llama3.1-8b", 8.030), ("qwen3-8b", 8.191), ("qwen2.5-7b", 7.616),
                                           ("gemma3-12b", 11.766)])
def test_published_configs_give_the_published_parameter_counts(arch, billions):
    """The memory planner's entries for the 2026 families, parsed by `from_hf`, build decoders
    with their models' parameter counts (Gemma-3-12B: the text decoder only)."""
    import jax

    from crma_jax.hf_params import abstract_params
    from crma_jax.memory_plan import arch_config
    from crma_jax.model import Decoder

    count = sum(x.size for x in jax.tree.leaves(abstract_params(Decoder(arch_config(arch)))))
    assert count / 1e9 == pytest.approx(billions, abs=5e-4)


def test_llama_3_2_1b_config_ties_the_128k_head():
    """Llama-3.2-1B's published config.json: tied 128256-token embeddings, llama3 RoPE with
    factor 32, 1,235,814,400 parameters."""
    import jax

    from crma_jax.hf_params import abstract_params
    from crma_jax.model import Decoder

    cfg = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)))
    params = abstract_params(Decoder(cfg))
    assert cfg.tie_word_embeddings and "lm_head" not in params and cfg.rope.factor == 32.0
    assert sum(x.size for x in jax.tree.leaves(params)) == 1_235_814_400
