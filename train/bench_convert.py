"""Benchmark: converting SmolLM2-135M (fp32 safetensors) against plain reading and transformers.

Each contender runs in a fresh subprocess (so peak RSS is its own), after one untimed read that
warms the page cache, `--reps` times; we report the median wall time of the load itself and the
process's peak RSS, both absolute and above the RSS it had after imports.

    python -m crma_jax.train.bench_convert [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = {
    "safetensors.numpy.load_file": "read",
    "crma_jax.load_pretrained (fp32)": "ours",
    "crma convert (load + Orbax write)": "convert",
    "transformers from_pretrained": "hf",
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(kind: str, path: str) -> dict[str, float]:
    """Runs inside the child process: import, note RSS, time the load, note peak RSS."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if kind == "read":
        from safetensors.numpy import load_file

        def load() -> object:
            return load_file(str(Path(path) / "model.safetensors"))
    elif kind in ("ours", "convert"):
        import jax

        import crma_jax
        from crma_jax.convert.convert import convert_checkpoint

        def load() -> object:
            if kind == "convert":
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    return convert_checkpoint(path, Path(tmp) / "out", progress=False)
            return jax.block_until_ready(crma_jax.load_pretrained(path)[1])
    else:
        import torch
        from transformers import AutoModelForCausalLM

        def load() -> object:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    base = _rss_mb()
    t0 = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - t0
    peak = _rss_mb()
    del result
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return 0

    from crma_jax.convert.smollm2 import smollm2_hf_dir

    path = smollm2_hf_dir()
    ckpt_bytes = (path / "model.safetensors").stat().st_size
    (path / "model.safetensors").read_bytes()  # warm the page cache for every contender
    results = {}
    for label, kind in CONTENDERS.items():
        runs = []
        for _ in range(args.reps):
            out = subprocess.run(
                [sys.executable, "-m", "crma_jax.train.bench_convert", "--child", kind, str(path)],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[label] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    read_s = results["safetensors.numpy.load_file"]["seconds"]
    hf_s = results["transformers from_pretrained"]["seconds"]
    print(f"SmolLM2-135M fp32 safetensors: {ckpt_bytes / 1e6:.0f} MB; {platform.processor() or platform.machine()}, "
          f"median of {args.reps} fresh processes each")
    print("| contender | wall s | ×read | ×transformers | peak RSS MB | RSS above imports MB | (above imports)/ckpt |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        extra = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        print(f"| {label} | {r['seconds']:.2f} | {r['seconds'] / read_s:.2f} | {r['seconds'] / hf_s:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {extra:.0f} | {extra * 2**20 / ckpt_bytes:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_bytes": ckpt_bytes, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
