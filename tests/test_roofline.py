"""crma_jax/roofline.py: the step's FLOPs and bytes as the compilers count them, the model-FLOPs
formula, and the roofline bound."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crma_jax import roofline as rl
from crma_jax import targets
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.lora import LoraConfig
from crma_jax.memory_plan import compile_step_from_shapes
from crma_jax.model import Decoder

targets.prepare_host()

LORA, CRMA = LoraConfig(rank=8), CRMAConfig(rank=4)
HF = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
# A bf16 base: the extrapolation does not depend on how the base is stored, and NF4 compiles several times slower on a TPU.
SHAPES = dict(batch_size=2, seq_len=64, quant=None, dtype=jnp.bfloat16)


def _model(config, **kw):
    return Decoder(config, dtype=jnp.bfloat16, lora_config=LORA, crma_config=CRMA, remat="full", **kw)


@pytest.mark.parametrize("platform", ["cpu", "v5e-1"])
def test_two_shallow_compiles_extrapolate_to_the_stack_written_out_in_full(platform):
    devices = jax.devices("cpu") if platform == "cpu" else targets.target_devices(targets.resolve_target(platform))
    config = ModelConfig.from_hf(HF)
    costs = rl.step_costs(_model(config), devices, (1, 1, 1), **SHAPES)
    unrolled, _, _ = compile_step_from_shapes(_model(config, unroll_layers=True), devices, (1, 1, 1), **SHAPES)
    direct = rl._cost(unrolled)
    scanned, _, _ = compile_step_from_shapes(_model(config), devices, (1, 1, 1), **SHAPES)
    assert costs.counted_by == devices[0].platform
    assert costs.flops == pytest.approx(direct["flops"], rel=0.01)
    assert costs.bytes_accessed == pytest.approx(direct["bytes"], rel=0.05)
    # What the extrapolation is for: the scanned stack's own count misses most of its layers.
    assert rl._cost(scanned)["flops"] < 0.75 * direct["flops"]


def test_the_model_flops_formula_is_the_compiled_count_without_recomputation():
    # Wide layers over a short context: the matmuls dominate, as in a real model's step.
    config = ModelConfig.from_hf({**HF, "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                  "num_hidden_layers": 3})
    model = Decoder(config, lora_config=LORA, crma_config=CRMA, attention="xla")
    shapes = dict(batch_size=4, seq_len=32, quant=None, dtype=jnp.float32)
    none = rl.step_costs(model, jax.devices("cpu"), (1, 1, 1), **shapes)
    full = rl.step_costs(model.clone(remat="full"), jax.devices("cpu"), (1, 1, 1), **shapes)
    flops = rl.model_flops(config, 4, 32, LORA, CRMA)
    assert none.flops == pytest.approx(flops, rel=0.03)
    # Full remat runs the forward pass again: 2 more FLOPs per weight on top of 4.
    assert full.flops / none.flops == pytest.approx(1.5, abs=0.05)


def test_a_wide_fsdp_step_on_a_tpu_is_counted_in_full():
    # At these widths libtpu gathers each weight inside a loop over the 8 chips' shards (a
    # windowed einsum), counted once by cost_analysis: 0.33 of 1.10 TFLOP per chip before the
    # costing compiles turned it off (`rl.COSTING_OPTIONS`). At T=512, or over 4 chips,
    # libtpu gathers without the loop.
    config = ModelConfig.from_hf({**HF, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 4})
    devices = targets.target_devices(targets.resolve_target("v5e-8"))
    model = Decoder(config, dtype=jnp.bfloat16, lora_config=LORA, crma_config=CRMA)
    costs = rl.step_costs(model, devices, (1, 8, 1), batch_size=8, seq_len=1024, quant=None, dtype=jnp.bfloat16)
    assert costs.flops == pytest.approx(rl.model_flops(config, 8, 1024, LORA, CRMA) / 8, rel=0.05)


def test_a_deviceless_gpu_is_counted_by_xla_cpu_one_chips_share_at_a_time():
    config = ModelConfig.from_hf(HF)
    one = rl.step_costs(_model(config), targets.target_devices(targets.resolve_target("h100")), (1, 1, 1),
                        **{**SHAPES, "batch_size": 1})
    eight = rl.step_costs(_model(config), targets.target_devices(targets.resolve_target("h100x8")), (1, 8, 1),
                          **{**SHAPES, "batch_size": 8})
    assert one.counted_by == eight.counted_by == "cpu" and one.bytes_accessed is eight.bytes_accessed is None
    assert eight.flops == pytest.approx(one.flops) and one.flops > 0
    bound = rl.roofline(eight, targets.CHIPS["h100"], 8, 1e12)
    assert bound.memory_seconds is None and bound.seconds == bound.compute_seconds


@settings(max_examples=50, deadline=None)
@given(seq_len=st.integers(1, 300), window=st.one_of(st.none(), st.integers(1, 400)))
def test_attended_positions_is_the_mean_causal_window(seq_len, window):
    keys = [min(i + 1, window or seq_len) for i in range(seq_len)]
    assert rl.attended_positions(seq_len, window) == pytest.approx(sum(keys) / seq_len)


def test_a_sliding_window_and_lora_targets_enter_the_model_flops():
    config = ModelConfig.from_hf(HF)
    windowed = dataclasses.replace(config, layer_windows=(64,) * config.num_layers)
    assert rl.model_flops(windowed, 1, 1024, None, None) < rl.model_flops(config, 1, 1024, None, None)
    q_only = LoraConfig(rank=8, targets=("q_proj",))
    base = rl.model_flops(config, 2, 16, None, None)
    # 6 FLOPs per trainable weight and token: A (256 x 8) and B (8 x 256) in every layer.
    assert rl.model_flops(config, 2, 16, q_only, None) - base == pytest.approx(2 * 16 * 6 * 3 * 8 * (256 + 256))


def test_the_bound_is_the_slower_of_compute_and_memory():
    chip = targets.CHIPS["h100"]
    compute = rl.roofline(rl.StepCosts(2 * chip.peak_bf16_flops, chip.hbm_bandwidth, "tpu"), chip, 4, 4e15)
    assert compute.seconds == 2.0 and compute.bound_by == "compute"
    assert compute.mfu == pytest.approx(4e15 / (4 * chip.peak_bf16_flops * 2.0))
    memory = rl.roofline(rl.StepCosts(chip.peak_bf16_flops, 3 * chip.hbm_bandwidth, "tpu"), chip, 1, 1e12)
    assert memory.seconds == 3.0 and memory.bound_by == "memory"
    # A count below the model FLOPs (a loop inside a layer counted once) never lowers the bound.
    short = rl.roofline(rl.StepCosts(chip.peak_bf16_flops, None, "cpu"), chip, 2, 8 * chip.peak_bf16_flops)
    assert short.compute_seconds == 4.0 and short.mfu == 1.0
