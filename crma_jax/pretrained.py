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
from flax import traverse_util
from jax.sharding import Mesh

from crma_jax.adapters import init_adapters, kernel_quantizer, pissa_init, quantize_params
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.errors import CheckpointError
from crma_jax.hf_params import abstract_params, assemble_params
from crma_jax.lora import LoraConfig, layer_keys_seed, pissa_factors
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
    lora_config: LoraConfig | None = None,
    crma_config: CRMAConfig | None = None,
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
      lora_config, crma_config: adapter settings; the model then carries them and the adapters are initialized
        from `seed` (PiSSA from the full-precision weights, before any quantization).
      quant: None, "nf4" or "int8" storage for the frozen projection kernels.
      allow_pickle: permit `.bin` PyTorch weights through `torch.load(weights_only=True)`.

    Returns:
      Without adapters, `(model, params)`: call `model.apply({"params": params}, input_ids)`.
      With `lora_config` or `crma_config`, `(model, variables)` with the collections "params", "lora",
      "crma": call `model.apply(variables, input_ids)`.
    """
    store = resolve_dtype(dtype)
    compute = resolve_dtype(compute_dtype) if compute_dtype is not None else store
    if quant is not None:
        kernel_quantizer(quant)  # refuse an unknown kind before reading anything
    pissa = lora_config if lora_config is not None and lora_config.init == "pissa" else None
    pissa_key = jax.random.PRNGKey(seed + 1)
    streamed = quant is not None and not is_converted(path)
    if is_converted(path):
        model, params = _load_converted(Path(path), store, compute, mesh)
    else:
        source = open_source(path, allow_pickle=allow_pickle)
        model = Decoder(config_from_hf(source.hf_config(), _config_file(source)), dtype=compute)
        transforms = _quantize_transforms(model.clone(lora_config=lora_config), quant, pissa, pissa_key) if streamed else None
        model, params = load_source(source, store, compute, mesh, progress, transforms)
    pissa_factors = _split_pissa(params) if streamed and pissa else None
    if lora_config is None and crma_config is None:
        return model, quantize_params(params, quant) if quant and not streamed else params
    model = model.clone(lora_config=lora_config, crma_config=crma_config)
    adapters = init_adapters(model, params, jax.random.PRNGKey(seed))
    if pissa_factors is not None:
        adapters["lora"] = _with_factors(adapters["lora"], pissa_factors)
    elif pissa is not None:
        params, adapters["lora"] = pissa_init(params, adapters["lora"], lora_config, pissa_key)
    if quant and not streamed:
        params = quantize_params(params, quant)
    return model, {"params": params, **adapters}


def _quantize_transforms(model: Decoder, quant: str, pissa: LoraConfig | None, key: jax.Array) -> dict[Any, Any]:
    """`assemble_params` transforms that quantize every layer kernel as it is read; for a PiSSA
    LoRA target, the SVD runs first on the tensor read and the residual is quantized. Each gives
    exactly what `quantize_params` (after `pissa_init`) gives on the whole stacked leaf."""
    quantize = jax.jit(kernel_quantizer(quant))
    targets = set()
    if pissa is not None:
        lora = jax.eval_shape(lambda p: init_adapters(model, p, jax.random.PRNGKey(0)), abstract_params(model))["lora"]
        targets = {path[:-1] for path in traverse_util.flatten_dict(lora["layers"])}
    factors = jax.jit(lambda w, k: pissa_factors(w, pissa, k)) if pissa is not None else None
    transforms = {}
    for path in traverse_util.flatten_dict(abstract_params(model)):
        if path[0] != "layers" or path[-1] != "kernel":
            continue
        if path[1:-1] in targets:
            keys = jax.random.split(layer_keys_seed(key, path[1:-1]), model.config.num_layers)

            def svd_then_quantize(i: int, w: Any, keys: jax.Array = keys) -> dict[str, Any]:
                a, b, res = factors(w, keys[i])
                return {"kernel": quantize(res.astype(w.dtype)), PISSA_A: a, PISSA_B: b}

            transforms[path] = svd_then_quantize
        else:
            transforms[path] = lambda i, w: quantize(w)
    return transforms


PISSA_A, PISSA_B = "pissa_a", "pissa_b"


def _split_pissa(params: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Pull the streamed PiSSA factors out of `params` (in place): {layer path: (A, B)}."""
    flat = traverse_util.flatten_dict(params["layers"])
    found = {}
    for path in [p for p in flat if p[-1] == PISSA_A]:
        kernel = path[:-1]  # (..., "q_proj", "kernel")
        found[kernel[:-1]] = (flat.pop(path), flat.pop(kernel + (PISSA_B,)))
        flat[kernel] = flat.pop(kernel + ("kernel",))
    params["layers"] = traverse_util.unflatten_dict(flat)
    return found


def _with_factors(lora: dict[str, Any], factors: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(lora["layers"])
    for path, (a, b) in factors.items():
        flat[path + ("a",)] = a.astype(flat[path + ("a",)].dtype)
        flat[path + ("b",)] = b.astype(flat[path + ("b",)].dtype)
    return {**lora, "layers": traverse_util.unflatten_dict(flat)}


def load_source(
    source: Any, dtype: Any, compute_dtype: Any, mesh: Mesh | None = None, progress: Callable[..., Any] | None = None,
    transforms: dict[Any, Any] | None = None,
) -> tuple[Decoder, dict[str, Any]]:
    """(model, params) from an opened tensor source (see `open_source`); `transforms` as in
    `assemble_params`."""
    model = Decoder(config_from_hf(source.hf_config(), _config_file(source)), dtype=resolve_dtype(compute_dtype))
    shardings = param_shardings(abstract_params(model), mesh) if mesh is not None else None
    return model, assemble_params(model, source, resolve_dtype(dtype), shardings, progress, transforms)


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
