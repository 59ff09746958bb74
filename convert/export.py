"""`crma export RUN OUT`: a `crma train` / `crma cl` run's adapters, ready for PyTorch.

OUT/peft_<set>/              a PEFT LoRA adapter per LoRA set (`PeftModel.from_pretrained`)
OUT/crma_adapter.safetensors the CRMA substrate, for `crma_jax.convert.torch_crma.attach_crma`
OUT/merged_<set>/            with --merged: a full HF checkpoint with that set folded in

Every export is relative to the *original* base model. A PiSSA run trained on the residual
W − s·A0·B0, so each of its sets is exported as the equivalent rank-2r LoRA
s·[A | A0]·[B ; −B0] on W (`crma_jax.lora.pissa_as_lora`), and the merged checkpoint is
W + s·(A·B − A0·B0). A quantized run is exported against the full-precision W: its PyTorch
model differs from the trained one by the base's quantization error, as with any QLoRA export.

For a `crma cl` run, RUN is one sequence: RUN/<method>/seed<s>, with a set per domain. An O-LoRA
sequence also has the set `olora`: every domain's LoRA joined into one of rank domains·r, the
one model O-LoRA evaluates without a task id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crma_jax.config import ModelConfig
from crma_jax.adapter_files import Adapters, load_adapters
from crma_jax.atomic import atomic_dir
from crma_jax.convert.peft_export import export_crma, export_merged, export_peft
from crma_jax.convert.hub import base_model_name, resolve_model_path
from crma_jax.lora import LoraConfig, lora_rank, pissa_as_lora, with_rank
from crma_jax.pretrained import hf_config_of, load_pretrained, load_tokenizer


def plain_lora(adapters: Adapters, name: str) -> tuple[Any, LoraConfig]:
    """Set `name` as a LoRA on the original base weights (PiSSA sets converted to rank 2r; a set
    wider than the run's rank, such as O-LoRA's sum of every domain's LoRA, keeps its scale)."""
    lora = adapters.lora_sets[name]
    if adapters.lora_init is None:
        return lora, with_rank(adapters.lora_config, lora_rank(lora))
    return pissa_as_lora(lora, adapters.lora_init, adapters.lora_config)


def export_run(run: Path, out: Path, merged: list[str] | None = None) -> dict[str, Any]:
    """Export every LoRA set (and CRMA) of `run` into the new directory `out`; returns a listing."""
    adapters: Adapters = load_adapters(run)
    unknown = set(merged or []) - set(adapters.lora_sets)
    if unknown:
        raise ValueError(f"{run}: no LoRA set named {sorted(unknown)}; have {sorted(adapters.lora_sets)}")
    model_path = resolve_model_path(adapters.model)
    model_config = ModelConfig.from_hf(hf_config_of(model_path))
    written: dict[str, Any] = {}

    def write(d: Path) -> None:
        for name in adapters.lora_sets:
            lora, cfg = plain_lora(adapters, name)
            export_peft(lora, cfg, d / f"peft_{name}", base_model=base_model_name(adapters.model),
                        model=model_config)
            written[f"peft_{name}"] = str(out / f"peft_{name}")
        if adapters.crma_config is not None:
            export_crma(adapters.crma_params, adapters.crma_config, d / "crma_adapter.safetensors")
            written["crma"] = str(out / "crma_adapter.safetensors")
        if merged:
            _, params = load_pretrained(model_path)
            tokenizer = load_tokenizer(model_path)
            for name in merged:
                lora, cfg = plain_lora(adapters, name)
                export_merged(params, lora, cfg, hf_config_of(model_path), d / f"merged_{name}", tokenizer)
                written[f"merged_{name}"] = str(out / f"merged_{name}")

    atomic_dir(out, write)
    return written
