"""The adapter files a run leaves behind, read by `crma export` and `crma generate`.

    RUN/adapters/meta.json              the base (model path, dtype, quantization), LoRA and CRMA
                                        configs, LoRA set names, and each set's data spec
    RUN/adapters/lora_<name>.safetensors  one LoRA set, keys "layers/self_attn/q_proj/a", ...
    RUN/adapters/crma.safetensors       the shared CRMA substrate (if any)
    RUN/adapters/lora_init.safetensors  PiSSA runs only: the initial factors A0, B0; the base the
                                        run trained on is W - scale·A0·B0 (then quantized)

safetensors holds only arrays (no pickle), so adapters are safe to share and to load.
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

from crma_jax.atomic import commit, recover
from crma_jax.crma import CRMAConfig
from crma_jax.errors import CheckpointError
from crma_jax.lora import LoraConfig
from crma_jax.safetensors_io import save_tensors

ADAPTERS = "adapters"


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """How a run loaded its frozen base: enough for `load_pretrained` to rebuild it exactly."""

    model: str
    dtype: str = "float32"
    compute_dtype: str = ""
    quant: str = ""


@dataclasses.dataclass
class Adapters:
    """What a run trained, and on what. `data` maps a LoRA set name to its `DataSpec` dict."""

    base: BaseSpec
    lora_config: LoraConfig | None
    crma_config: CRMAConfig | None
    lora_sets: dict[str, Any]
    crma_params: Any | None
    lora_init: Any | None = None
    data: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.base.model


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(jax.device_get(v), np.float32) for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, np.ndarray]) -> Any:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def recorded_path(path: str | None) -> str | None:
    """How a run records a model or data source: a path that exists resolved, so that it is still
    found from another directory (`crma eval`, `crma export` run elsewhere); a name that is no
    path (a hub id, a built-in domain) as it is. A path wins over a name, as in `load_records`."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def save_adapters(run: Path, adapters: Adapters) -> Path:
    """Write RUN/adapters atomically (`crma_jax.atomic.commit`): a kill at any point leaves the
    old adapters or the new ones, which `load_adapters` then finds."""
    base = dataclasses.replace(adapters.base, model=recorded_path(adapters.base.model))
    data = {name: {**spec, **{k: recorded_path(spec[k]) for k in ("source", "eval_source") if spec.get(k)}}
            for name, spec in adapters.data.items()}
    meta = {
        "model": base.model,
        "base": dataclasses.asdict(base),
        "lora_config": dataclasses.asdict(adapters.lora_config) if adapters.lora_config else None,
        "crma_config": dataclasses.asdict(adapters.crma_config) if adapters.crma_config else None,
        "lora_sets": list(adapters.lora_sets),
        "data": data,
    }

    def write(staging: Path) -> None:
        out = staging / ADAPTERS
        out.mkdir()
        for name, tree in adapters.lora_sets.items():
            save_tensors(_flat(tree), out / f"lora_{name}.safetensors")
        if adapters.crma_params is not None:
            save_tensors(_flat(adapters.crma_params), out / "crma.safetensors")
        if adapters.lora_init is not None:
            save_tensors(_flat(adapters.lora_init), out / "lora_init.safetensors")
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    commit(run, write)
    return Path(run) / ADAPTERS


def load_adapters(run: Path) -> Adapters:
    """Read RUN/adapters; a missing or corrupt file raises CheckpointError naming it."""
    recover(run)  # a save that a kill cut short: finish it (or drop it) first
    root = Path(run) / ADAPTERS
    meta_file = root / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: no adapters here ({e}); was the run finished?") from e
    # Runs written before the settings' keys were renamed say "lora" and "crma".
    lora_settings = meta.get("lora_config", meta.get("lora"))
    crma_settings = meta.get("crma_config", meta.get("crma"))
    lora_config = LoraConfig(**{**lora_settings, "targets": tuple(lora_settings["targets"])}) if lora_settings else None
    crma_config = CRMAConfig(**crma_settings) if crma_settings else None
    sets = {name: _read(root / f"lora_{name}.safetensors") for name in meta["lora_sets"]}
    crma_params = _read(root / "crma.safetensors") if crma_config else None
    lora_init = _read(root / "lora_init.safetensors") if lora_config and lora_config.init == "pissa" else None
    base = BaseSpec(**meta.get("base", {"model": meta["model"]}))
    return Adapters(base, lora_config, crma_config, sets, crma_params, lora_init, meta.get("data", {}))


def _read(path: Path) -> Any:
    try:
        return _unflat(load_file(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable adapter file: {e}") from e
