"""crma-jax: CRMA (Constrained Residual Mixing Adapter) for JAX/Flax decoders.

    import crma_jax
    model, params = crma_jax.load_pretrained("path/to/hf_dir_or.gguf", dtype="float32")
    logits = model.apply({"params": params}, input_ids)   # (B, T, vocab) float32
"""

from crma_jax.config import ModelConfig, RopeConfig
from crma_jax.errors import CheckpointError
from crma_jax.model import Decoder
from crma_jax.pretrained import load_pretrained

__all__ = ["CheckpointError", "Decoder", "ModelConfig", "RopeConfig", "load_pretrained"]
__version__ = "0.1.0"
