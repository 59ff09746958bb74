"""How fast a training step could go at best on a chip: a roofline bound from the compiler's own
count of the step's FLOPs and bytes, and the MFU bound that follows.

    costs = step_costs(model, devices, mesh_shape, batch_size=8, seq_len=2048, quant="nf4", dtype=jnp.bfloat16)
    bound = roofline(costs, chip, chips=8, model_flops=model_flops(config, 8, 2048, lora, crma))

**Counting.** XLA's cost analysis counts the body of a loop once, and the layer stack is a loop
(`nn.scan`), so the compiled step itself undercounts by about the number of layers. The step is
therefore costed from two copies of the same program with the loop written out
(`Decoder.unroll_layers`), one and two layers deep at full width. Their difference is one layer:

    cost(L) = cost(1) + (L − 1) · (cost(2) − cost(1))

(`tests/test_roofline.py` checks this against a stack unrolled in full). Every layer is taken to
cost what the second does: blocks that a sliding window lets the blockwise attention skip are
not told apart from a global layer's. The figures are per chip, from the partitioned program.
Over a wide FSDP mesh libtpu would also put each projection's matmul in a loop over the
chips' weight shards (a windowed einsum); the costing compiles turn that off
(`COSTING_OPTIONS`). Loops inside a layer (the blockwise attention's key blocks, the chunked
loss's vocabulary blocks) are still counted once, so the counts can fall short of the step's
work; the compute time is therefore never taken below what the model FLOPs need (see
**Bound**). The deviceless GPU compiler reports no costs, so for a GPU
target XLA:CPU counts one chip's share of the FLOPs (`StepCosts.counted_by` says so): a matmul's
FLOPs are the same whoever compiles it. Its bytes are not used: they follow XLA:CPU's fusion and
attention (T × T scores in memory, where a GPU runs a fused kernel), which would overstate the
traffic and so no longer bound the time from below. A GPU's bound is its compute bound.

**Model FLOPs** (MFU's numerator) are what the step needs, not what the compiled program does:
no recomputation, and each causal attention pair counted once. Per token,

    4·N_frozen + 6·N_trainable + 12·L·H·A

where N_frozen is the frozen matmul weights a token passes through (every layer's projections
and the LM head): the forward pass and the gradient with respect to the activations cost 2 FLOPs
per weight each, and a frozen weight gets no gradient. N_trainable is the LoRA and CRMA weights,
which get their gradient too (2 more). L is the number of layers, H = heads × head_dim, and A
the mean number of positions a token attends to: (T + 1)/2 for causal attention over T, fewer
under a sliding window. Attention's two matmuls cost 4·H·A forward and twice that backward.

**Bound.** time ≥ max(FLOPs / peak, bytes / bandwidth) per chip, with FLOPs the larger of the
count and the chip's share of the model FLOPs, and MFU ≤ model FLOPs / (chips · peak · that
time). A bound, not a forecast: real steps also wait on collectives,
kernel launches and imperfect overlap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.lora import LoraConfig
from crma_jax.model import Decoder


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """FLOPs and bytes accessed by one step on one chip, as `counted_by` counted them."""

    flops: float
    bytes_accessed: float | None  # None: not counted by the target's compiler (a GPU's)
    counted_by: str  # the compiler whose cost analysis gave the counts, e.g. "tpu" or "cpu"


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The lower bound on one step's time on a slice, and the MFU bound that follows."""

    compute_seconds: float  # per-chip FLOPs (at least the model FLOPs' share) / peak
    memory_seconds: float | None  # per-chip bytes / HBM bandwidth; None where bytes were not counted
    model_flops: float  # the whole step's, over all chips
    chips: int
    peak_flops: float  # per chip

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds or 0.0)

    @property
    def bound_by(self) -> str:
        if self.memory_seconds is None:
            return "compute (bytes not counted)"
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.chips * self.peak_flops * self.seconds)


def _cost(compiled: Any) -> dict[str, float] | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return {"flops": float(analysis["flops"]), "bytes": float(analysis.get("bytes accessed", 0.0))}


def with_layers(config: ModelConfig, layers: int) -> ModelConfig:
    """`config` cut to its first `layers` layers (their windows and RoPE choice kept)."""
    windows = config.layer_windows[:layers] if config.layer_windows else ()
    return dataclasses.replace(config, num_layers=layers, layer_windows=windows)


# Compiler options for the costing compiles only. Over a wide FSDP mesh libtpu turns the gather
# of a layer's weights and its matmul into a "windowed einsum": a loop over the chips' shards,
# whose body cost_analysis counts once (Mistral-7B on v5e-8: one eighth of each projection's
# FLOPs). Costed without it, the step does the same arithmetic, in one matmul per projection.
COSTING_OPTIONS: dict[str, dict[str, Any]] = {
    "tpu": {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
            "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False},
}


def step_costs(model: Decoder, devices: Sequence[Any], mesh_shape: Sequence[int], *, batch_size: int,
               seq_len: int, quant: str | None, dtype: Any, accum_steps: int = 1,
               optimizer: Callable[[Any], Any] | None = None) -> StepCosts:
    """Per-chip FLOPs and bytes of `model`'s training step over a `mesh_shape` mesh of `devices`
    (as `memory_plan.compile_step_from_shapes` builds it), extrapolated from the step unrolled one
    and two layers deep.

    Where the devices' compiler reports no costs (a deviceless GPU), one chip's share of the FLOPs
    is counted by XLA:CPU on one host device: the step of its batch shard (batch / (data · fsdp))
    with the whole base, as an FSDP chip runs it once the weights are gathered, divided by the
    model axis; its bytes are then None (see the module docstring)."""
    from crma_jax.memory_plan import compile_step_from_shapes

    def counted(on: Sequence[Any], mesh: Sequence[int], batch: int) -> tuple[dict[str, float], ...] | None:
        costs = []
        for layers in (1, 2):
            shallow = model.clone(config=with_layers(model.config, layers), unroll_layers=True)
            compiled, _, _ = compile_step_from_shapes(shallow, on, mesh, batch_size=batch, seq_len=seq_len,
                                                      quant=quant, dtype=dtype, accum_steps=accum_steps,
                                                      optimizer=optimizer,
                                                      compiler_options=COSTING_OPTIONS.get(on[0].platform))
            cost = _cost(compiled)
            if cost is None:
                return None
            costs.append(cost)
        return tuple(costs)

    share, platform = 1, devices[0].platform
    pair = counted(devices, mesh_shape, batch_size)
    if pair is None:
        data, fsdp, share = mesh_shape
        pair, platform = counted(jax.devices("cpu")[:1], (1, 1, 1), batch_size // (data * fsdp)), "cpu"
    one, two = pair
    extra = model.config.num_layers - 1
    bytes_accessed = (one["bytes"] + extra * (two["bytes"] - one["bytes"])) / share
    return StepCosts(flops=(one["flops"] + extra * (two["flops"] - one["flops"])) / share,
                     bytes_accessed=bytes_accessed if platform == devices[0].platform else None, counted_by=platform)


def attended_positions(seq_len: int, window: int | None) -> float:
    """The mean number of keys a query attends to under causal attention over `seq_len`
    positions (itself included), at most `window` of them."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # Positions 0..w-1 see 1..w keys; the other T − w see w each.
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def model_flops(config: ModelConfig, batch_size: int, seq_len: int, lora_config: LoraConfig | None,
                crma_config: CRMAConfig | None) -> float:
    """The FLOPs one training step needs (the module docstring's formula), over all chips."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, config.intermediate_size), "up_proj": (d, config.intermediate_size),
              "down_proj": (config.intermediate_size, d)}
    frozen = config.num_layers * sum(i * o for i, o in shapes.values()) + d * config.vocab_size
    trainable = 0
    if lora_config is not None:
        trainable += config.num_layers * sum(lora_config.rank * sum(shapes[t]) for t in lora_config.targets)
    if crma_config is not None:  # h·U, then ·K, then ·Uᵀ: U counts twice
        trainable += config.num_layers * (2 * d * crma_config.rank + crma_config.rank ** 2)
    attention = 12 * q * sum(attended_positions(seq_len, w) for w in config.windows)
    return batch_size * seq_len * (4 * frozen + 6 * trainable + attention)


def roofline(costs: StepCosts, chip: Any, chips: int, model_flops: float) -> Roofline:
    """The bound for `costs` (per chip) on `chips` of `chip` (a `crma_jax.targets.Chip`)."""
    return Roofline(compute_seconds=max(costs.flops, model_flops / chips) / chip.peak_bf16_flops,
                    memory_seconds=None if costs.bytes_accessed is None else costs.bytes_accessed / chip.hbm_bandwidth,
                    model_flops=model_flops, chips=chips, peak_flops=chip.peak_bf16_flops)
