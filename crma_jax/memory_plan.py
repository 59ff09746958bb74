"""Plan a training step's memory before renting an accelerator: XLA's own buffer plan of one
LoRA (+ CRMA) step compiled from abstract shapes. No weights are loaded or allocated.

    plan = plan_step_memory(ModelConfig.from_hf(config), quant="nf4", batch_size=1, seq_len=2048)
    plan.total_gib      # arguments + temporaries + outputs − donated aliases

The figures are `jax.jit(step).lower(ShapeDtypeStructs).compile().memory_analysis()` on the
chosen backend (the default one, or e.g. "cpu"), so they describe the exact program that
`crma train` runs with the same settings, including its donation of the trainable state.

`fastest_fitting` is the same measurement used at run time: `crma train --remat auto` compiles
the step under each remat policy, fastest first, and runs the first whose new allocations fit
in the memory the devices still have free.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from crma_jax.adapters import init_adapters, param_labels, quantize_params, store_as_bits
from crma_jax.config import ModelConfig
from crma_jax.crma import CRMAConfig
from crma_jax.hf_params import abstract_params
from crma_jax.lora import LoraConfig
from crma_jax.model import Decoder
from crma_jax.optim import make_optimizer
from crma_jax.sharding import make_mesh
from crma_jax.train_step import BATCH_KEYS, jit_train_step, make_train_step

GIB = 2**30
# Well-known shapes (from the models' HF configs), so a plan needs no download.
ARCHS: dict[str, dict[str, Any]] = {
    "tinyllama": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                       tie_word_embeddings=False),
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=4096,
                      query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192), tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       sliding_window=131072, use_sliding_window=False, tie_word_embeddings=False),
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=1024,
                       sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling=dict(rope_type="linear", factor=8.0), query_pre_attn_scalar=256,
                       hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """XLA's buffer plan of one step, in bytes. `total` = arguments + temp + outputs − aliases."""

    argument: int
    output: int
    alias: int
    temp: int
    weights: int  # the frozen base alone (part of `argument`)

    @property
    def total(self) -> int:
        return self.argument + self.temp + self.output - self.alias

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in {**dataclasses.asdict(self), "total": self.total}.items()}


# Remat policies from fastest to leanest, as measured on SmolLM2's step (BENCHMARKS.md §3):
# `none` and `minimal` recompute only elementwise work (`minimal` keeps less), the others
# recompute projections too.
REMAT_BY_SPEED = ("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full")
# The share of free memory a step may plan to use: XLA's plan leaves out the runtime's own
# allocations and fragmentation.
HEADROOM = 0.85


def step_bytes(analysis: Any) -> int:
    """Bytes one run of a compiled step allocates beyond its (already resident) arguments:
    temporaries plus outputs that are not donated argument buffers."""
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes


def _host_free_bytes() -> int:
    """MemAvailable, capped by the cgroup (v2) limit where one is set."""
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - current)
    except (OSError, ValueError):
        pass
    return free


def free_bytes(devices: Sequence[Any]) -> int:
    """Bytes still free on the most loaded of `devices`: the allocator's limit minus what is in
    use for an accelerator, the host's available memory for CPU devices (which share it)."""
    free = []
    for device in devices:
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        else:
            cpus = sum(d.platform == "cpu" for d in devices if d.process_index == device.process_index)
            free.append(_host_free_bytes() // max(cpus, 1))
    return min(free)


@dataclasses.dataclass(frozen=True)
class RematChoice:
    """The policy `fastest_fitting` picked, its compiled step, and what each tried policy needs."""

    policy: str
    compiled: Any
    fits: bool
    needed: dict[str, int]  # policy -> `step_bytes`, in the order tried
    free: int

    def describe(self) -> str:
        tried = ", ".join(f"{p} {_size(n)}" for p, n in self.needed.items())
        verdict = "fits" if self.fits else "does not fit either; running the leanest"
        return (f"remat {self.policy!r}: the step needs {_size(self.needed[self.policy])} beyond its arguments, "
                f"{_size(self.free)} free, {verdict} (tried: {tried})")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def fastest_fitting(compile_for: Callable[[str], Any], free: int, policies: Sequence[str] = REMAT_BY_SPEED,
                    headroom: float = HEADROOM) -> RematChoice:
    """Compile the step under each of `policies` in order (fastest first) and return the first
    whose `step_bytes` is at most `headroom × free`; the last one if none is.

    `compile_for(policy)` returns a `jax.stages.Compiled` step. Only policies up to the chosen
    one are compiled, so a step that fits without remat costs one compilation, as plain jit would.
    """
    needed: dict[str, int] = {}
    compiled = None
    for policy in policies:
        compiled = compile_for(policy)
        needed[policy] = step_bytes(compiled.memory_analysis())
        if needed[policy] <= headroom * free:
            return RematChoice(policy, compiled, True, needed, free)
    return RematChoice(policies[-1], compiled, False, needed, free)


def _struct(x: Any, dtype: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)


def abstract_base(model: Decoder, dtype: Any, quant: str | None, platform: str = "cpu") -> Any:
    """ShapeDtypeStructs of the frozen base stored in `dtype` as `crma train` stores it on
    `platform`: kernels quantized if asked, else 16-bit ones as their bits on a CPU."""
    params = jax.tree.map(lambda s: _struct(s, dtype), abstract_params(model))
    if quant:
        return jax.eval_shape(lambda p: quantize_params(p, quant), params)
    return store_as_bits(params) if platform == "cpu" else params


def plan_step_memory(config: ModelConfig, *, batch_size: int = 1, seq_len: int = 2048, quant: str | None = "nf4",
                     dtype: Any = jnp.bfloat16, compute_dtype: Any = jnp.bfloat16,
                     lora_config: LoraConfig | None = LoraConfig(rank=8),
                     crma_config: CRMAConfig | None = CRMAConfig(rank=4),
                     accum_steps: int = 1, backend: str | None = None, mesh_shape: Sequence[int] = (1, 1, 1),
                     devices: Sequence[Any] | None = None, **model_options: Any) -> MemoryPlan:
    """Compile one training step of `config` from abstract shapes and return XLA's buffer plan.

    `model_options` are further `Decoder` attributes (e.g. `remat="full"`). The step is the
    library's (`make_train_step` + `jit_train_step`, ZClip + per-label AdamW) on a
    (data, fsdp, model) mesh of `mesh_shape` over the first of `devices` (default: those of
    `backend`, else JAX's default backend; `crma_jax.targets.target_devices` gives a TPU or GPU
    target's devices on a host without them); `batch_size` is the global batch. With more than
    one device the figures are per device (XLA plans the partitioned program of one device),
    `weights` included.
    """
    devices = list(devices) if devices is not None else (jax.devices(backend) if backend else jax.devices())
    model = Decoder(config, dtype=compute_dtype, lora_config=lora_config, crma_config=crma_config, **model_options)
    compiled, frozen, frozen_shardings = compile_step_from_shapes(
        model, devices, mesh_shape, batch_size=batch_size, seq_len=seq_len, quant=quant, dtype=dtype,
        accum_steps=accum_steps)
    return memory_plan_of(compiled, frozen, frozen_shardings)


def memory_plan_of(compiled: Any, frozen: Any, frozen_shardings: Any) -> MemoryPlan:
    """The `MemoryPlan` of a compiled step; `weights` is the per-device share of the frozen base."""
    analysis = compiled.memory_analysis()
    weights = sum(math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                  for leaf, sharding in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_shardings)))
    return MemoryPlan(argument=analysis.argument_size_in_bytes, output=analysis.output_size_in_bytes,
                      alias=analysis.alias_size_in_bytes, temp=analysis.temp_size_in_bytes, weights=weights)


def _default_optimizer(trainable: Any) -> Any:
    lr = {"lora_a": 1e-4, "lora_b": 1e-4, "crma_read_mix": 1e-3, "crma_gate": 1e-2}
    return make_optimizer(param_labels(trainable), lr, total_steps=1000)


def compile_step_from_shapes(model: Decoder, devices: Sequence[Any], mesh_shape: Sequence[int], *, batch_size: int,
                             seq_len: int, quant: str | None, dtype: Any, accum_steps: int = 1,
                             optimizer: Callable[[Any], Any] | None = None,
                             compiler_options: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """The compiled training step of `model` over a `mesh_shape` mesh of `devices`, built from
    ShapeDtypeStructs only: (compiled step, the frozen base's structs, their shardings).

    The base is stored in `dtype` (quantized when `quant` is set) as `crma train` stores it on
    the devices' platform; `optimizer(trainable structs)` builds the optax transformation (default:
    ZClip + per-label AdamW with fixed rates, which change no buffer); `compiler_options` go to
    the devices' compiler. The model is traced under the mesh, so it follows the devices' platform
    (`crma_jax.attention.compiling_for`), not this host's."""
    need = math.prod(mesh_shape)
    if len(mesh_shape) != 3 or min(mesh_shape) < 1:
        raise ValueError(f"mesh {tuple(mesh_shape)}: need (data, fsdp, model), three positive sizes")
    if need > len(devices):
        hint = (" (simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax "
                "is imported)") if devices[0].platform == "cpu" else ""
        raise ValueError(f"mesh {tuple(mesh_shape)} needs {need} devices; {devices[0].platform} has {len(devices)}{hint}")
    if batch_size % (mesh_shape[0] * mesh_shape[1]):
        raise ValueError(f"batch size {batch_size} does not split over data x fsdp = {mesh_shape[0] * mesh_shape[1]}")
    mesh = make_mesh(mesh_shape, devices[:need])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # traced for the devices' platform, not this host's
        frozen = abstract_base(model, dtype, quant, devices[0].platform)
        trainable = jax.eval_shape(lambda p: init_adapters(model, p, jax.random.PRNGKey(0)), frozen)
    optimizer = (optimizer or _default_optimizer)(trainable)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    step = make_train_step(model, optimizer, accum_steps)
    jitted, shardings = jit_train_step(step, mesh, trainable, opt_state, frozen)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in BATCH_KEYS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with warnings.catch_warnings():
        # A deviceless compiler (a target this host does not have) writes entries to a persistent
        # compilation cache (JAX_COMPILATION_CACHE_DIR) that it cannot read back: it warns and
        # compiles again. (JAX decides once per process whether to use the cache, so it cannot
        # be turned off for these compiles alone.)
        warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry", UserWarning)
        compiled = jitted.lower(trainable, opt_state, frozen, batch, rng, {}).compile(compiler_options)
    return compiled, frozen, shardings["frozen"]


@dataclasses.dataclass(frozen=True)
class TargetPlan:
    """A step planned for an accelerator target by that target's compiler, per chip.

    `policy` is the remat policy planned: for "auto", the fastest whose step fits by the rule
    `crma train --remat auto` applies at run time (its allocations beyond the resident arguments
    within `HEADROOM` of what the chip has left once they are loaded), else the leanest tried.
    `plan` is that policy's buffer plan, None when the compiler itself refused the program for
    want of memory (a TPU compile does; `error` then holds its message). `needed` maps each
    tried policy to its bytes beyond the arguments (None: refused). `usable` is what one chip's
    allocator may hand out (`Target.usable_bytes`).
    """

    target: Any  # crma_jax.targets.Target
    mesh_shape: tuple[int, int, int]
    policy: str
    plan: MemoryPlan | None
    needed: dict[str, int | None]
    usable: int
    compile_seconds: float
    error: str | None = None
    roofline: Any = None  # crma_jax.roofline.Roofline of `policy`'s step, when asked for and costed
    costs: Any = None  # crma_jax.roofline.StepCosts behind it

    @property
    def fits(self) -> bool:
        if self.plan is None:
            return False
        free = self.usable - self.plan.argument
        return step_bytes_of(self.plan) <= HEADROOM * free

    def tried(self, unit: str = " GiB") -> str:
        """Each tried policy with its GiB beyond the arguments ("refused" where the compiler
        refused it), in the order tried: "full 1.20 GiB, dots refused"."""
        return ", ".join(f"{p} {'refused' if n is None else f'{n / 2**30:.2f}{unit}'}" for p, n in self.needed.items())


def step_bytes_of(plan: MemoryPlan) -> int:
    """`step_bytes` of a `MemoryPlan`: what a step allocates beyond its resident arguments."""
    return plan.temp + plan.output - plan.alias


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error)


def plan_for_target(config: ModelConfig, target: Any, *, remat: str = "auto", mesh_shape: Sequence[int] | None = None,
                    batch_size: int = 1, seq_len: int = 2048, quant: str | None = "nf4", dtype: Any = jnp.bfloat16,
                    compute_dtype: Any = jnp.bfloat16, lora_config: LoraConfig | None = LoraConfig(rank=8),
                    crma_config: CRMAConfig | None = CRMAConfig(rank=4), accum_steps: int = 1,
                    optimizer: Callable[[Any], Any] | None = None, devices: Sequence[Any] | None = None,
                    roofline: bool = False, **model_options: Any) -> TargetPlan:
    """Compile one training step for `target` (a `crma_jax.targets.Target`) with its own
    compiler and plan it per chip. `mesh_shape` defaults to FSDP over every chip
    (1, chips, 1); `remat` is a policy name or "auto" (policies fastest first, up to the first
    that fits); `optimizer` is as in `compile_step_from_shapes`. `devices` defaults to
    `target_devices(target)` (call `targets.prepare_host()` first). A compiler that rejects the
    program as too large for the chip is recorded, not raised: the plan then does not fit.
    With `roofline`, a step that fits is also costed (`crma_jax.roofline`; two more, shallow
    compiles) for its roofline bound."""
    import time

    from crma_jax import roofline as rl
    from crma_jax.targets import target_devices

    devices = list(devices) if devices is not None else target_devices(target)
    mesh = tuple(mesh_shape) if mesh_shape is not None else (1, len(devices), 1)
    model = Decoder(config, dtype=compute_dtype, lora_config=lora_config, crma_config=crma_config, **model_options)
    usable = target.usable_bytes()
    needed: dict[str, int | None] = {}
    plan = error = None
    t0 = time.perf_counter()
    for policy in REMAT_BY_SPEED if remat == "auto" else (remat,):
        try:
            compiled = compile_step_from_shapes(model.clone(remat=policy), devices, mesh, batch_size=batch_size,
                                                seq_len=seq_len, quant=quant, dtype=dtype, accum_steps=accum_steps,
                                                optimizer=optimizer)
        except Exception as e:  # noqa: BLE001 - XLA raises its runtime error type for an oversized program
            if not _out_of_memory(e):
                raise
            needed[policy], plan, error = None, None, str(e).splitlines()[0]
            continue
        plan, error = memory_plan_of(*compiled), None
        needed[policy] = step_bytes_of(plan)
        if needed[policy] <= HEADROOM * (usable - plan.argument):
            break
    planned = TargetPlan(target, mesh, policy, plan, needed, usable, time.perf_counter() - t0, error)
    if not (roofline and planned.fits):
        return planned
    costs = rl.step_costs(model.clone(remat=policy), devices, mesh, batch_size=batch_size, seq_len=seq_len,
                          quant=quant, dtype=dtype, accum_steps=accum_steps, optimizer=optimizer)
    flops = rl.model_flops(config, batch_size, seq_len, lora_config, crma_config)
    return dataclasses.replace(planned, roofline=rl.roofline(costs, target.chip, math.prod(mesh), flops), costs=costs)


def arch_config(arch: str) -> ModelConfig:
    """A `ModelConfig` for a name in `ARCHS` or a path to an HF `config.json`."""
    import json
    from pathlib import Path

    if arch in ARCHS:
        return ModelConfig.from_hf(ARCHS[arch])
    path = Path(arch)
    if not path.is_file():
        raise FileNotFoundError(f"{arch}: neither a known architecture ({', '.join(ARCHS)}) nor a config.json file")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a usable HF config ({e})") from e
