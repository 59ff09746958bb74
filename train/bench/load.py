"""`crma bench load`: peak memory of loading a TinyLlama-1.1B-shaped checkpoint with `quant="nf4"`.

    crma bench load [--dir DIR] [--quant nf4] [--reps 1]

A random bf16 TinyLlama-1.1B-shaped HF checkpoint (hidden 2048, intermediate 5632, 22 layers,
vocab 32000, untied) is made once with transformers from its config (in `--dir`, default a
temporary directory) and reloaded in fresh processes, alternating:

- `streaming`: `load_pretrained(dir, "bfloat16", quant=...)`, which quantizes each layer kernel
  as it is read;
- `dense`: `load_pretrained(dir, "bfloat16")` then `quantize_params`, the load before streaming.

Each child notes VmRSS after its imports, resets the high-water mark, loads, and reads VmHWM:
"peak above imports" is the load's own peak RSS. Issue target for streaming:
<= 1.3 x (NF4 model bytes + one layer's bf16 bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from crma_jax.train.bench.util import command_line, machine_note, proc_status, reset_peak_rss, run_child

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
WAYS = ("streaming", "dense")
MIB = 2**20


def make_checkpoint(out: Path) -> None:
    """A random bf16 TinyLlama-shaped checkpoint, drawn directly in bf16 by transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINYLLAMA), dtype=torch.bfloat16)
    model.save_pretrained(str(out))


def child(path: str, way: str, quant: str) -> dict[str, float]:
    import jax

    from crma_jax.adapters import quantize_params
    from crma_jax.pretrained import load_pretrained
    from crma_jax.quant import nbytes

    before = proc_status()
    reset_peak_rss()
    if way == "streaming":
        _, params = load_pretrained(path, "bfloat16", quant=quant)
    else:
        _, params = load_pretrained(path, "bfloat16")
        params = quantize_params(params, quant)
    jax.block_until_ready(params)
    after = proc_status()
    layer = sum(x.nbytes // TINYLLAMA["num_hidden_layers"] for x in jax.tree.leaves(params["layers"]))
    dense_layer = 2 * sum(int(x.size) for x in jax.tree.leaves(_dense_layer_shapes()))
    return {"peak_above_imports_mb": (after["VmHWM"] - before["VmRSS"]), "rss_after_mb": after["VmRSS"] - before["VmRSS"],
            "model_mb": nbytes(params) / MIB, "quant_layer_mb": layer / MIB, "bf16_layer_mb": dense_layer / MIB}


def _dense_layer_shapes() -> list[object]:
    import jax
    import numpy as np

    from crma_jax import Decoder
    from crma_jax.config import ModelConfig
    from crma_jax.hf_params import abstract_params

    shapes = abstract_params(Decoder(ModelConfig.from_hf({"model_type": "llama", **TINYLLAMA})))["layers"]
    return [np.empty(s.shape[1:], np.uint8) for s in jax.tree.leaves(shapes)]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the random checkpoint is made, or reused if it is already there "
                             "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--quant", choices=("nf4", "int8"), default="nf4", help="base storage (default: nf4)")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per way (default: 1)")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "WAY"), help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.quant)))
        return 0
    print(f"$ {command_line()}")
    print(machine_note())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.dir or Path(tmp) / "tinyllama-random"
        if not (ckpt / "config.json").is_file():
            print(f"making a random bf16 TinyLlama-1.1B-shaped checkpoint in {ckpt} ...", flush=True)
            make_checkpoint(ckpt)
        runs: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
        for _ in range(args.reps):
            for way in WAYS:
                runs[way].append(run_child("load", "--quant", args.quant, "--child", str(ckpt), way))
    res = {w: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for w, rs in runs.items()}
    print(f"TinyLlama-1.1B shapes (random bf16 weights), quant={args.quant}, median of {args.reps} fresh processes")
    print("| load | peak above imports MiB | RSS after MiB | model MiB |")
    print("|---|---|---|---|")
    for w, r in res.items():
        print(f"| {w} | {r['peak_above_imports_mb']:.0f} | {r['rss_after_mb']:.0f} | {r['model_mb']:.0f} |")
    s = res["streaming"]
    budget = 1.3 * (s["model_mb"] + s["bf16_layer_mb"])
    print(f"streaming peak / (model + one bf16 layer = {s['model_mb']:.0f} + {s['bf16_layer_mb']:.0f} MiB): "
          f"{s['peak_above_imports_mb'] / (s['model_mb'] + s['bf16_layer_mb']):.2f} (target <= 1.3, i.e. <= {budget:.0f} MiB); "
          f"streaming / dense peak: {s['peak_above_imports_mb'] / res['dense']['peak_above_imports_mb']:.2f}")
    return 0
