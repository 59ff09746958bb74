"""Plan a training step's memory before renting an accelerator: XLA's own buffer plan of one
LoRA (+ CRMA) step compiled from abstract shapes. No weights are loaded or allocated.

    plan = plan_step_memory(ModelConfig.from_hf(config), quant="nf4", batch_size=1, seq_len=2048)
    plan.total_gib      # arguments + temporaries + outputs − donated aliases

The figures are `jax.jit(step).lower(ShapeDtypeStructs).compile().memory_analysis()` on the
chosen backend (the default one, or e.g. "cpu"), so they describe the exact program that
`crma train` runs with the same settings, including its donation of the trainable state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from crma_jax.adapters import init_adapters, param_labels, quantize_params, store_as_bits
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.hf_params import abstract_params
from crma_jax.lora import LoraConfig
from crma_jax.model import Decoder
from crma_jax.optim import make_optimizer
from crma_jax.sharding import make_mesh
from crma_jax.train_step import BATCH_KEYS, jit_train_step, make_train_step

GIB = 2**30
# Well-known shapes (from the models' HF configs), so a plan needs no download.
ARCHS: dict[str, dict[str, Any]] = {
    "tinyllama": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                       tie_word_embeddings=False),
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """XLA's buffer plan of one step, in bytes. `total` = arguments + temp + outputs − aliases."""

    argument: int
    output: int
    alias: int
    temp: int
    weights: int  # the frozen base alone (part of `argument`)

    @property
    def total(self) -> int:
        return self.argument + self.temp + self.output - self.alias

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in {**dataclasses.asdict(self), "total": self.total}.items()}


def _struct(x: Any, dtype: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)


def abstract_base(model: Decoder, dtype: Any, quant: str | None, platform: str = "cpu") -> Any:
    """ShapeDtypeStructs of the frozen base stored in `dtype` as `crma train` stores it on
    `platform`: kernels quantized if asked, else 16-bit ones as their bits on a CPU."""
    params = jax.tree.map(lambda s: _struct(s, dtype), abstract_params(model))
    if quant:
        return jax.eval_shape(lambda p: quantize_params(p, quant), params)
    return store_as_bits(params) if platform == "cpu" else params


def plan_step_memory(config: ModelConfig, *, batch_size: int = 1, seq_len: int = 2048, quant: str | None = "nf4",
                     dtype: Any = jnp.bfloat16, compute_dtype: Any = jnp.bfloat16,
                     lora: LoraConfig | None = LoraConfig(rank=8), crma: CRMAConfig | None = CRMAConfig(rank=4),
                     accum_steps: int = 1, backend: str | None = None, **model_options: Any) -> MemoryPlan:
    """Compile one training step of `config` from abstract shapes and return XLA's buffer plan.

    `model_options` are further `Decoder` attributes (e.g. `remat="full"`). The step is the
    library's (`make_train_step` + `jit_train_step`, ZClip + per-label AdamW) on a one-device
    mesh of `backend` (default: JAX's default backend).
    """
    device = jax.devices(backend)[0] if backend else jax.devices()[0]
    model = Decoder(config, dtype=compute_dtype, lora=lora, crma=crma, **model_options)
    frozen = abstract_base(model, dtype, quant, device.platform)
    trainable = jax.eval_shape(lambda p: init_adapters(model, p, jax.random.PRNGKey(0)), frozen)
    lr = {"lora_a": 1e-4, "lora_b": 1e-4, "crma_mix": 1e-3, "crma_gate": 1e-2}
    optimizer = make_optimizer(param_labels(trainable), lr, total_steps=1000)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    step = make_train_step(model, optimizer, accum_steps)
    mesh = make_mesh((1, 1, 1), [device])
    compiled_step, shardings = jit_train_step(step, mesh, trainable, opt_state, frozen)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in BATCH_KEYS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    analysis = compiled_step.lower(trainable, opt_state, frozen, batch, rng).compile().memory_analysis()
    weights = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(frozen))
    return MemoryPlan(argument=analysis.argument_size_in_bytes, output=analysis.output_size_in_bytes,
                      alias=analysis.alias_size_in_bytes, temp=analysis.temp_size_in_bytes, weights=weights)


def arch_config(arch: str) -> ModelConfig:
    """A `ModelConfig` for a name in `ARCHS` or a path to an HF `config.json`."""
    import json
    from pathlib import Path

    if arch in ARCHS:
        return ModelConfig.from_hf(ARCHS[arch])
    path = Path(arch)
    if not path.is_file():
        raise FileNotFoundError(f"{arch}: neither a known architecture ({', '.join(ARCHS)}) nor a config.json file")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a usable HF config ({e})") from e
