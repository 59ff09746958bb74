"""HF state-dict names <-> the decoder's Flax parameter tree, and assembly from a tensor source.

The model's own abstract init (`jax.eval_shape`) is the single source of truth for which
parameters exist and their shapes; this module only knows how one Flax leaf is named in HF and
whether it is transposed ((out, in) in PyTorch vs (in, out) in Flax).

A *tensor source* is anything with `path`, `keys()`, `get(name) -> np.ndarray` (HF layout) and
`hf_config()`: `SafetensorsSource` and `GGUFSource` both are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding

from crma_jax.config import ModelConfig
from crma_jax.errors import CheckpointError
from crma_jax.sharding import partition_spec


class TensorSource(Protocol):
    path: Any

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> np.ndarray: ...

    def hf_config(self) -> dict[str, Any]: ...


def hf_names(path: Sequence[str], num_layers: int) -> tuple[list[str], bool]:
    """HF tensor names for a Flax leaf path (one per layer for stacked leaves) and whether to transpose."""
    *modules, leaf = path
    transpose = leaf == "kernel"
    kind = "bias" if leaf == "bias" else "weight"
    if modules == ["embed_tokens"]:
        return ["model.embed_tokens.weight"], False
    if modules == ["lm_head"]:
        return ["lm_head.weight"], True
    if modules == ["norm"]:
        return ["model.norm.weight"], False
    if modules and modules[0] == "layers":
        suffix = ".".join(modules[1:])
        return [f"model.layers.{i}.{suffix}.{kind}" for i in range(num_layers)], transpose
    raise KeyError(f"no HF name for parameter {'/'.join(path)}")


def part_rows(config: ModelConfig, proj: str) -> int:
    """Output rows of projection `proj` (its share of a fused HF projection)."""
    rows = {"q_proj": config.num_heads * config.head_dim, "k_proj": config.num_kv_heads * config.head_dim,
            "v_proj": config.num_kv_heads * config.head_dim, "gate_proj": config.intermediate_size,
            "up_proj": config.intermediate_size}
    return rows[proj]


def fused_parts(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """{our per-projection HF name: (fused HF name, first row, end row)} for every layer, from the
    family's `fused` table (Phi-3: qkv_proj = q | k | v, gate_up_proj = gate | up)."""
    out = {}
    for fused, parts in config.family.fused:
        module = fused.rsplit(".", 1)[0]
        for i in range(config.num_layers):
            start = 0
            for proj in parts:
                stop = start + part_rows(config, proj)
                for kind in ("weight", "bias"):
                    out[f"model.layers.{i}.{module}.{proj}.{kind}"] = (f"model.layers.{i}.{fused}.{kind}", start, stop)
                start = stop
    return out


class SplitFusedSource:
    """A tensor source whose fused projections (HF layout, parts stacked along rows) appear as
    their parts, so the decoder's tree stays one leaf per projection. The last fused tensor read
    is kept, so reading q, k and v reads qkv once."""

    def __init__(self, source: TensorSource, config: ModelConfig) -> None:
        self._source, self.path = source, source.path
        have = set(source.keys())
        self._parts = {k: v for k, v in fused_parts(config).items() if v[0] in have}
        fused = {v[0] for v in self._parts.values()}
        self._keys = [k for k in source.keys() if k not in fused] + list(self._parts)
        self._last: tuple[str, np.ndarray] | None = None

    def keys(self) -> list[str]:
        return list(self._keys)

    def hf_config(self) -> dict[str, Any]:
        return self._source.hf_config()

    def file_of(self, name: str) -> Any:
        return _file(self._source, self._parts[name][0] if name in self._parts else name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._parts:
            return self._source.get(name)
        fused, start, stop = self._parts[name]
        if self._last is None or self._last[0] != fused:
            self._last = (fused, self._source.get(fused))
        return self._last[1][start:stop]


def fuse_state_dict(state: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `SplitFusedSource`: parts concatenated back into the family's fused tensors."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name, (fused, start, _) in fused_parts(config).items():
        if name in state:
            groups.setdefault(fused, []).append((start, name))
    out = dict(state)
    for fused, parts in groups.items():
        out[fused] = np.concatenate([out.pop(name) for _, name in sorted(parts)], axis=0)
    return out


def abstract_params(model: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of the model's `params` collection, without allocating anything."""
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return shapes["params"]


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


LayerTransform = Callable[[int, np.ndarray], Any]


def assemble_params(
    model: Any,
    source: TensorSource,
    dtype: Any = jnp.float32,
    shardings: Any = None,
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
    transforms: dict[tuple[str, ...], LayerTransform] | None = None,
) -> dict[str, Any]:
    """Read every parameter of `model` from `source`, cast to `dtype`, and place it on a device.

    One Flax leaf at a time: its HF tensors are copied into one host buffer (stacked over layers),
    that buffer goes to its `NamedSharding` (or the default device), then is freed. So the host
    never holds more than one leaf beyond what is already placed. Raises `CheckpointError` naming
    the file and key for a missing tensor or a shape mismatch.

    `transforms` maps a layer-stacked leaf's path (e.g. ("layers", "mlp", "up_proj", "kernel"))
    to `fn(layer, w)`, called on each layer's tensor as soon as it is read (w: C-contiguous, in
    `dtype`, Flax layout); its outputs (any pytree of arrays) are stacked over layers and placed
    instead of the leaf. So a quantized base is built one layer at a time and its full-precision
    leaf never exists. On a mesh, each output field is sharded by its own logical axes
    (`crma_jax.sharding`), as the dense kernel would be.
    """
    config: ModelConfig = model.config
    if config.family.fused:
        source = SplitFusedSource(source, config)
    flat = traverse_util.flatten_dict(abstract_params(model))
    transforms = dict(transforms or {})
    for path in transforms:
        if path not in flat or path[0] != "layers":
            raise ValueError(f"a transform needs a layer-stacked leaf, not {'/'.join(path)}")
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    available = set(source.keys())
    target = _np_dtype(dtype)
    items: Iterator[Any] = iter(flat.items())
    if progress is not None:
        items = progress(items, len(flat))
    out = {}
    for path, spec in items:
        names, transpose = hf_names(path, config.num_layers)
        transform = transforms.get(path)
        buf = None
        stacked = len(names) > 1 or path[0] == "layers"
        absent = next((n for n in names if n not in available), None)
        if absent is not None:  # e.g. a config with more layers than the file: named before any allocation
            _read(source, absent, available, transpose, ())
        for i, name in enumerate(names):
            tensor = _read(source, name, available, transpose, spec.shape[1:] if stacked else spec.shape)
            if transform:
                buf = _put_layer(buf, i, len(names), transform(i, np.ascontiguousarray(tensor, target)))
                continue
            if buf is None:  # only once the file's first tensor has the config's shape: a wrong config
                buf = np.empty(spec.shape, target)  # is named by key, not met with an allocation of its size
            if stacked:
                buf[i] = tensor
            else:
                buf[...] = tensor
        sharding = flat_shardings.get(path)
        if transform:
            out[path] = jax.tree_util.tree_map_with_path(
                lambda sub, b, sharding=sharding, path=path: jax.device_put(b, _field_sharding(sharding, path, sub, b.shape)),
                buf)
        else:
            out[path] = jax.device_put(buf, sharding)  # measured faster and leaner than jnp.asarray
        del buf
    return traverse_util.unflatten_dict(out)


def _read(source: TensorSource, name: str, available: set[str], transpose: bool, want: tuple[int, ...]) -> Any:
    """One HF tensor in Flax layout, checked against the shape the model expects."""
    if name not in available:
        raise CheckpointError(f"{_file(source, name)}: missing tensor {name!r}")
    tensor = source.get(name)
    tensor = tensor.T if transpose else tensor
    if tuple(tensor.shape) != tuple(want):
        layout = " in Flax (in, out) layout" if transpose else ""
        raise CheckpointError(
            f"{_file(source, name)}: tensor {name!r} has shape {tuple(tensor.shape)}{layout}, expected {tuple(want)}"
        )
    return tensor


def _field_sharding(sharding: Any, path: tuple[str, ...], sub: tuple[Any, ...], shape: tuple[int, ...]) -> Any:
    """Where a field of a transformed leaf goes: on a mesh, its own logical axes (e.g. NF4's
    packed codes sharded like the kernel's rows); a single device otherwise."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in sub)
    if names and names[0] == "kernel":  # the transform returned {"kernel": ..., ...}
        names = names[1:]
    return NamedSharding(sharding.mesh, partition_spec(path + names, shape, sharding.mesh))


def _put_layer(buf: Any, i: int, layers: int, result: Any) -> Any:
    """Write layer `i`'s transform result into the stacked host buffers (made at layer 0), so
    the layers are never held twice."""
    if buf is None:
        buf = jax.tree.map(lambda x: np.empty((layers, *np.shape(x)), np.asarray(x).dtype), result)

    def put(b: np.ndarray, x: Any) -> np.ndarray:
        b[i] = np.asarray(x)
        return b

    return jax.tree.map(put, buf, result)


def _file(source: TensorSource, name: str) -> Any:
    file_of = getattr(source, "file_of", None)
    return file_of(name) if file_of else source.path


def to_hf_state_dict(params: dict[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `assemble_params`: HF-named float32 numpy tensors in PyTorch layout, with
    the family's fused projections fused.

    Quantized kernels are not accepted: merge into full-precision weights.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        names, transpose = hf_names(path, config.num_layers)
        arr = np.asarray(jax.device_get(value), np.float32)
        stacked = path[0] == "layers"
        for i, name in enumerate(names):
            t = arr[i] if stacked else arr
            out[name] = np.ascontiguousarray(t.T if transpose else t)
    return fuse_state_dict(out, config)
