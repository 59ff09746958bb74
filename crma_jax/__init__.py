"""crma-jax: CRMA (Constrained Residual Mixing Adapter) for JAX/Flax decoders.

    import crma_jax
    model, params = crma_jax.load_pretrained("path/to/hf_dir_or.gguf", dtype="float32")
    logits = model.apply({"params": params}, input_ids)   # (B, T, vocab) float32
"""

from crma_jax.adapters import count_params, init_adapters, param_labels, quantize_params
from crma_jax.config import ModelConfig, RopeConfig
from crma_jax.crma import CRMAConfig, crma_diagnostics
from crma_jax.errors import CheckpointError
from crma_jax.lora import LoraConfig, merge_lora
from crma_jax.model import Decoder
from crma_jax.pretrained import load_pretrained
from crma_jax.quant import dequantize_nf4, quantize_int8, quantize_nf4
from crma_jax.sinkhorn import sinkhorn, sinkhorn_residual, spectral_norm

__all__ = [
    "CRMAConfig",
    "CheckpointError",
    "Decoder",
    "LoraConfig",
    "ModelConfig",
    "RopeConfig",
    "count_params",
    "crma_diagnostics",
    "dequantize_nf4",
    "init_adapters",
    "load_pretrained",
    "merge_lora",
    "param_labels",
    "quantize_int8",
    "quantize_nf4",
    "quantize_params",
    "sinkhorn",
    "sinkhorn_residual",
    "spectral_norm",
]
__version__ = "0.1.0"
