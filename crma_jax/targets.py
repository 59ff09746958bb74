"""Accelerator targets as data: the chips and slices a training step can be compiled for on a
CPU-only host, by the real TPU and GPU compilers.

    target = TARGETS["v5e-8"]            # or resolve_target("h100")
    devices = target_devices(target)     # deviceless TPU/GPU devices to build a Mesh over

A TPU target is a libtpu topology (`jax.experimental.topologies.get_topology_desc`, named as
MaxText names its slices); a GPU target is a `GpuTargetConfigProto` text file in
`crma_jax/gpu_targets/`, written from XLA's published device specs, which the CUDA plugin
compiles for with no GPU present. Compiling needs the compilers, not the chips:
`pip install 'crma-jax[aot]'` brings libtpu and the CUDA plugin (no nvidia-* wheels).

Each chip's published figures (HBM per chip, dense bf16 peak, HBM bandwidth) carry their source
beside them; they feed the fit check and the roofline bound in `crma_jax.memory_plan`.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import Any

GB = 10**9
GIB = 2**30
TB = 10**12


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: what the compiler targets and what the roofline divides by."""

    name: str
    platform: str  # "tpu" | "gpu"
    hbm_bytes: int
    peak_bf16_flops: float  # dense (no sparsity), per chip
    hbm_bandwidth: float  # bytes/s, per chip
    gpu_spec: str | None = None  # GPU: the GpuTargetConfigProto file in crma_jax/gpu_targets/


# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}),
# "Key chip specifications", whose HBM "GB" are GiB (libtpu's compiler reports 15.75 GiB of a
# v5e's HBM available to a program); NVIDIA datasheets for H100 SXM, H200 SXM, A100 SXM4 and L4, dense
# bf16 tensor-core figures (the datasheets' "with sparsity" figures halved).
CHIPS: dict[str, Chip] = {
    # v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps per chip.
    "v4": Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1200 * GB),
    # v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps per chip.
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 819 * GB),
    # v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps per chip.
    "v5p": Chip("TPU v5p", "tpu", 95 * GIB, 459e12, 2765 * GB),
    # v6e (Trillium): 918 TFLOPs bf16, 32 GB HBM at 1640 GBps per chip.
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1640 * GB),
    # H100 SXM5: 989 TFLOPS bf16 dense (1979 with sparsity), 80 GB HBM3 at 3.35 TB/s.
    "h100": Chip("NVIDIA H100 SXM 80GB", "gpu", 80 * GB, 989e12, 3.35 * TB, "h100.txtpb"),
    # H200 SXM: 989 TFLOPS bf16 dense, 141 GB HBM3e at 4.8 TB/s.
    "h200": Chip("NVIDIA H200 SXM 141GB", "gpu", 141 * GB, 989e12, 4.8 * TB, "h200.txtpb"),
    # A100 SXM4 80GB: 312 TFLOPS bf16 dense, 80 GB HBM2e at 2039 GB/s.
    "a100-80g": Chip("NVIDIA A100 SXM4 80GB", "gpu", 80 * GB, 312e12, 2039 * GB, "a100_80g.txtpb"),
    # A100 SXM4 40GB: 312 TFLOPS bf16 dense, 40 GB HBM2 at 1555 GB/s.
    "a100-40g": Chip("NVIDIA A100 SXM4 40GB", "gpu", 40 * GB, 312e12, 1555 * GB, "a100_40g.txtpb"),
    # L4: 121 TFLOPS bf16 dense (242 with sparsity), 24 GB GDDR6 at 300 GB/s.
    "l4": Chip("NVIDIA L4", "gpu", 24 * GB, 121e12, 300 * GB, "l4.txtpb"),
    # A10G (AWS G5, the 24 GB card the CRMA authors used): NVIDIA publishes no datasheet for it.
    # 24 GB GDDR6 at 600 GB/s, 80 SMs; 70 TFLOPS bf16 dense as compared with the A10 in
    # baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference. Its target file starts from
    # XLA's RTX A6000 spec (the same GA102 chip, sm_86).
    "a10g": Chip("NVIDIA A10G", "gpu", 24 * GB, 70e12, 600 * GB, "a10g.txtpb"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice of `chips` chips to compile for: a TPU topology or GPUs on one host."""

    name: str
    chip: Chip
    chips: int
    topology: str  # TPU: libtpu topology name ("v5e:2x4"); GPU: "slices x hosts x devices per host"
    chip_config: str = "default"  # TPU: "megacore" for v4/v5p (one device per chip, two cores)
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)

    @property
    def platform(self) -> str:
        return self.chip.platform

    def usable_bytes(self) -> int:
        """What one chip's allocator may hand out. JAX on a GPU preallocates
        XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory and allocates within it; a TPU
        gives a program its HBM."""
        if self.platform != "gpu":
            return self.chip.hbm_bytes
        if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false":
            return self.chip.hbm_bytes
        return int(self.chip.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))


# TPU slices as MaxText names them (v4-N and v5p-N count TensorCores, two per chip; v5e-N and
# v6e-N count chips), with libtpu's topology names.
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


def _tpu_targets() -> dict[str, Target]:
    out = {}
    for gen, prefix in (("v5e", "v5e"), ("v6e", "v6e")):
        for chips, grid in _GRID_2D.items():
            wrap = (chips >= 256, chips >= 128, False)
            bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
            out[f"{gen}-{chips}"] = Target(f"{gen}-{chips}", CHIPS[gen], chips, f"{prefix}:{grid}",
                                           chips_per_host_bounds=bounds, wrap=wrap)
    for gen, prefix in (("v4", "v4"), ("v5p", "v5")):
        for chips, grid in _GRID_3D.items():
            wrap = (chips >= 64,) * 3
            out[f"{gen}-{2 * chips}"] = Target(f"{gen}-{2 * chips}", CHIPS[gen], chips, f"{prefix}:{grid}",
                                               chip_config="megacore", wrap=wrap)
    return out


def _gpu_targets() -> dict[str, Target]:
    out = {}
    for name, chip in CHIPS.items():
        if chip.platform == "gpu":
            out[name] = Target(name, chip, 1, "1x1x1")
            out[f"{name}x8"] = Target(f"{name}x8", chip, 8, "1x1x8")
    return out


TARGETS: dict[str, Target] = {**_tpu_targets(), **_gpu_targets()}


def resolve_target(name: str) -> Target:
    """The target called `name`; a ValueError listing the known names otherwise."""
    if name not in TARGETS:
        raise ValueError(f"unknown --target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def gpu_target_config(chip: Chip) -> str:
    """The `GpuTargetConfigProto` text the CUDA compiler plans for."""
    if chip.gpu_spec is None:
        raise ValueError(f"{chip.name} is not a GPU")
    return resources.files("crma_jax").joinpath("gpu_targets", chip.gpu_spec).read_text()


def prepare_host() -> None:
    """Settings that must precede JAX's backend start-up in a planning process: only the CPU
    backend is started (the targets' compilers run without their devices), and libtpu is told
    it runs on no TPU VM, so that it neither queries cloud metadata nor warns about it, and that
    it does not take (or wait for) the one-process-per-host TPU lock, which planning needs not."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    import jax

    jax.config.update("jax_platforms", "cpu")


def target_devices(target: Target) -> list[Any]:
    """The target's devices, as its own compiler sees them, on a host without them.

    Raises RuntimeError naming the package to install when the compiler is missing. Call
    `prepare_host()` before JAX starts its backends.
    """
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
                chips_per_host_bounds=target.chips_per_host_bounds, num_slices=1, wrap=target.wrap)
        else:
            topology = topologies.get_topology_desc(
                platform="cuda", target_config=gpu_target_config(target.chip), topology=target.topology)
    except Exception as e:  # noqa: BLE001 - the plugins raise RuntimeError, ValueError or XlaRuntimeError
        hint = "libtpu" if target.platform == "tpu" else "the CUDA plugin (jax-cuda12-plugin, jax-cuda12-pjrt)"
        raise RuntimeError(f"--target {target.name}: cannot start the {target.platform.upper()} compiler "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); install {hint} with "
                           f"pip install 'crma-jax[aot]'") from e
    devices = list(topology.devices)
    if len(devices) != target.chips:
        raise RuntimeError(f"--target {target.name}: the compiler reports {len(devices)} devices, expected {target.chips}")
    return devices
