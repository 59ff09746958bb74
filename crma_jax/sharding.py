"""Logical axes for parameters, and the rules that map them onto a (data, fsdp, model) mesh.

Each parameter leaf gets logical axis names from its path (`layers/self_attn/q_proj/kernel` ->
("layers", "embed", "heads")). A rules table maps logical names to mesh axes. A mesh axis is
dropped for a dimension it does not divide, so odd shapes (9 heads, 49152 vocab) replicate
along it rather than fail.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "model",
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "layers": None,
    "norm": None,
    "rank": None,
}

_OUT_IS_HIDDEN = ("o_proj", "down_proj")  # these map (heads|mlp) -> embed
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


# Fields of the stored kernels of `crma_jax.quant`, by the kernel's (in, out) logical axes:
# Float16Bits.bits and Int8Tensor.codes have the kernel's shape; Int8Tensor.scale is per output
# column; NF4's packed codes and block absmax are the row-major flattened kernel, whose one axis
# carries both of the kernel's names (in, out): split over both kernels' mesh axes, so that FSDP
# divides o_proj and down_proj too, whose `in` axis is not on `fsdp`.
_STORED_FIELDS = {
    "bits": lambda i, o: (i, o),
    "codes": lambda i, o: (i, o),
    "scale": lambda i, o: (o,),
    "packed": lambda i, o: ((i, o),),
    "absmax": lambda i, o: ((i, o),),
}
Axis = str | tuple[str, ...] | None  # a logical axis name, or several for a flattened dimension


def _kernel_axes(module: str) -> tuple[str, str]:
    inner = "mlp" if module in _MLP_NAMES else "heads"
    return (inner, "embed") if module in _OUT_IS_HIDDEN else ("embed", inner)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` (batch first) kept split along its batch over the `data` and `fsdp` axes of the mesh
    the step is traced under (`jit_train_step` sets it); its other dimensions are left to the
    partitioner. Without such a mesh, `x` as it is.

    FSDP means gathering each layer's weights and keeping activations per device. Left alone,
    the TPU partitioner may instead keep a wide layer's weights split along `embed` and gather
    the activations of the whole global batch (B·T × 14336 per chip for Mistral's MLP), which
    grows with the number of chips."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return x
    free = PartitionSpec.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *(free,) * (x.ndim - 1)))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, model) of the given sizes over `devices` (default: all)."""
    need = int(np.prod(shape))
    devices = list(devices if devices is not None else jax.devices()[:need])
    if need != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {need} devices, have {len(jax.devices())}")
    return Mesh(np.asarray(devices).reshape(tuple(shape)), MESH_AXES)


def logical_axes(path: Sequence[str], ndim: int) -> tuple[Axis, ...]:
    """Logical axis names for the parameter at `path` (a tuple of dict keys) with `ndim` dims;
    a tuple of names for a dimension that flattens several (NF4's packed codes)."""
    leaf = path[-1]
    module = path[-2] if len(path) > 1 else ""
    stacked = "layers" in path
    if leaf == "embedding":
        axes: tuple[Axis, ...] = ("vocab", "embed")
    elif module == "lm_head":
        axes = ("embed", "vocab")
    elif leaf == "kernel":
        axes = _kernel_axes(module)
    elif module == "kernel" and len(path) > 2:  # a field of a stored (quantized) kernel
        k_in, k_out = _kernel_axes(path[-3])
        axes = _STORED_FIELDS.get(leaf, lambda i, o: ())(k_in, k_out)
    elif leaf == "scale":
        axes = ("norm",)
    else:
        axes = ()
    if stacked:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        return (None,) * ndim
    return axes


def partition_spec(
    path: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec for one parameter, keeping only mesh axes that divide its dimension."""
    spec = []
    for name, dim in zip(logical_axes(path, len(shape)), shape):
        axes: tuple[str, ...] = ()
        for one in (name if isinstance(name, tuple) else (name,)):
            target = rules.get(one) if one else None
            axes += (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in dict.fromkeys(axes) if mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        spec.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A pytree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs)."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        return NamedSharding(mesh, partition_spec(names, leaf.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)
