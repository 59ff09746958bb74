"""`crma bench memory`: plan a training step's memory from abstract shapes, with no weights.

    crma bench memory --arch mistral-7b --quant nf4 --seq-len 2048 --remat full
    crma bench memory --table            # the BENCHMARKS.md grid: 3 models x {bf16, nf4} x remat x T

Each row is XLA's buffer plan of one `crma train` step (LoRA r=8 on all 7 projections + CRMA
rank 4, ZClip + AdamW, bf16 compute), compiled from ShapeDtypeStructs on each backend asked for:
arguments (frozen base + adapters + optimizer state + batch), temporaries, outputs, and the total
less the donated buffers. Nothing is allocated, so a 9B plan runs on a laptop.
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp

from crma_jax.memory_plan import ARCHS, arch_config, plan_step_memory
from crma_jax.model import REMAT_POLICIES
from crma_jax.train.bench_util import command_line, machine_note

TABLE = {"arch": ("tinyllama", "mistral-7b", "gemma2-9b"), "quant": ("bf16", "nf4"),
         "remat": ("none", "full", "save_dot_except_mlp"), "seq_len": (2048, 8192)}


def _csv(kind: type) -> object:
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=_csv(str), default=["mistral-7b"],
                        help=f"comma-separated: {', '.join(ARCHS)} or a path to an HF config.json (default: mistral-7b)")
    parser.add_argument("--quant", type=_csv(str), default=["nf4"],
                        help="comma-separated base storage: bf16, nf4, int8 (default: nf4)")
    parser.add_argument("--remat", type=_csv(str), default=["full"],
                        help=f"comma-separated policies: {', '.join(REMAT_POLICIES)} (default: full)")
    parser.add_argument("--seq-len", type=_csv(int), default=[2048], help="comma-separated T (default: 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="global batch size B (default: 1)")
    parser.add_argument("--mesh", type=_csv(int), nargs="+", default=[[1, 1, 1]], metavar="D,F,M",
                        help="(data, fsdp, model) mesh shapes to plan on, per device (default: 1,1,1); a CPU plan "
                             "of N devices needs XLA_FLAGS=--xla_force_host_platform_device_count=N")
    parser.add_argument("--backend", type=_csv(str), default=None,
                        help="comma-separated JAX backends to plan on, e.g. cpu,gpu (default: every one present)")
    parser.add_argument("--table", action="store_true", help="the full grid recorded in BENCHMARKS.md (on each --mesh)")


def backends(asked: list[str] | None) -> list[str]:
    present = []
    for name in ("cpu", "gpu", "tpu"):
        try:
            jax.devices(name)
            present.append(name)
        except RuntimeError:
            continue
    return asked or present


def run(args: argparse.Namespace) -> int:
    grid = TABLE if args.table else {"arch": args.arch, "quant": args.quant, "remat": args.remat,
                                     "seq_len": args.seq_len}
    for policy in grid["remat"]:
        if policy not in REMAT_POLICIES:
            raise ValueError(f"--remat {policy!r}: choose from {', '.join(REMAT_POLICIES)}")
    print(f"$ {command_line()}")
    print(f"machine: {machine_note()}; jax {jax.__version__}")
    print(f"one training step, LoRA r=8 x7 + CRMA 4, bf16 compute, B={args.batch_size}; GiB from "
          "compile().memory_analysis() on abstract shapes")
    for mesh in args.mesh:
        if len(mesh) != 3 or min(mesh) < 1:
            raise ValueError(f"--mesh {','.join(map(str, mesh))}: need D,F,M, three positive sizes")
    print("| model | base | remat | T | backend | mesh | weights | arguments | temp | outputs | total | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, quant, policy, seq, mesh in itertools.product(grid["arch"], grid["quant"], grid["remat"], grid["seq_len"],
                                                            args.mesh):
        config = arch_config(arch)
        for backend in backends(args.backend):
            t0 = time.perf_counter()
            plan = plan_step_memory(config, batch_size=args.batch_size, seq_len=seq,
                                    quant=None if quant == "bf16" else quant, dtype=jnp.bfloat16,
                                    backend=backend, mesh_shape=mesh, remat=policy)
            g = plan.gib()
            print(f"| {arch} | {quant} | {policy} | {seq} | {backend} | {','.join(map(str, mesh))} | "
                  f"{g['weights']:.2f} | {g['argument']:.2f} | {g['temp']:.2f} | {g['output']:.2f} | "
                  f"**{g['total']:.2f}** | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0
