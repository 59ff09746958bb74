"""`crma export RUN OUT`: a `crma train` / `crma cl` run's adapters, ready for PyTorch.

OUT/peft_<set>/              a PEFT LoRA adapter per LoRA set (`PeftModel.from_pretrained`)
OUT/crma_adapter.safetensors the CRMA substrate, for `crma_jax.convert.torch_crma.attach_crma`
OUT/merged_<set>/            with --merged: a full HF checkpoint with that set folded in

For a `crma cl` run, RUN is one sequence: RUN/<condition>/seed<s>.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crma_jax.convert.adapter_files import Adapters, load_adapters
from crma_jax.convert.convert import atomic_dir
from crma_jax.convert.peft_export import export_crma, export_merged, export_peft
from crma_jax.convert.smollm2 import resolve_model_path
from crma_jax.pretrained import hf_config_of, load_pretrained, load_tokenizer


def export_run(run: Path, out: Path, merged: list[str] | None = None) -> dict[str, Any]:
    """Export every LoRA set (and CRMA) of `run` into the new directory `out`; returns a listing."""
    adapters: Adapters = load_adapters(run)
    unknown = set(merged or []) - set(adapters.lora_sets)
    if unknown:
        raise ValueError(f"{run}: no LoRA set named {sorted(unknown)}; have {sorted(adapters.lora_sets)}")
    model_path = resolve_model_path(adapters.model)
    written: dict[str, Any] = {}

    def write(d: Path) -> None:
        for name, lora in adapters.lora_sets.items():
            export_peft(lora, adapters.lora, d / f"peft_{name}", base_model=adapters.model)
            written[f"peft_{name}"] = str(out / f"peft_{name}")
        if adapters.crma is not None:
            export_crma(adapters.crma_params, adapters.crma, d / "crma_adapter.safetensors")
            written["crma"] = str(out / "crma_adapter.safetensors")
        if merged:
            _, params = load_pretrained(model_path)
            tokenizer = load_tokenizer(model_path)
            for name in merged:
                export_merged(params, adapters.lora_sets[name], adapters.lora, hf_config_of(model_path),
                              d / f"merged_{name}", tokenizer)
                written[f"merged_{name}"] = str(out / f"merged_{name}")

    atomic_dir(out, write)
    return written
