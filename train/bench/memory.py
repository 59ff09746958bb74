"""`crma bench memory`: plan a training step's memory from abstract shapes, with no weights.

    crma bench memory --arch mistral-7b --quant nf4 --seq-len 2048 --remat full
    crma bench memory --arch mistral-7b --target a10g,v5e-1,h100 --remat auto
    crma bench memory --table            # the BENCHMARKS.md grid: 3 models x {bf16, nf4} x remat x T

Each row is XLA's buffer plan of one `crma train` step (LoRA r=8 on all 7 projections + CRMA
rank 4, ZClip + AdamW, bf16 compute), compiled from ShapeDtypeStructs: arguments (frozen base +
adapters + optimizer state + batch), temporaries, outputs, and the total less the donated
buffers. Nothing is allocated, so a 9B plan runs on a laptop.

`--backend` plans on the JAX backends of this machine. `--target` plans on an accelerator this
machine does not have, with that accelerator's own compiler (`crma_jax.targets`: TPU slices
through libtpu, GPUs through the CUDA plugin; `pip install 'crma-jax[aot]'`): per chip, with
FSDP over the target's chips unless `--mesh` says otherwise, whether the step fits the chip's
memory and which policy `--remat auto` would run there, and a roofline bound: the step's FLOPs
and bytes per chip as the compiler counts them (`crma_jax.roofline`), the least time a step can
take on the chip's published peak and bandwidth, and the MFU bound that follows. Such figures are
compiler plans, not measurements on the device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

from crma_jax.memory_plan import ARCHS, arch_config, plan_step_memory
from crma_jax.model import REMAT_POLICIES
from crma_jax.targets import TARGETS, resolve_target
from crma_jax.train.bench.util import command_line, machine_note

TABLE = {"arch": ("tinyllama", "mistral-7b", "gemma2-9b"), "quant": ("bf16", "nf4"),
         "remat": ("none", "full", "save_dot_except_mlp"), "seq_len": (2048, 8192)}
BACKENDS = ("cpu", "gpu", "tpu")


def _csv(kind: type) -> object:
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=_csv(str), default=["mistral-7b"],
                        help=f"comma-separated: {', '.join(ARCHS)} or a path to an HF config.json (default: mistral-7b)")
    parser.add_argument("--quant", type=_csv(str), default=["nf4"],
                        help="comma-separated base storage: bf16, nf4, int8 (default: nf4)")
    parser.add_argument("--remat", type=_csv(str), default=None,
                        help=f"comma-separated policies: {', '.join(REMAT_POLICIES)}, or auto with --target (the "
                             "fastest that fits the chip, as crma train --remat auto picks at run time) "
                             "(default: full; auto with --target)")
    parser.add_argument("--seq-len", type=_csv(int), default=[2048], help="comma-separated T (default: 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="global batch size B (default: 1)")
    parser.add_argument("--mesh", type=_csv(int), nargs="+", default=None, metavar="D,F,M",
                        help="(data, fsdp, model) mesh shapes to plan on, per device (default: 1,1,1; with --target, "
                             "FSDP over all the target's chips); a CPU plan of N devices needs "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    parser.add_argument("--backend", type=_csv(str), default=None,
                        help="comma-separated JAX backends of this machine to plan on, e.g. cpu,gpu (default: every "
                             "one present; none with --target)")
    parser.add_argument("--target", type=_csv(str), default=None,
                        help="comma-separated accelerators to compile for without having them, with their own "
                             f"compilers (needs crma-jax[aot]): {', '.join(TARGETS)}")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false",
                        help="with --target, skip the roofline columns (they cost two more, shallow compiles per row)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    parser.add_argument("--table", action="store_true", help="the full grid recorded in BENCHMARKS.md (on each --mesh)")


def backends(asked: list[str] | None) -> list[str]:
    """The backends to plan on: those asked for (each must be present), else every one present."""
    import jax

    present = []
    for name in BACKENDS:
        try:
            jax.devices(name)
            present.append(name)
        except RuntimeError:
            continue
    for name in asked or ():
        if name not in present:
            raise ValueError(f"--backend {name}: not present on this machine (present: {', '.join(present)}); "
                             "to plan for an accelerator you do not have, use --target")
    return asked or present


def _check(args: argparse.Namespace) -> None:
    """Every setting is checked before the first line is printed."""
    allowed = (*REMAT_POLICIES, "auto") if args.target else REMAT_POLICIES
    for policy in args.remat:
        if policy not in allowed:
            raise ValueError(f"--remat {policy!r}: choose from {', '.join(allowed)}")
    for mesh in args.mesh or ():
        if len(mesh) != 3 or min(mesh) < 1:
            raise ValueError(f"--mesh {','.join(map(str, mesh))}: need D,F,M, three positive sizes")
    for name in args.target or ():
        resolve_target(name)
    for arch in args.arch:
        arch_config(arch)


def run(args: argparse.Namespace) -> int:
    if args.remat is None:
        args.remat = ["auto"] if args.target else ["full"]
    if args.table:
        args.arch, args.quant, args.remat, args.seq_len = (list(TABLE[k]) for k in ("arch", "quant", "remat", "seq_len"))
    _check(args)
    if args.target:
        from crma_jax import targets

        targets.prepare_host()  # before JAX starts a backend
        rows = _target_rows(args)
    else:
        rows = _backend_rows(args, backends(args.backend))
    if not args.json:
        import jax

        print(f"$ {command_line()}")
        print(f"machine: {machine_note()}; jax {jax.__version__}")
        print(f"one training step, LoRA r=8 x7 + CRMA 4, bf16 compute, B={args.batch_size}; GiB per device from "
              "compile().memory_analysis() on abstract shapes" + ("; compiler plans for targets this machine does "
                                                                  "not have" if args.target else ""))
    header = None
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        if header is None:
            header = list(row)
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
        print("| " + " | ".join(_cell(row[k]) for k in header) + " |", flush=True)
    return 0


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _gib(plan: Any) -> dict[str, float]:
    g = plan.gib()
    return {"weights": g["weights"], "arguments": g["argument"], "temp": g["temp"], "outputs": g["output"],
            "total": g["total"]}


def _backend_rows(args: argparse.Namespace, names: list[str]):
    for arch, quant, policy, seq, mesh in itertools.product(args.arch, args.quant, args.remat, args.seq_len,
                                                            args.mesh or [[1, 1, 1]]):
        config = arch_config(arch)
        for backend in names:
            t0 = time.perf_counter()
            plan = plan_step_memory(config, batch_size=args.batch_size, seq_len=seq, quant=None if quant == "bf16" else quant,
                                    backend=backend, mesh_shape=mesh, remat=policy)
            yield {"model": arch, "base": quant, "remat": policy, "T": seq, "backend": backend,
                   "mesh": ",".join(map(str, mesh)), **_gib(plan), "compile s": round(time.perf_counter() - t0)}


def _target_rows(args: argparse.Namespace):
    from crma_jax.memory_plan import plan_for_target
    from crma_jax.targets import target_devices

    for name in args.target:
        target = resolve_target(name)
        devices = target_devices(target)
        for arch, quant, policy, seq, mesh in itertools.product(args.arch, args.quant, args.remat, args.seq_len,
                                                                args.mesh or [None]):
            plan = plan_for_target(arch_config(arch), target, remat=policy, mesh_shape=mesh,
                                   batch_size=args.batch_size, seq_len=seq, quant=None if quant == "bf16" else quant,
                                   devices=devices, roofline=args.roofline)
            figures = _gib(plan.plan) if plan.plan else dict.fromkeys(("weights", "arguments", "temp", "outputs", "total"), "-")
            yield {"model": arch, "base": quant, "T": seq, "target": name, "mesh": ",".join(map(str, plan.mesh_shape)),
                   "remat": f"auto -> {plan.policy}" if policy == "auto" else policy, **figures,
                   "usable GiB": plan.usable / 2**30, "fits": plan.fits, "tried (GiB beyond arguments)": plan.tried(unit=""),
                   "compiler": plan.error or "ok",
                   "compile s": round(plan.compile_seconds), **(roofline_columns(plan) if args.roofline else {})}


def roofline_columns(plan: Any) -> dict[str, Any]:
    """The roofline figures of a `TargetPlan` ("-" where its step could not be costed)."""
    bound, costs = plan.roofline, plan.costs
    if bound is None:
        return dict.fromkeys(("TFLOP/chip", "GB/chip", "counted by", "step ≥ ms", "bound by", "MFU ≤"), "-")
    return {"TFLOP/chip": costs.flops / 1e12, "GB/chip": "-" if costs.bytes_accessed is None else costs.bytes_accessed / 1e9,
            "counted by": "XLA:" + costs.counted_by.upper(), "step ≥ ms": bound.seconds * 1e3,
            "bound by": bound.bound_by, "MFU ≤": f"{100 * bound.mfu:.0f}%"}

