"""Load a model for inference: a base model, or a run dir's base + one LoRA set + CRMA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crma_jax.convert.adapter_files import ADAPTERS, load_adapters
from crma_jax.convert.smollm2 import resolve_model_path
from crma_jax.pretrained import load_pretrained, load_tokenizer


def load_for_inference(model: str, lora: str | None = None, dtype: str = "float32") -> tuple[Any, dict[str, Any], Any]:
    """(model, variables, tokenizer). `model` is a model path (or `smollm2`) or a run dir with
    adapters/; `lora` names the LoRA set to use (default: the run's only or last set)."""
    if not (Path(model) / ADAPTERS).is_dir():
        if lora:
            raise ValueError(f"{model}: --lora needs a run directory with {ADAPTERS}/")
        path = resolve_model_path(model)
        decoder, params = load_pretrained(path, dtype=dtype)
        return decoder, {"params": params}, load_tokenizer(path)
    adapters = load_adapters(Path(model))
    names = list(adapters.lora_sets)
    name = lora or names[-1]
    if name not in adapters.lora_sets:
        raise ValueError(f"{model}: no LoRA set {name!r}; have {names}")
    path = resolve_model_path(adapters.model)
    decoder, params = load_pretrained(path, dtype=dtype)
    decoder = decoder.clone(lora=adapters.lora, crma=adapters.crma)
    variables = {"params": params, "lora": adapters.lora_sets[name]}
    if adapters.crma_params is not None:
        variables["crma"] = adapters.crma_params
    return decoder, variables, load_tokenizer(path)
