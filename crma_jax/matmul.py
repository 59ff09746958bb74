"""The projections' matmul, y = x·W (+ scale·(x_lora·A)·B), with a hand-written backward.

Two reasons not to leave it to autodiff:

- **Memory.** W may be stored as NF4/int8 and dequantized inside the matmul. Autodiff keeps the
  *dequantized* W as a residual for dx = dy·Wᵀ, so inside the layer scan every layer's
  full-precision kernel was saved for the backward pass and QLoRA saved no step memory. Here the
  residual is W as stored (packed codes), and the backward dequantizes again.
- **Speed.** The rank-r weight gradients dA = xᵀ·(dy·Bᵀ·s) and dB = s·(x·A)ᵀ·dy are computed on
  2-D (tokens, features) views; autodiff of the 3-D einsums made XLA:CPU materialise transposed
  copies of the activations to feed them.

The frozen kernel gets a gradient only if it is being differentiated (`symbolic_zeros`): a
training step, which differentiates the adapters alone, never computes dW.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from crma_jax.quant import STORED, dequantize


def _value(p: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.value, p, is_leaf=lambda leaf: hasattr(leaf, "perturbed"))


def _perturbed(p: Any) -> bool:
    flags = jax.tree.leaves(jax.tree.map(lambda leaf: leaf.perturbed, p, is_leaf=lambda leaf: hasattr(leaf, "perturbed")))
    return any(flags)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _kernel_grad(kernel: Any, x: jax.Array, dy: jax.Array, wanted: bool) -> Any:
    # A quantized kernel has no meaningful gradient (its leaves are codes and scales).
    if not wanted or isinstance(kernel, STORED):
        return None
    return (_flat(x).T @ _flat(dy)).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def frozen_linear(x: jax.Array, kernel: Any, dtype: Any) -> jax.Array:
    """x (..., in) · W (in, out) in `dtype`; W is an array or an NF4/int8 tensor."""
    return jnp.dot(x.astype(dtype), dequantize(kernel, dtype))


def _frozen_fwd(x: Any, kernel: Any, dtype: Any) -> tuple[jax.Array, Any]:
    xv, kv = _value(x), _value(kernel)
    return frozen_linear(xv, kv, dtype), (xv, kv, _perturbed(kernel))


def _frozen_bwd(dtype: Any, res: Any, dy: Any) -> tuple[Any, Any]:
    x, kernel, kernel_wanted = res
    if isinstance(dy, SymbolicZero):
        return None, None
    w = dequantize(kernel, dtype)
    dx = jnp.dot(dy.astype(dtype), w.T).astype(x.dtype)
    return dx, _kernel_grad(kernel, x.astype(dtype), dy.astype(dtype), kernel_wanted)


frozen_linear.defvjp(_frozen_fwd, _frozen_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def lora_linear(x: jax.Array, x_lora: jax.Array, kernel: Any, a: jax.Array, b: jax.Array, scale: float,
                dtype: Any) -> jax.Array:
    """x·W + scale·(x_lora·A)·B in `dtype`.

    x, x_lora: (..., in) (x_lora is x after LoRA dropout, or x itself); W (in, out) an array or
    an NF4/int8 tensor; A (in, r), B (r, out) float32. Returns (..., out) in `dtype`. Scaling
    the small (r, out) B, not the (..., out) product, saves a full pass over the output.
    """
    y = jnp.dot(x.astype(dtype), dequantize(kernel, dtype))
    low = jnp.dot(x_lora.astype(dtype), a.astype(dtype))
    return y + jnp.dot(low, (b * scale).astype(dtype))


def _lora_fwd(x: Any, x_lora: Any, kernel: Any, a: Any, b: Any, scale: float, dtype: Any) -> tuple[jax.Array, Any]:
    xv, xl, kv, av, bv = (_value(p) for p in (x, x_lora, kernel, a, b))
    low = jnp.dot(xl.astype(dtype), av.astype(dtype))
    y = jnp.dot(xv.astype(dtype), dequantize(kv, dtype)) + jnp.dot(low, (bv * scale).astype(dtype))
    return y, (xv, xl, kv, av, bv, low, _perturbed(kernel))


def _lora_bwd(scale: float, dtype: Any, res: Any, dy: Any) -> tuple[Any, ...]:
    x, x_lora, kernel, a, b, low, kernel_wanted = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None, None
    g = _flat(dy.astype(dtype))
    dlow = jnp.dot(g, (b * scale).astype(dtype).T)  # (N, r)
    dx = jnp.dot(g, dequantize(kernel, dtype).T).reshape(x.shape).astype(x.dtype)
    dx_lora = jnp.dot(dlow, a.astype(dtype).T).reshape(x_lora.shape).astype(x_lora.dtype)
    da = jnp.dot(_flat(x_lora.astype(dtype)).T, dlow).astype(a.dtype)
    db = (scale * jnp.dot(_flat(low).T, g).astype(jnp.float32)).astype(b.dtype)
    return dx, dx_lora, _kernel_grad(kernel, x.astype(dtype), dy.astype(dtype), kernel_wanted), da, db


lora_linear.defvjp(_lora_fwd, _lora_bwd, symbolic_zeros=True)
