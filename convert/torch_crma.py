"""CRMA for transformers models in PyTorch: `attach_crma(hf_model, "crma_adapter.safetensors")`.

The file holds, per layer, the U (d, n), M (n, n) and alpha that crma-jax computed (QR and
Sinkhorn included), so PyTorch applies exactly h' = h + alpha · ((h U)(Mᵀ − I)) Uᵀ after each
decoder layer, with no second implementation of QR sign conventions or Sinkhorn to drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file


class CRMAHook(torch.nn.Module):
    """The CRMA map of one layer, as a module holding U, K = alpha (Mᵀ − I) as buffers (float32)."""

    def __init__(self, u: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor) -> None:
        super().__init__()
        eye = torch.eye(m.shape[0], dtype=torch.float32)
        self.register_buffer("u", u.float())
        self.register_buffer("k", alpha.float().reshape(()) * (m.float().T - eye))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.u.to(h.dtype)
        return h + ((h @ u) @ self.k.to(h.dtype)) @ u.T


def _decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__}: no decoder `layers` to attach CRMA to")
    return inner.layers


def attach_crma(hf_model: Any, path: str | Path) -> list[Any]:
    """Add CRMA after every decoder layer of `hf_model` (a transformers or PEFT model).

    Returns the hook handles; `handle.remove()` detaches. The hooks are also kept as
    `hf_model.crma_hooks` (a ModuleList) so `.to(device)` moves them.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "crma-jax/crma":
        raise ValueError(f"{path}: not a crma-jax CRMA adapter (metadata format {meta.get('format')!r})")
    tensors = load_file(str(path))
    layers = _decoder_layers(hf_model)
    n_file = len({k.split(".")[1] for k in tensors})
    if n_file != len(layers):
        raise ValueError(f"{path}: {n_file} CRMA layers for a model with {len(layers)} decoder layers")
    hooks = torch.nn.ModuleList(
        CRMAHook(tensors[f"layers.{i}.U"], tensors[f"layers.{i}.M"], tensors[f"layers.{i}.alpha"]) for i in range(n_file)
    )
    hf_model.crma_hooks = hooks

    def make(hook: CRMAHook) -> Any:
        def after_layer(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):  # older transformers return (hidden, ...)
                return (hook(output[0]),) + tuple(output[1:])
            return hook(output)

        return after_layer

    return [layer.register_forward_hook(make(hook)) for layer, hook in zip(layers, hooks)]
