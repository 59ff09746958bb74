"""Adapters to PyTorch: PEFT LoRA dirs, `crma_adapter.safetensors`, merged HF checkpoints; and
PEFT LoRA dirs back into crma-jax.

PEFT keys are `base_model.model.<hf module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r): the transposes of our Flax-layout A (in, r) and B (r, out), one per layer.

A family with fused HF projections (Phi-3's qkv_proj, gate_up_proj) gets one LoRA per fused
module: A stacks the parts' A's along the rank, B places each part's B in its own rows and
rank columns (block diagonal), so the product is exactly each part's A·B in its rows. Its rank
(parts × r) goes into PEFT's `rank_pattern`, and B absorbs the change of scale alpha/r.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from crma_jax.config import ModelConfig
from crma_jax.atomic import atomic_dir
from crma_jax.crma import CRMAConfig, mixing_operator
from crma_jax.errors import CheckpointError
from crma_jax.hf_params import part_rows, to_hf_state_dict
from crma_jax.lora import ALL_TARGETS, LoraConfig, merge_lora
from crma_jax.safetensors_io import save_tensors

PEFT_PREFIX = "base_model.model.model.layers"
_MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def lora_to_peft_tensors(lora: Any) -> dict[str, np.ndarray]:
    """Our stacked LoRA tree -> PEFT's per-layer (r, in) / (out, r) tensors."""
    out = {}
    for path, value in traverse_util.flatten_dict(lora).items():
        _, module, proj, which = path
        arr = np.asarray(jax.device_get(value), np.float32)
        peft_name = "lora_A" if which == "a" else "lora_B"
        for i in range(arr.shape[0]):
            out[f"{PEFT_PREFIX}.{i}.{module}.{proj}.{peft_name}.weight"] = np.ascontiguousarray(arr[i].T)
    return out


def fuse_peft_lora(lora: Any, cfg: LoraConfig, model: ModelConfig) -> tuple[Any, dict[str, int]]:
    """Our LoRA tree with each fused family module's parts replaced by one LoRA on the fused
    module (see the module docstring); returns (tree, PEFT rank_pattern)."""
    flat = dict(traverse_util.flatten_dict(lora))
    pattern = {}
    for fused, parts in model.family.fused:
        module, name = fused.split(".")
        present = [p for p in parts if ("layers", module, p, "a") in flat]
        if not present:
            continue
        rank = sum(flat[("layers", module, p, "a")].shape[-1] for p in present)
        ratio = cfg.scale / dataclasses.replace(cfg, rank=rank).scale  # PEFT scales the fused LoRA by alpha / rank
        a_parts, b = [], np.zeros((model.num_layers, rank, sum(part_rows(model, p) for p in parts)), np.float32)
        row, col = 0, 0
        for p in parts:
            if p in present:
                a = np.asarray(jax.device_get(flat.pop(("layers", module, p, "a"))), np.float32)
                pb = np.asarray(jax.device_get(flat.pop(("layers", module, p, "b"))), np.float32)
                a_parts.append(a)
                b[:, col:col + a.shape[-1], row:row + pb.shape[-1]] = pb * ratio
                col += a.shape[-1]
            row += part_rows(model, p)
        flat[("layers", module, name, "a")] = np.concatenate(a_parts, axis=-1)
        flat[("layers", module, name, "b")] = b
        pattern[name] = rank
    return traverse_util.unflatten_dict(flat), pattern


def export_peft(lora: Any, cfg: LoraConfig, out: Path, base_model: str = "", model: ModelConfig | None = None) -> Path:
    """Write a PEFT LoRA adapter directory that `PeftModel.from_pretrained` loads.

    `model` (the base's config) is needed for a family with fused projections (Phi-3), whose
    LoRAs are fused to match the HF modules; `base_model` becomes `base_model_name_or_path`.
    """
    pattern: dict[str, int] = {}
    if model is not None and model.family.fused:
        lora, pattern = fuse_peft_lora(lora, cfg, model)
    targets = sorted({path[2] for path in traverse_util.flatten_dict(lora)})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "rank_pattern": pattern,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model,
    }

    def write(d: Path) -> None:
        save_tensors(lora_to_peft_tensors(lora), d / "adapter_model.safetensors", metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps(config, indent=2))

    return atomic_dir(out, write)


def import_peft(path: Path, num_layers: int) -> tuple[Any, LoraConfig]:
    """A PEFT LoRA adapter dir (made anywhere) -> (our stacked LoRA tree, LoraConfig)."""
    path = Path(path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
    except Exception as e:  # noqa: BLE001 - JSON, OS and safetensors errors alike
        raise CheckpointError(f"{path}: not a readable PEFT adapter: {e}") from e
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path / 'adapter_config.json'}: peft_type {config.get('peft_type')!r} is not LORA")
    targets = config["target_modules"]
    targets = sorted(targets) if isinstance(targets, list) else [t for t in ALL_TARGETS if t in targets]
    cfg = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(targets),
                     rslora=bool(config.get("use_rslora", False)))
    flat = {}
    for proj in cfg.targets:
        module = _MODULE_OF[proj]
        for which, peft_name in (("a", "lora_A"), ("b", "lora_B")):
            layers = []
            for i in range(num_layers):
                key = f"{PEFT_PREFIX}.{i}.{module}.{proj}.{peft_name}.weight"
                alt = key.replace(".weight", ".default.weight")
                if key not in tensors and alt not in tensors:
                    raise CheckpointError(f"{path / 'adapter_model.safetensors'}: missing tensor {key!r}")
                layers.append(tensors.get(key, tensors.get(alt)).T)
            flat[("layers", module, proj, which)] = np.stack(layers).astype(np.float32)
    return traverse_util.unflatten_dict(flat), cfg


def crma_tensors(crma_params: Any, cfg: CRMAConfig) -> dict[str, np.ndarray]:
    """Per-layer U (d, n), M (n, n) and alpha () as used in the forward pass, plus the raw params."""
    layer = jax.device_get(crma_params["layers"]["crma"])
    out = {}
    for i in range(layer["gate"].shape[0]):
        u, m, alpha, _ = mixing_operator(layer["read"][i], layer["log_mix"][i], layer["gate"][i], cfg.sinkhorn_iters)
        out[f"layers.{i}.U"] = np.asarray(u, np.float32)
        out[f"layers.{i}.M"] = np.asarray(m, np.float32)
        out[f"layers.{i}.alpha"] = np.asarray(alpha, np.float32).reshape(1)
        for name in ("read", "log_mix", "gate"):
            out[f"layers.{i}.{name}"] = np.asarray(layer[name][i], np.float32).reshape(np.shape(layer[name][i]) or (1,))
    return out


def export_crma(crma_params: Any, cfg: CRMAConfig, out_file: Path) -> Path:
    """Write `crma_adapter.safetensors` (tensors above, config in the metadata)."""
    meta = {"format": "crma-jax/crma", "config": json.dumps({"rank": cfg.rank, "sinkhorn_iters": cfg.sinkhorn_iters})}
    save_tensors(crma_tensors(crma_params, cfg), out_file, metadata=meta)
    return out_file


def export_merged(params: Any, lora: Any, cfg: LoraConfig, hf_config: dict[str, Any], out: Path,
                  tokenizer: Any = None) -> Path:
    """A full HF checkpoint (config.json + model.safetensors) with `lora` folded into W."""
    merged = merge_lora(params, lora, cfg)
    model = ModelConfig.from_hf(hf_config)
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config.setdefault("architectures", [model.family.architecture])

    def write(d: Path) -> None:
        save_tensors(to_hf_state_dict(merged, model), d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))

    return atomic_dir(out, write)

