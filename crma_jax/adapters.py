"""Adapters around a loaded base: init, quantize the frozen base, label and count parameters.

Variables are a dict of three collections, kept apart so that each has its own role:

    {"params": frozen base weights, "lora": one LoRA set, "crma": the shared CRMA substrate}

`param_labels` names every leaf for the optimizer (`lora_a`, `lora_b`, `crma_read_mix`, `crma_gate`,
`frozen`); training differentiates only `lora` and `crma`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from crma_jax.lora import LoraConfig, apply_pissa
from crma_jax.quant import STORED, NF4Tensor, as_bits, quantize_int8, quantize_nf4

TRAINABLE = ("lora", "crma")
QUANT_KINDS = ("nf4", "int8")


def init_adapters(model: Any, params: Any, rng: jax.Array) -> dict[str, Any]:
    """Fresh `lora` and `crma` collections for `model` over loaded `params` (no base re-init)."""
    wanted = tuple(c for c, cfg in (("lora", model.lora_config), ("crma", model.crma_config)) if cfg is not None)
    return _adapter_init(model, wanted, params, rng) if wanted else {}


@functools.partial(jax.jit, static_argnames=("model", "wanted"))
def _adapter_init(model: Any, wanted: tuple[str, ...], params: Any, rng: jax.Array) -> dict[str, Any]:
    # One compiled program per model, however many tasks and seeds draw fresh adapters.
    _, state = model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), rngs={"params": rng}, mutable=list(wanted))
    return {c: state[c] for c in wanted}


def pissa_init(params: Any, lora: Any, cfg: LoraConfig, rng: jax.Array) -> tuple[Any, Any]:
    """PiSSA factors into `lora`, residual kernels into `params` (see `lora.apply_pissa`)."""
    layers, lora_layers = apply_pissa(params["layers"], lora["layers"], cfg, rng)
    return {**params, "layers": layers}, {**lora, "layers": lora_layers}


def quantize_params(params: Any, kind: str, double_quant: bool = True) -> Any:
    """Quantize every projection kernel under `layers/` ("nf4" or "int8"); embeddings, the LM
    head and norms stay as they are. Stacked (L, in, out) kernels are quantized layer by layer,
    so every leaf keeps the leading layer axis that `nn.scan` slices."""
    one = jax.jit(jax.vmap(kernel_quantizer(kind, double_quant)))
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if path[0] == "layers" and path[-1] == "kernel":
            flat[path] = one(leaf)
    return traverse_util.unflatten_dict(flat)


def store_as_bits(params: Any) -> Any:
    """Every bf16/f16 projection kernel under `layers/` as `Float16Bits` (lossless; see there:
    on XLA:CPU it keeps the layer scan from converting whole stacked kernels to float32).
    Other leaves, and kernels already quantized or in float32, stay as they are."""
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if path[0] == "layers" and path[-1] == "kernel" and not isinstance(leaf, STORED) and leaf.dtype.itemsize == 2:
            flat[path] = jax.eval_shape(as_bits, leaf) if isinstance(leaf, jax.ShapeDtypeStruct) else _bits(leaf)
    return traverse_util.unflatten_dict(flat)


_bits = jax.jit(as_bits, donate_argnums=0)  # the kernel's buffer becomes its bits


def kernel_quantizer(kind: str, double_quant: bool = True) -> Any:
    """The quantizer of one (in, out) kernel for `kind` ("nf4": 64-blocks; "int8": per column)."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"quant must be one of {QUANT_KINDS} or None, got {kind!r}")
    if kind == "nf4":
        return functools.partial(quantize_nf4, block_size=64, double_quant=double_quant)
    return quantize_int8


def _label(collection: str, name: str) -> str:
    if collection == "lora":
        return "lora_a" if name == "a" else "lora_b"
    if collection == "crma":
        return "crma_gate" if name == "gate" else "crma_read_mix"
    return "frozen"


def param_labels(variables: dict[str, Any]) -> dict[str, Any]:
    """The same tree as `variables` with a label string at every leaf.

    Quantized base weights get one label for the whole tensor (all its arrays are frozen).
    """

    def label_tree(collection: str, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _label(collection, _key(path[-1])), tree, is_leaf=lambda x: isinstance(x, STORED)
        )

    return {c: label_tree(c, t) for c, t in variables.items()}


def count_params(variables: dict[str, Any]) -> dict[str, int]:
    """{"trainable": n, "frozen": n}: parameter counts, a quantized weight counted by its elements."""
    counts = {"trainable": 0, "frozen": 0}
    for collection, tree in variables.items():
        kind = "trainable" if collection in TRAINABLE else "frozen"
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, STORED)):
            counts[kind] += _numel(leaf)
    return counts


def _numel(leaf: Any) -> int:
    if isinstance(leaf, NF4Tensor):
        return leaf.packed.shape[0] * math.prod(leaf.shape) if leaf.packed.ndim == 2 else math.prod(leaf.shape)
    return math.prod(leaf.shape)


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))
