"""Benchmark: converting SmolLM2-135M (fp32 safetensors) against plain reading and transformers.

    crma bench convert [--reps 3] [--json out.json]
    crma bench convert --phases [--reps 7]    # where our loader's time goes

Each contender runs in a fresh subprocess (so peak RSS is its own); the contenders are
interleaved (A, B, C, D, A, B, ...) and each is run `--reps` times; the page cache is warmed once
before the first run. We report the median wall time of the load itself (imports excluded) and
the process's peak RSS during the load, both absolute and above the RSS it had after imports.

Peak RSS is the kernel's `VmHWM`, reset (`/proc/self/clear_refs` <- 5) after the imports.
`getrusage(RUSAGE_SELF).ru_maxrss` is NOT used: Linux carries it across fork + exec, so a child
starts with its parent's RSS as its "peak" and small loads read as 0 MB.
transformers 5 hands back fp32 parameters as views of the mmapped file (read lazily), so its
plain row reads no weights; "+ touch all params" reads each once, as any use of the model would.
Issue targets: ours <= 1.5x safetensors.numpy, <= 1x transformers; peak RSS above imports
<= 1.3x the checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from crma_jax.train.bench.util import (
    command_line,
    cpu_env,
    machine_note,
    proc_status,
    reset_peak_rss,
)

CONTENDERS = {
    "safetensors.numpy.load_file": "read",
    "crma_jax.load_pretrained (fp32)": "ours",
    "crma convert (load + Orbax write)": "convert",
    "transformers from_pretrained": "hf",
    "transformers from_pretrained + touch all params": "hf_touch",
}
# `--phases`: a replica of `hf_params.assemble_params` with a timer per phase, and two variants
# of its last line (how the host buffer becomes a jax.Array).
PHASE_VARIANTS = ("jnp.asarray", "jax.device_put", "aligned+device_put")


def run_one(kind: str, path: str) -> dict[str, float]:
    """Runs inside the child process: import, reset the peak, time the load, read the peak."""
    if kind == "read":
        from safetensors.numpy import load_file

        def load() -> object:
            return load_file(str(Path(path) / "model.safetensors"))
    elif kind in ("ours", "convert"):
        import tempfile

        import jax
        from crma_jax.convert.convert import convert_checkpoint

        import crma_jax

        def load() -> object:
            if kind == "convert":
                with tempfile.TemporaryDirectory() as tmp:
                    return convert_checkpoint(path, Path(tmp) / "out", progress=False)
            return jax.block_until_ready(crma_jax.load_pretrained(path)[1])
    elif kind in PHASE_VARIANTS:
        return phases(kind, path)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        def load() -> object:
            # transformers 5 returns fp32 parameters as views of the mmapped file: nothing is
            # read until used. "hf_touch" reads every parameter once (a sum) to pay for that.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if kind == "hf_touch":
                with torch.no_grad():
                    sum(float(p.sum()) for p in model.parameters())
            return model

    before = proc_status()
    reset_peak_rss()
    t0 = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - t0
    after = proc_status()  # `result` is still alive here
    del result
    return {
        "seconds": seconds,
        "peak_rss_mb": after["VmHWM"],
        "rss_after_imports_mb": before["VmRSS"],
        "anon_after_mb": after["RssAnon"],
        "file_after_mb": after["RssFile"],
    }


def phases(variant: str, path: str) -> dict[str, float]:
    """Seconds per phase of loading `path` the way `assemble_params` does, ending with `variant`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from crma_jax.hf_params import abstract_params, hf_names
    from crma_jax.model import Decoder
    from crma_jax.pretrained import config_from_hf, open_source

    before = proc_status()
    reset_peak_rss()
    t: dict[str, float] = dict.fromkeys(("backend", "abstract_params", "host_copy", "to_device"), 0.0)
    t0 = time.perf_counter()
    jnp.zeros(()).block_until_ready()
    t["backend"] = time.perf_counter() - t0
    source = open_source(path)
    model = Decoder(config_from_hf(source.hf_config(), path))
    t1 = time.perf_counter()
    flat = traverse_util.flatten_dict(abstract_params(model))
    t["abstract_params"] = time.perf_counter() - t1
    out = {}
    for leaf, spec in flat.items():
        t1 = time.perf_counter()
        names, transpose = hf_names(leaf, model.config.num_layers)
        if variant == "aligned+device_put":  # 64-byte aligned: XLA:CPU adopts it without a copy
            raw = np.empty(int(np.prod(spec.shape)) * 4 + 64, np.uint8)
            off = -raw.ctypes.data % 64
            buf = raw[off:off + raw.size - 64].view(np.float32).reshape(spec.shape)
        else:
            buf = np.empty(spec.shape, np.float32)
        for i, name in enumerate(names):
            tensor = source.get(name)
            buf[i if leaf[0] == "layers" else ...] = tensor.T if transpose else tensor
        t2 = time.perf_counter()
        out[leaf] = (jnp.asarray(buf) if variant == "jnp.asarray" else jax.device_put(buf)).block_until_ready()
        t["host_copy"] += t2 - t1
        t["to_device"] += time.perf_counter() - t2
        del buf
    t["seconds"] = time.perf_counter() - t0
    after = proc_status()
    return {**t, "peak_rss_mb": after["VmHWM"], "rss_after_imports_mb": before["VmRSS"],
            "anon_after_mb": after["RssAnon"], "file_after_mb": after["RssFile"]}


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per contender (default: 3)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--phases", action="store_true", help="time the phases of our loader instead")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return 0

    from crma_jax.convert.smollm2 import smollm2_hf_dir

    path = smollm2_hf_dir()
    ckpt = path / "model.safetensors"
    ckpt_mb = ckpt.stat().st_size / 2**20
    warm_page_cache(ckpt)
    print(f"$ {command_line()}")
    print(f"machine: {machine_note()} (before)")
    contenders = {f"assemble_params replica, ending {v}": v for v in PHASE_VARIANTS} if args.phases else CONTENDERS
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in contenders}
    for _ in range(args.reps):
        for label, kind in contenders.items():  # interleaved: A, B, C, D, A, B, ...
            cmd = [sys.executable, "-m", "crma_jax.train.cli", "bench", "convert", "--child", kind, str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env())
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{label}: child exited with {out.returncode}")
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    if args.phases:
        print(f"machine: {machine_note()} (after)")
        print(f"our loader's phases, median s of {args.reps} fresh processes each, interleaved")
        print("| variant | backend init | abstract_params | host copy (memmap -> buf) | to device | total | "
              "peak above imports MiB |")
        print("|---|---|---|---|---|---|---|")
        for label, r in results.items():
            print(f"| {label} | {r['backend']:.3f} | {r['abstract_params']:.3f} | {r['host_copy']:.3f} | "
                  f"{r['to_device']:.3f} | {r['seconds']:.3f} | {r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} |")
        return 0
    read_s = results["safetensors.numpy.load_file"]["seconds"]
    hf_s = results["transformers from_pretrained"]["seconds"]
    print(f"machine: {machine_note()} (after)")
    print(f"SmolLM2-135M fp32 safetensors: {ckpt_mb:.0f} MiB; median of {args.reps} fresh processes each, interleaved")
    print("| contender | wall s | ×read | ×transformers | peak RSS MiB | peak above imports MiB | "
          "(above imports)/ckpt | anon / file RSS after load MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        extra = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        print(f"| {label} | {r['seconds']:.2f} | {r['seconds'] / read_s:.2f} | {r['seconds'] / hf_s:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {extra:.0f} | {extra / ckpt_mb:.2f} | "
              f"{r['anon_after_mb']:.0f} / {r['file_after_mb']:.0f} |")
    print("per-run wall s: " + "; ".join(
        label + ": " + ", ".join(f"{r['seconds']:.2f}" for r in rs) for label, rs in runs.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_mib": ckpt_mb, "results": results, "runs": runs}, indent=2))
    return 0

