"""Quantized storage for frozen base weights (QLoRA-style NF4, per-channel int8) as pytrees.

`NF4Tensor` and `Int8Tensor` are `flax.struct` dataclasses: their arrays are pytree leaves and
their shape/dtype/block size are static metadata, so they sit in a `params` tree, pass through
`jax.jit`, and are dequantized inside the matmul with `dequantize(x, compute_dtype)`.

NF4 is byte-compatible with bitsandbytes' `quantize_4bit(..., quant_type="nf4")` (CPU reference):
the same 16-value table, blocks along the row-major flattened weight, float32 absmax per block,
nearest-code rounding with ties to the lower code, and two codes per byte, first in the high
nibble. Differences: a trailing all-zero partial block stores absmax 0 (bitsandbytes stores
1e-38); double quantization uses linear int8, not bitsandbytes' dynamic 8-bit map; and XLA on CPU
flushes subnormal inputs to zero, where torch keeps them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import ArrayLike, DTypeLike

__all__ = [
    "NF4_TABLE",
    "NF4Tensor",
    "QuantizedAbsmax",
    "Int8Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "block_absmax",
    "quantize_int8",
    "dequantize_int8",
    "Float16Bits",
    "as_bits",
    "STORED",
    "dequantize",
    "nbytes",
]

# bitsandbytes' NormalFloat4 code book: quantiles of N(0, 1) normalised to [-1, 1], with an exact
# zero (index 7). The float32 values below are exactly those bitsandbytes uses.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision thresholds between neighbouring codes, rounded to float32 exactly as bitsandbytes does
# ((a + b) / 2 in float32), so that rounding agrees bit for bit.
_NF4_MIDPOINTS = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)).astype(np.float32)

_DQ_BLOCK = 256  # second-level block size for double quantization, as in bitsandbytes


@struct.dataclass
class QuantizedAbsmax:
    """Double-quantized NF4 block scales: absmax ~= max(0, codes * scale[block] + offset).

    codes: int8 (n_blocks,) in [-127, 127]; scale: float32 (ceil(n_blocks / block_size),);
    offset: float32 () the mean of the original absmax.
    """

    codes: jax.Array
    scale: jax.Array
    offset: jax.Array
    block_size: int = struct.field(pytree_node=False, default=_DQ_BLOCK)


@struct.dataclass
class NF4Tensor:
    """A weight stored as 4-bit NormalFloat codes.

    packed: uint8 (ceil(N / 2),), codes of the row-major flattened weight, code 2i in the high
      nibble of byte i and code 2i+1 in the low nibble (a final odd slot holds code 7 = 0.0).
    absmax: float32 (ceil(N / block_size),) per-block scale, or a `QuantizedAbsmax`.
    shape: the original shape (N = prod(shape)); dtype: the original dtype's name.
    """

    packed: jax.Array
    absmax: jax.Array | QuantizedAbsmax
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False, default=64)
    dtype: str = struct.field(pytree_node=False, default="float32")


@struct.dataclass
class Int8Tensor:
    """A kernel (..., in, out) stored as int8 codes with one float32 scale per output column.

    codes: int8 (..., in, out) in [-127, 127]; scale: float32 (..., out); w ~= codes * scale.
    dtype: the original dtype's name.
    """

    codes: jax.Array
    scale: jax.Array
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


def _safe_reciprocal(x: jax.Array, numerator: float = 1.0) -> jax.Array:
    # Zero scales mean all-zero blocks: map them to 0 (code 0 / NF4 code 7), never to inf * 0.
    # bitsandbytes clamps to 1e-38 instead, which is subnormal in float32 and would be flushed to
    # zero by XLA's CPU backend; both give the same codes for a zero block.
    positive = x > 0
    return jnp.where(positive, numerator / jnp.where(positive, x, 1.0), 0.0)


def _quantize_absmax(absmax: jax.Array, block_size: int = _DQ_BLOCK) -> QuantizedAbsmax:
    """Linear symmetric int8 quantization of (absmax - mean), blocks of `block_size`.

    Error per entry <= scale / 2 = max|absmax - mean| over its block / 254 (plus float32 rounding).
    """
    offset = jnp.mean(absmax)
    centred = absmax - offset
    n = centred.shape[0]
    n_blocks = -(-n // block_size)
    blocks = jnp.pad(centred, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
    peak = jnp.max(jnp.abs(blocks), axis=-1)
    codes = jnp.round(blocks * _safe_reciprocal(peak, 127.0)[:, None])
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(-1)[:n]
    return QuantizedAbsmax(codes=codes, scale=peak / 127.0, offset=offset, block_size=block_size)


# The public functions are jitted so that a weight shape compiles once, instead of dispatching a
# dozen small ops one by one; they nest inside a caller's jit unchanged.
@jax.jit
def block_absmax(q: NF4Tensor) -> jax.Array:
    """The float32 per-block scales of `q`, shape (n_blocks,), undoing double quantization."""
    if not isinstance(q.absmax, QuantizedAbsmax):
        return jnp.asarray(q.absmax, jnp.float32)
    a = q.absmax
    block_of = jnp.arange(a.codes.shape[0]) // a.block_size
    absmax = a.codes.astype(jnp.float32) * a.scale[block_of] + a.offset
    # A true absmax is >= 0; rounding near a zero block could dip below, which would flip signs.
    return jnp.maximum(absmax, 0.0)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant"))
def quantize_nf4(w: ArrayLike, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize `w` (any shape, float dtype) to NF4 in blocks of `block_size` flattened entries.

    Codes and absmax equal bitsandbytes' `quantize_4bit(w, quant_type="nf4", blocksize=...)`.
    With `double_quant`, the absmax are stored as linear int8 codes of (absmax - mean(absmax)),
    with one float32 scale per 256 blocks and a float32 offset (`QuantizedAbsmax`). Jitted, with
    `block_size` and `double_quant` static.
    """
    shape = tuple(int(d) for d in w.shape)
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"cannot NF4-quantize an empty tensor of shape {shape}")
    n_blocks = -(-n // block_size)
    flat = w.reshape(-1).astype(jnp.float32)
    blocks = jnp.pad(flat, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # zero padding cannot raise the max
    # bitsandbytes multiplies full blocks by the reciprocal but divides the trailing partial block;
    # the two can differ by one ulp, so do exactly the same to keep the codes bit-identical.
    scaled = blocks * _safe_reciprocal(absmax)[:, None]
    if n % block_size:
        tail = absmax[-1]
        # XLA rewrites x / broadcast(s) as x * (1 / s); the barrier hides the broadcast so that
        # this stays a true division.
        denom = jax.lax.optimization_barrier(
            jnp.broadcast_to(jnp.where(tail > 0, tail, 1.0), (block_size,))
        )
        scaled = scaled.at[-1].set(jnp.where(tail > 0, blocks[-1] / denom, 0.0))
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)
    # Index of the first threshold >= x: nearest code, ties (x exactly on a threshold) going to
    # the lower code, as torch.bucketize(right=False) does in bitsandbytes.
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), scaled, side="left").astype(jnp.uint8)
    n_even = n + (n % 2)  # padding entries are 0.0 -> code 7, matching bitsandbytes' odd padding
    codes = codes[:n_even]
    packed = (codes[0::2] << 4) | codes[1::2]
    stored_absmax = _quantize_absmax(absmax) if double_quant else absmax
    return NF4Tensor(
        packed=packed, absmax=stored_absmax, shape=shape, block_size=block_size, dtype=str(w.dtype)
    )


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_nf4(q: NF4Tensor, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Dequantize to an array of shape `q.shape` and `dtype`.

    Computes table[code] * absmax in float32 (as bitsandbytes does), then casts. Jitted with
    `dtype` static; fuses into a caller's jitted matmul.

    A kernel whose rows hold whole blocks is dequantized row by row in its own 2-D shape, each
    byte repeated and shifted in place: on a TPU, 1-D arrays and (..., 2) nibble pairs pad to
    (8, 128) tiles (BENCHMARKS.md §9: the flat form accesses 16 GB to dequantize one
    2048 x 8192 kernel on a v5e, this one 0.45 GB).
    """
    table = jnp.asarray(NF4_TABLE)
    absmax = block_absmax(q)
    cols = q.shape[-1] if q.shape else 1
    if len(q.shape) >= 2 and cols % q.block_size == 0 and cols % 2 == 0:
        packed = q.packed.reshape(-1, cols // 2)
        shifts = jnp.tile(jnp.array([4, 0], jnp.uint8), cols // 2)  # code 2i is byte i's high nibble
        codes = (jnp.repeat(packed, 2, axis=1) >> shifts) & 0xF
        values = jnp.take(table, codes.astype(jnp.int32), axis=0)
        scale = jnp.repeat(absmax.reshape(-1, cols // q.block_size), q.block_size, axis=1)
        return (values * scale).reshape(q.shape).astype(dtype)
    n = math.prod(q.shape)
    codes = jnp.stack([q.packed >> 4, q.packed & 0xF], axis=-1).reshape(-1)[:n]
    values = jnp.take(table, codes.astype(jnp.int32), axis=0)
    n_blocks = absmax.shape[0]
    values = jnp.pad(values, (0, n_blocks * q.block_size - n)).reshape(n_blocks, q.block_size)
    return (values * absmax[:, None]).reshape(-1)[:n].reshape(q.shape).astype(dtype)


@jax.jit
def quantize_int8(w: ArrayLike) -> Int8Tensor:
    """Per-output-channel absmax int8 for a Flax kernel `w` of shape (..., in, out).

    scale = max_in |w| / 127 (float32, shape (..., out)); codes = round(w / scale) in
    [-127, 127] (int8, shape of w). An all-zero column gets scale 0 and codes 0.
    Error per entry <= scale / 2 (plus float32 rounding).
    """
    if w.ndim < 2:
        raise ValueError(f"int8 quantization needs a kernel of shape (..., in, out), got {w.shape}")
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=-2)
    codes = jnp.round(w32 * _safe_reciprocal(absmax, 127.0)[..., None, :])
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8)
    return Int8Tensor(codes=codes, scale=absmax / 127.0, dtype=str(w.dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_int8(q: Int8Tensor, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """codes * scale computed in float32, cast to `dtype`; shape (..., in, out). Jitted."""
    return (q.codes.astype(jnp.float32) * q.scale[..., None, :]).astype(dtype)


@struct.dataclass
class Float16Bits:
    """A bf16/f16 weight stored as its bit pattern: bits uint16, the weight's shape; lossless.

    Why: XLA:CPU cannot dynamic-slice a 16-bit float array natively. Slicing one layer out of a
    stacked (L, in, out) bf16 kernel inside the layer scan makes it convert the *whole* stack to
    float32 first (27 GiB for Mistral-7B's). Slicing uint16 is native, and the bitcast back
    happens per layer. Other backends slice bf16 natively and need none of this.
    """

    bits: jax.Array
    dtype: str = struct.field(pytree_node=False, default="bfloat16")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


def as_bits(w: jax.Array) -> Float16Bits:
    """A 16-bit float array as `Float16Bits` (anything else is a ValueError)."""
    if jnp.dtype(w.dtype).itemsize != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"as_bits takes a 16-bit float array, got {w.dtype}")
    return Float16Bits(bits=jax.lax.bitcast_convert_type(w, jnp.uint16), dtype=jnp.dtype(w.dtype).name)


# Frozen weights stored other than as a plain array: one leaf each for labels, counts and grads.
STORED = (NF4Tensor, Int8Tensor, Float16Bits)


def dequantize(x: ArrayLike | NF4Tensor | Int8Tensor | Float16Bits, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """A base weight as a plain array of `dtype`: dequantizes NF4/int8, bitcasts `Float16Bits`,
    casts anything else."""
    if isinstance(x, NF4Tensor):
        return dequantize_nf4(x, dtype)
    if isinstance(x, Int8Tensor):
        return dequantize_int8(x, dtype)
    if isinstance(x, Float16Bits):
        return jax.lax.bitcast_convert_type(x.bits, jnp.dtype(x.dtype)).astype(dtype)
    return jnp.asarray(x).astype(dtype)


def nbytes(tree: Any) -> int:
    """Total bytes of every array leaf in `tree` (jax/numpy arrays or ShapeDtypeStructs).

    Static metadata (shapes, block sizes) is not a leaf and costs nothing here.
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total
