"""`crma bench memory`: plan a training step's memory from abstract shapes, with no weights.

    crma bench memory --arch mistral-7b --quant nf4 --seq-len 2048 --remat full
    crma bench memory --arch mistral-7b --target a10g,v5e-1,h100 --remat auto
    crma bench memory --table            # the BENCHMARKS.md grid: 3 models x {bf16, nf4} x remat x T
    crma bench memory --arch tinyllama --target h100,v5e-4 --columns model,target,total,fits,"MFU ≤"
    XLA_FLAGS=--xla_force_host_platform_device_count=8 crma bench memory --arch mistral-7b,tinyllama \
        --target v5e-8,h100 --per-chip-batch 1 --cpu-beside --append grid.jsonl   # resumable: rerun it

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
compiler plans, not measurements on the device. `--cpu-beside` adds XLA:CPU's plan of each
row's step (same mesh and policy) on this machine's CPU devices, once per distinct step.
`--append FILE` writes each row to FILE as a JSON line once it is compiled and takes the rows
FILE already holds from there instead of compiling them again, so a grid of many compiles can be
stopped and rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from typing import Any

from crma_jax.memory_plan import ARCHS, arch_config, plan_step_memory
from crma_jax.model import REMAT_POLICIES
from crma_jax.targets import TARGETS, resolve_target
from crma_jax.train.bench.util import command_line, cpu_model, machine_note
from crma_jax.train.jsonl import cut_damaged_end, read_lines

# The columns of a row, in the order printed: `--columns` picks among them, by these names.
PLAN_COLUMNS = ("weights", "arguments", "temp", "outputs", "total")
ROOFLINE_COLUMNS = ("TFLOP/chip", "GB/chip", "counted by", "step ≥ ms", "bound by", "MFU ≤")
TARGET_COLUMNS = ("model", "base", "T", "B", "target", "mesh", "remat", *PLAN_COLUMNS, "usable GiB", "fits",
                  "tried (GiB beyond arguments)", "compiler", "compile s", *ROOFLINE_COLUMNS, "CPU GiB", "compiled on")
BACKEND_COLUMNS = ("model", "base", "remat", "T", "backend", "mesh", *PLAN_COLUMNS, "compile s")

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
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=1, help="global batch size B (default: 1)")
    batch.add_argument("--per-chip-batch", type=int, default=None, metavar="N",
                       help="with --target, B = N rows for each chip the batch splits over (data x fsdp of the "
                            "row's mesh), in place of --batch-size")
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
    parser.add_argument("--cpu-beside", action="store_true",
                        help="with --target, also plan each row's step (same B, mesh and remat policy) with XLA:CPU "
                             "on this machine: column 'CPU GiB' (a mesh of N chips needs "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    parser.add_argument("--append", default=None, metavar="FILE",
                        help="with --target, append each row to FILE as a JSON line once compiled, and take rows "
                             "FILE already holds (same model config, base, T, target, mesh, remat, batch, roofline "
                             "and --cpu-beside, and the same jax) from it instead of compiling them: rerun the same "
                             "command to continue a long grid")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    parser.add_argument("--columns", type=_csv(str), default=None, metavar="NAME,...",
                        help="print only these columns, in this order, named as the table's header names them "
                             "(with --target: " + ", ".join(TARGET_COLUMNS) + "; else: " + ", ".join(BACKEND_COLUMNS)
                             + "); --append still records whole rows (default: every column)")
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
    if not args.target:
        for flag, value in (("--per-chip-batch", args.per_chip_batch), ("--cpu-beside", args.cpu_beside or None),
                            ("--append", args.append)):
            if value is not None:
                raise ValueError(f"{flag} needs --target")
    if args.per_chip_batch is not None and args.per_chip_batch < 1:
        raise ValueError(f"--per-chip-batch {args.per_chip_batch}: need at least 1")
    if args.append:
        import pathlib

        if not pathlib.Path(args.append).parent.is_dir():
            raise ValueError(f"--append {args.append}: no directory {pathlib.Path(args.append).parent}")
    for arch in args.arch:
        arch_config(arch)
    offered = _offered_columns(args)
    unknown = [c for c in args.columns or () if c not in offered]
    if unknown:
        raise ValueError(f"--columns: no column {unknown[0]!r} in this table; choose from {', '.join(offered)}")


def _offered_columns(args: argparse.Namespace) -> tuple[str, ...]:
    """The columns this invocation's rows have."""
    if not args.target:
        return BACKEND_COLUMNS
    return tuple(c for c in TARGET_COLUMNS if (args.roofline or c not in ROOFLINE_COLUMNS)
                 and (args.cpu_beside or c != "CPU GiB"))


def run(args: argparse.Namespace) -> int:
    if args.remat is None:
        args.remat = ["auto"] if args.target else ["full"]
    if args.table:
        args.arch, args.quant, args.remat, args.seq_len = (list(TABLE[k]) for k in ("arch", "quant", "remat", "seq_len"))
    _check(args)
    if args.target:
        from crma_jax import targets

        targets.prepare_host()  # before JAX starts a backend
        if args.cpu_beside:
            _check_cpu_devices(args)
        # Read before any output or compile: a file that is not this command's rows fails here.
        rows = _target_rows(args, _done_rows(args.append) if args.append else {})
    else:
        rows = _backend_rows(args, backends(args.backend))
    if not args.json:
        import jax

        print(f"$ {command_line()}")
        print(f"machine: {machine_note()}; jax {jax.__version__}")
        batch = f"{args.per_chip_batch} row(s) per chip" if args.per_chip_batch else f"B={args.batch_size}"
        print(f"one training step, LoRA r=8 x7 + CRMA 4, bf16 compute, {batch}; GiB per device from "
              "compile().memory_analysis() on abstract shapes" + ("; compiler plans for targets this machine does "
                                                                  "not have" if args.target else ""))
    header = args.columns or list(_offered_columns(args))
    if not args.json:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for row in rows:
        if args.json:
            print(json.dumps({k: row[k] for k in header}), flush=True)
            continue
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


_ROW = b'{"key": '  # how each line --append writes (json.dumps of {"key": ..., "row": ...}) begins


def _parse_row(line: bytes) -> tuple[str, dict[str, Any]] | None:
    try:
        record = json.loads(line)
        return record["key"], record["row"]
    except (ValueError, KeyError, TypeError):
        return None


def _done_rows(path: str) -> dict[str, dict[str, Any]]:
    """The rows an earlier `--append` run wrote to `path`, by key ({} when there is no file).

    A last line cut by a stop as it was written is cut off the file (its row is compiled again);
    any other line that is not such a row is an error, and the file is left as it is."""
    import pathlib

    file = pathlib.Path(path)
    if not file.exists():
        return {}
    lines = read_lines(file, _parse_row)
    # A last line without its newline is a row cut as it was written if it begins as rows do.
    cut_row = lines.cut is not None and _ROW.startswith(lines.tail[:len(_ROW)])
    foreign = [*lines.unreadable, *([lines.cut] if lines.cut is not None and not cut_row else [])]
    if foreign:
        raise ValueError(f"--append {path}: line {foreign[0]} is not a row this command wrote; name a new file")
    cut_damaged_end(file, lines)
    return dict(lines.records)


def _row_key(args: argparse.Namespace, arch: str, quant: str, seq: int, target: str, mesh: tuple[int, ...],
             policy: str, batch: int) -> str:
    """What a row depends on: a config file's content, not its path, and the jax that compiled it."""
    import hashlib
    import pathlib

    import jax

    config = hashlib.sha256(pathlib.Path(arch).read_bytes()).hexdigest() if arch not in ARCHS else arch
    return json.dumps([config, quant, seq, target, mesh, policy, batch, args.roofline, args.cpu_beside, jax.__version__])


def _target_rows(args: argparse.Namespace, done: dict[str, dict[str, Any]]):
    """One row per target x arch x quant x remat x T x mesh; a row whose key is in `done` (read back
    from `--append`'s file) is taken from there, any other is compiled and appended to the file."""
    from crma_jax.memory_plan import plan_for_target
    from crma_jax.targets import target_devices

    # Targets with the same mesh and batch often run the same policy: XLA:CPU plans that step once.
    cpu_plans = {_cpu_plan_key(key, row): row["CPU GiB"] for key, row in done.items()
                 if isinstance(row.get("CPU GiB"), float)}
    for name in args.target:
        target = resolve_target(name)
        devices = target_devices(target)
        for arch, quant, policy, seq, mesh in itertools.product(args.arch, args.quant, args.remat, args.seq_len,
                                                                args.mesh or [None]):
            mesh = tuple(mesh) if mesh is not None else (1, len(devices), 1)
            batch = args.per_chip_batch * mesh[0] * mesh[1] if args.per_chip_batch else args.batch_size
            key = _row_key(args, arch, quant, seq, name, mesh, policy, batch)
            if key in done:
                yield done[key]
                continue
            plan = plan_for_target(arch_config(arch), target, remat=policy, mesh_shape=mesh,
                                   batch_size=batch, seq_len=seq, quant=None if quant == "bf16" else quant,
                                   devices=devices, roofline=args.roofline)
            figures = _gib(plan.plan) if plan.plan else dict.fromkeys(PLAN_COLUMNS, "-")
            row = {"model": arch, "base": quant, "T": seq, "B": batch, "target": name,
                   "mesh": ",".join(map(str, plan.mesh_shape)),
                   "remat": f"auto -> {plan.policy}" if policy == "auto" else policy, **figures,
                   "usable GiB": plan.usable / 2**30, "fits": plan.fits, "tried (GiB beyond arguments)": plan.tried(unit=""),
                   "compiler": plan.error or "ok",
                   "compile s": round(plan.compile_seconds), **(roofline_columns(plan) if args.roofline else {})}
            if args.cpu_beside:
                cpu_key = _cpu_plan_key(key, row)
                if cpu_key not in cpu_plans:
                    cpu_plans[cpu_key] = _cpu_plan(arch, quant, seq, batch, mesh, plan.policy)
                row["CPU GiB"] = cpu_plans[cpu_key]
            row["compiled on"] = cpu_model()  # a rerun of an --append grid may take rows from other machines
            if args.append:
                with open(args.append, "a") as file:
                    file.write(json.dumps({"key": key, "row": row}) + "\n")
            yield row


def _cpu_plan_key(key: str, row: dict[str, Any]) -> str:
    """What XLA:CPU's plan beside a row depends on: the row's key (`_row_key`) without the target
    and the output options, with the policy the row runs (`auto`'s choice) for the one asked."""
    config, quant, seq, _target, mesh, _asked, batch, _roofline, _cpu_beside, version = json.loads(key)
    return json.dumps([config, quant, seq, mesh, row["remat"].removeprefix("auto -> "), batch, version])


def _check_cpu_devices(args: argparse.Namespace) -> None:
    import jax

    have = len(jax.devices("cpu"))
    for name in args.target:
        chips = resolve_target(name).chips
        for mesh in args.mesh or [(1, chips, 1)]:
            if math.prod(mesh) > have:
                raise ValueError(f"--cpu-beside: the {name} mesh {','.join(map(str, mesh))} needs {math.prod(mesh)} CPU "
                                 f"devices and this process has {have}; set "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(mesh)}")


def _cpu_plan(arch: str, quant: str, seq: int, batch: int, mesh: tuple[int, ...], policy: str) -> float | str:
    """XLA:CPU's total GiB per device for the same step on this machine's CPU devices, or the first
    line of XLA's error (so that a long grid records it and goes on)."""
    try:
        plan = plan_step_memory(arch_config(arch), batch_size=batch, seq_len=seq,
                                quant=None if quant == "bf16" else quant, backend="cpu", mesh_shape=mesh, remat=policy)
    except RuntimeError as e:  # XLA's runtime error, e.g. out of host memory while compiling
        return str(e).splitlines()[0]
    return plan.gib()["total"]


def roofline_columns(plan: Any) -> dict[str, Any]:
    """The roofline figures of a `TargetPlan` ("-" where its step could not be costed)."""
    bound, costs = plan.roofline, plan.costs
    if bound is None:
        return dict.fromkeys(ROOFLINE_COLUMNS, "-")
    return {"TFLOP/chip": costs.flops / 1e12, "GB/chip": "-" if costs.bytes_accessed is None else costs.bytes_accessed / 1e9,
            "counted by": "XLA:" + costs.counted_by.upper(), "step ≥ ms": bound.seconds * 1e3,
            "bound by": bound.bound_by, "MFU ≤": f"{100 * bound.mfu:.0f}%"}

