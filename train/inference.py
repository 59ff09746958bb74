"""Load a model for inference: a base model, or a run dir's base + one LoRA set + CRMA.

A run is reloaded exactly as it trained: the same storage and compute dtypes, the same
quantization, and for PiSSA the same residual base W − scale·A0·B0 (from the run's saved
initial factors, so no second SVD).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from crma_jax.adapters import quantize_params
from crma_jax.adapter_files import ADAPTERS, Adapters, load_adapters
from crma_jax.convert.hub import resolve_model_path
from crma_jax.lora import subtract_pissa
from crma_jax.pretrained import load_pretrained, load_tokenizer


def is_run(path: str | Path) -> bool:
    """A `crma train` run dir or one `crma cl` sequence (RUN/<method>/seed<s>)."""
    return (Path(path) / ADAPTERS).is_dir()


def pick_set(adapters: Adapters, run: str | Path, name: str | None) -> str:
    """The LoRA set `name`, or the run's last trained set; ValueError naming the choices."""
    names = list(adapters.lora_sets)
    chosen = name or names[-1]
    if chosen not in adapters.lora_sets:
        raise ValueError(f"{run}: no LoRA set {chosen!r}; have {names}")
    return chosen


def load_run_base(adapters: Adapters, dtype: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(model with the run's LoRA/CRMA configs, frozen params) exactly as the run trained on them."""
    base = adapters.base
    path = resolve_model_path(base.model)
    decoder, params = load_pretrained(path, dtype=dtype or base.dtype, compute_dtype=base.compute_dtype or None)
    if adapters.lora_init is not None:
        params = {**params, "layers": subtract_pissa(params["layers"], adapters.lora_init["layers"], adapters.lora_config)}
    if base.quant:
        params = quantize_params(params, base.quant)
    lora = dataclasses.replace(adapters.lora_config, init="default") if adapters.lora_config is not None else None
    return decoder.clone(lora_config=lora, crma_config=adapters.crma_config), params


def load_for_inference(model: str, lora: str | None = None, dtype: str | None = None) -> tuple[Any, dict[str, Any], Any]:
    """(model, variables, tokenizer). `model` is a model path (or `smollm2`) or a run dir with
    adapters/; `lora` names the LoRA set to use (default: the run's last trained set). `dtype`
    overrides the storage dtype (default: the run's, or float32 for a plain model)."""
    if not is_run(model):
        if lora:
            raise ValueError(f"{model}: --lora needs a run directory with {ADAPTERS}/")
        path = resolve_model_path(model)
        decoder, params = load_pretrained(path, dtype=dtype or "float32")
        return decoder, {"params": params}, load_tokenizer(path)
    adapters = load_adapters(Path(model))
    name = pick_set(adapters, model, lora)
    decoder, params = load_run_base(adapters, dtype)
    variables = {"params": params, "lora": adapters.lora_sets[name]}
    if adapters.crma_params is not None:
        variables["crma"] = adapters.crma_params
    return decoder, variables, load_tokenizer(resolve_model_path(adapters.model))
