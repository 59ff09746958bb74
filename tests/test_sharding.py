"""Sharded loading on 8 simulated CPU devices (XLA_FLAGS is set in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import crma_jax
from crma_jax.convert.convert import convert_checkpoint
from crma_jax.sharding import logical_axes, make_mesh, partition_spec



def test_the_session_has_8_simulated_devices():
    """conftest.py forces the flag, so the 8-device tests below run (never skip) in any environment."""
    assert len(jax.devices()) == 8


def test_a_preset_xla_flags_does_not_turn_the_8_device_tests_off():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_the_session_has_8_simulated_devices"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "1 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def _logits(model, params, ids):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_load_onto_2x4_mesh_matches_unsharded(arch, tiny_models, batch):
    ids, _ = batch
    mesh = make_mesh((1, 2, 4))
    model, sharded = crma_jax.load_pretrained(tiny_models[arch], mesh=mesh)
    _, plain = crma_jax.load_pretrained(tiny_models[arch])
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]  # (L, d=64, H*hd)
    assert q.sharding.spec == P(None, "fsdp", "model")
    assert len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 4)
    emb = sharded["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("model", "fsdp")
    np.testing.assert_allclose(_logits(model, sharded, ids), _logits(model, plain, ids), atol=1e-5, rtol=0)


def test_converted_checkpoint_restores_resharded(tmp_path, tiny_models, batch):
    ids, _ = batch
    out = convert_checkpoint(tiny_models["llama"], tmp_path / "conv", progress=False)
    model, params = crma_jax.load_pretrained(out, mesh=make_mesh((2, 1, 4)))
    down = params["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.sharding.spec == P(None, "model", None)  # fsdp axis has size 1: dropped
    _, plain = crma_jax.load_pretrained(tiny_models["llama"])
    np.testing.assert_allclose(_logits(model, params, ids), _logits(model, plain, ids), atol=1e-5, rtol=0)


def test_partition_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh((1, 2, 4))
    # SmolLM2: 9 heads * 64 = 576 is divisible by 4, but 3 kv heads * 64 = 192 too; vocab 49155 is not.
    assert partition_spec(("embed_tokens", "embedding"), (49155, 576), mesh) == P(None, "fsdp")
    assert partition_spec(("layers", "input_layernorm", "scale"), (30, 576), mesh) == P(None, None)
    assert logical_axes(("layers", "mlp", "down_proj", "kernel"), 3) == ("layers", "mlp", "embed")


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        make_mesh((2, 2, 4))
    assert make_mesh((1, 1, 2)).devices.size == 2  # a smaller mesh takes the first devices


def test_stored_kernel_fields_shard_like_the_kernel():
    q = ("layers", "self_attn", "q_proj", "kernel")
    down = ("layers", "mlp", "down_proj", "kernel")
    assert logical_axes(q + ("bits",), 3) == logical_axes(q, 3) == ("layers", "embed", "heads")
    assert logical_axes(down + ("codes",), 3) == ("layers", "mlp", "embed")
    assert logical_axes(down + ("scale",), 2) == ("layers", "embed")  # int8: per output column
    # NF4: the flattened kernel's one axis carries both names.
    assert logical_axes(q + ("packed",), 2) == ("layers", ("embed", "heads"))
    assert logical_axes(down + ("absmax",), 2) == ("layers", ("mlp", "embed"))
    assert logical_axes(q + ("absmax", "codes"), 2) == (None, None)  # double-quant: replicated


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_streaming_quantized_load_shards_the_codes_and_matches_unsharded(quant, tiny_models, batch):
    ids, _ = batch
    mesh = make_mesh((1, 2, 4))
    model, sharded = crma_jax.load_pretrained(tiny_models["llama"], mesh=mesh, quant=quant)
    _, plain = crma_jax.load_pretrained(tiny_models["llama"], quant=quant)
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
    codes = q.packed if quant == "nf4" else q.codes
    assert codes.sharding.spec == (P(None, ("fsdp", "model")) if quant == "nf4" else P(None, "fsdp", "model"))
    down = sharded["layers"]["mlp"]["down_proj"]["kernel"]
    down_codes = down.packed if quant == "nf4" else down.codes
    assert down_codes.sharding.spec == (P(None, ("model", "fsdp")) if quant == "nf4" else P(None, "model", "fsdp"))
    assert codes.addressable_shards[0].data.size < codes.size
    np.testing.assert_allclose(_logits(model, sharded, ids), _logits(model, plain, ids), atol=1e-5, rtol=0)


def test_fsdp_keeps_activations_per_device_where_the_tpu_partitioner_would_gather_the_global_batch():
    """Without `constrain_batch`, libtpu's partitioner keeps the MLP weights split and computes
    the MLP on every chip for the whole global batch (193 buffers of (16, 256, 2048) here), so
    per-chip memory grew with the number of chips."""
    import re

    import jax.numpy as jnp

    from crma_jax import targets
    from crma_jax.config import ModelConfig
    from crma_jax.memory_plan import compile_step_from_shapes
    from crma_jax.model import Decoder
    from crma_jax.sharding import constrain_batch

    x = jnp.ones((4, 3))
    assert constrain_batch(x) is x  # no mesh to follow: unchanged
    targets.prepare_host()
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=2048,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    devices = targets.target_devices(targets.resolve_target("v5e-16"))
    model = Decoder(config, dtype=jnp.bfloat16, lora_config=crma_jax.LoraConfig(rank=8), remat="full")
    compiled, _, _ = compile_step_from_shapes(model, devices, (1, 16, 1), batch_size=16, seq_len=256, quant=None,
                                              dtype=jnp.bfloat16)
    hlo = compiled.as_text()
    assert not re.search(r"\[16,256,2048\]", hlo) and re.search(r"\[1,256,2048\]", hlo)
