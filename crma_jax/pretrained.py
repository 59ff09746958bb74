"""`load_pretrained`: an HF directory, a `.gguf` file or a `crma convert` output -> (model, params).

A `crma convert` output is a directory with `crma_model.json` (format tag, dtype, the HF config)
and `params/`, an Orbax checkpoint of the parameter tree. Orbax restores straight onto the
requested shardings, so a converted model reloads fast on any mesh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from crma_jax.adapters import init_adapters, pissa_init, quantize_params
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.errors import CheckpointError
from crma_jax.hf_params import abstract_params, assemble_params
from crma_jax.lora import LoraConfig
from crma_jax.model import Decoder
from crma_jax.safetensors_io import SafetensorsSource
from crma_jax.sharding import param_shardings

CONVERTED_META = "crma_model.json"
CONVERTED_FORMAT = "crma-jax/params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' (or the jnp dtype) -> jnp dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return jnp.dtype(dtype).type


def open_source(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """A tensor source for an HF directory or a `.gguf` file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".gguf":
        from crma_jax.gguf_checkpoint import GGUFSource

        return GGUFSource(p)
    return SafetensorsSource(p, allow_pickle=allow_pickle)


def config_from_hf(hf: dict[str, Any], where: Any) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / CONVERTED_META).is_file()


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = "float32",
    compute_dtype: Any = None,
    mesh: Mesh | None = None,
    lora: LoraConfig | None = None,
    crma: CRMAConfig | None = None,
    quant: str | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    progress: Callable[..., Any] | None = None,
) -> tuple[Decoder, dict[str, Any]]:
    """Load a pretrained decoder, optionally with fresh adapters and a quantized base.

    Args:
      path: an HF model directory, a `.gguf` file, or a `crma convert` output directory.
      dtype: storage dtype of the parameters, "float32" or "bfloat16".
      compute_dtype: activation dtype (default: `dtype`). Logits are always float32.
      mesh: place each parameter on its `NamedSharding` over this (data, fsdp, model) mesh.
      lora, crma: adapter configs; the model then carries them and the adapters are initialized
        from `seed` (PiSSA from the full-precision weights, before any quantization).
      quant: None, "nf4" or "int8" storage for the frozen projection kernels.
      allow_pickle: permit `.bin` PyTorch weights through `torch.load(weights_only=True)`.

    Returns:
      Without adapters, `(model, params)`: call `model.apply({"params": params}, input_ids)`.
      With `lora` or `crma`, `(model, variables)` with the collections "params", "lora",
      "crma": call `model.apply(variables, input_ids)`.
    """
    store = resolve_dtype(dtype)
    compute = resolve_dtype(compute_dtype) if compute_dtype is not None else store
    if is_converted(path):
        model, params = _load_converted(Path(path), store, compute, mesh)
    else:
        model, params = load_source(open_source(path, allow_pickle=allow_pickle), store, compute, mesh, progress)
    if lora is None and crma is None:
        return model, quantize_params(params, quant) if quant else params
    model = model.clone(lora=lora, crma=crma)
    adapters = init_adapters(model, params, jax.random.PRNGKey(seed))
    if lora is not None and lora.init == "pissa":
        params, adapters["lora"] = pissa_init(params, adapters["lora"], lora, jax.random.PRNGKey(seed + 1))
    if quant:
        params = quantize_params(params, quant)
    return model, {"params": params, **adapters}


def load_source(
    source: Any, dtype: Any, compute_dtype: Any, mesh: Mesh | None = None, progress: Callable[..., Any] | None = None
) -> tuple[Decoder, dict[str, Any]]:
    """(model, params) from an opened tensor source (see `open_source`)."""
    model = Decoder(config_from_hf(source.hf_config(), _config_file(source)), dtype=resolve_dtype(compute_dtype))
    shardings = param_shardings(abstract_params(model), mesh) if mesh is not None else None
    return model, assemble_params(model, source, resolve_dtype(dtype), shardings, progress)


def read_converted_meta(path: Path) -> dict[str, Any]:
    meta_file = path / CONVERTED_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable: {e}") from e
    if meta.get("format") != CONVERTED_FORMAT:
        raise CheckpointError(f"{meta_file}: not a crma-jax params checkpoint (format {meta.get('format')!r})")
    return meta


def _load_converted(path: Path, store: Any, compute: Any, mesh: Mesh | None) -> tuple[Decoder, dict[str, Any]]:
    import orbax.checkpoint as ocp

    meta = read_converted_meta(path)
    model = Decoder(config_from_hf(meta["hf_config"], path / CONVERTED_META), dtype=compute)
    abstract = abstract_params(model)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(leaf: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, store, sharding=sharding or single)

    wanted = jax.tree.map(target, abstract, shardings) if shardings is not None else jax.tree.map(target, abstract)
    params_dir = (path / "params").absolute()
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, wanted)
    except Exception as e:  # noqa: BLE001 - orbax raises assorted errors for corrupt/missing data
        raise CheckpointError(f"{params_dir}: cannot restore params: {e}") from e
    return model, params


def save_converted(out: Path, hf_config: dict[str, Any], params: Any, dtype: str) -> None:
    """Write `crma_model.json` and the Orbax `params/` into the directory `out`."""
    import orbax.checkpoint as ocp

    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": CONVERTED_FORMAT, "version": 1, "dtype": dtype, "hf_config": hf_config}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((out / "params").absolute(), params)
    ckptr.wait_until_finished()
    # The metadata goes last: its presence marks a complete checkpoint.
    (out / CONVERTED_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _config_file(source: Any) -> Any:
    p = Path(source.path)
    return p / "config.json" if p.is_dir() else p


def hf_config_of(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config dict of an HF directory, a `.gguf` file or a `crma convert` output."""
    if is_converted(path):
        return dict(read_converted_meta(Path(path))["hf_config"])
    return open_source(path).hf_config()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The HF tokenizer that belongs to `path` (HF dir, `.gguf`, or `crma convert` output)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from crma_jax.gguf_checkpoint import load_gguf_tokenizer

        return load_gguf_tokenizer(p)
    tok_dir = p / "tokenizer" if is_converted(p) else p
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise CheckpointError(f"{tok_dir}: no usable tokenizer: {e}") from e
