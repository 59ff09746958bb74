"""crma-jax: CRMA (Constrained Residual Mixing Adapter) for JAX/Flax decoders.

    import crma_jax
    model, params = crma_jax.load_pretrained("path/to/hf_dir_or.gguf", dtype="float32")
    logits = model.apply({"params": params}, input_ids)   # (B, T, vocab) float32
"""

import importlib
import sys
import types
from typing import Any

# The exports load on first use (PEP 562), so that `import crma_jax.train.cli` for `crma -h`
# does not start jax.
_EXPORTS = {
    "CRMAConfig": "crma_jax.crma",
    "CheckpointError": "crma_jax.errors",
    "Decoder": "crma_jax.model",
    "LoraConfig": "crma_jax.lora",
    "ModelConfig": "crma_jax.config",
    "RopeConfig": "crma_jax.config",
    "count_params": "crma_jax.adapters",
    "crma_diagnostics": "crma_jax.crma",
    "dequantize_nf4": "crma_jax.quant",
    "init_adapters": "crma_jax.adapters",
    "load_pretrained": "crma_jax.pretrained",
    "merge_lora": "crma_jax.lora",
    "param_labels": "crma_jax.adapters",
    "quantize_int8": "crma_jax.quant",
    "quantize_nf4": "crma_jax.quant",
    "quantize_params": "crma_jax.adapters",
    "sinkhorn": "crma_jax.sinkhorn",
    "sinkhorn_residual": "crma_jax.sinkhorn",
    "spectral_norm": "crma_jax.sinkhorn",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule, as `crma_jax.model` was when the package imported them all
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'crma_jax' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """`crma_jax.sinkhorn` is the function, as the eager import made it: importing the submodule of
    the same name binds the module here, and the function it exports takes its place."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"
