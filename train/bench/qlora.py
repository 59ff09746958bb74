"""Benchmark: peak RSS of one QLoRA training step, NF4 base vs bf16 base, TinyLlama-1.1B shapes.

    crma bench qlora [--batch-size 1] [--seq-len 128] [--reps 1] [--remat full]

A random TinyLlama-1.1B-shaped model (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000, untied head), built without transformers: shapes from `jax.eval_shape` of
`Decoder.init`, then every leaf drawn directly in bfloat16 (no float32 copy of the model ever
exists); with `nf4`, each stacked projection kernel is quantized (`quantize_params`, double
quantization) right after it is drawn and the bf16 copy dropped. Compute dtype bf16, LoRA r=8 on
all 7 targets + CRMA rank 4, our optimizer, B x T random tokens. Each kind runs in a fresh
subprocess; kinds are interleaved over `--reps`.

Memory is the kernel's own accounting of this process (/proc/self/status): after setup and AOT
compilation we note VmRSS, reset the high-water mark (`/proc/self/clear_refs` <- 5), run ONE
step, block, and read VmHWM. So "step peak" is the process's true peak RSS during the step
(weights + optimizer state + runtime + everything the step allocates), and "step increase" is
what the step added on top of what was resident before it; setup's own peak (drawing and
quantizing weights, compiling) is reported apart. Issue target: NF4 step peak <= 0.45x bf16's.
`bf16-bits` is the bf16 base stored as its uint16 bits (`store_as_bits`), as `crma train` stores
it on a CPU, where XLA would otherwise convert the stacked bf16 kernels to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from crma_jax.model import REMAT_POLICIES
from crma_jax.train.bench.util import command_line, run_child

KINDS = ("nf4", "bf16", "bf16-bits")  # bf16-bits: stored as uint16 bits, as `crma train` does on a CPU


def status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def child(kind: str, batch: int, seq: int, remat: str) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from crma_jax import (
        CRMAConfig,
        Decoder,
        LoraConfig,
        ModelConfig,
        init_adapters,
        param_labels,
        quantize_params,
    )
    from crma_jax.adapters import store_as_bits
    from crma_jax.optim import make_optimizer
    from crma_jax.quant import nbytes
    from crma_jax.sharding import make_mesh
    from crma_jax.train_step import jit_train_step, make_train_step

    cfg = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                      num_heads=32, num_kv_heads=4, head_dim=64, tie_word_embeddings=False)
    model = Decoder(cfg, dtype=jnp.bfloat16, lora_config=LoraConfig(rank=8, alpha=16.0), crma_config=CRMAConfig(rank=4), remat=remat)
    ids1 = jnp.zeros((1, 1), jnp.int32)
    shapes = traverse_util.flatten_dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids1))["params"])
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, jnp.bfloat16), static_argnums=1)
    flat = {}
    for i, (path, spec) in enumerate(shapes.items()):
        leaf = jnp.ones(spec.shape, jnp.bfloat16) if path[-1] == "scale" else draw(jax.random.PRNGKey(i), spec.shape)
        if kind.startswith("nf4") and path[0] == "layers" and path[-1] == "kernel":
            leaf = quantize_params({"layers": {"k": {"kernel": leaf}}}, "nf4")["layers"]["k"]["kernel"]
        flat[path] = jax.block_until_ready(leaf)
    params = traverse_util.unflatten_dict(flat)
    if kind == "bf16-bits":
        params = store_as_bits(params)
    del flat, leaf
    trainable = init_adapters(model, params, jax.random.PRNGKey(1))
    lr = {"lora_a": 2e-4, "lora_b": 2e-4, "crma_read_mix": 1e-3, "crma_gate": 1e-2}
    opt = make_optimizer(param_labels(trainable), lr, total_steps=0)
    opt_state = jax.tree.map(jnp.copy, opt.init(trainable))  # distinct buffers: the step donates them
    step, sh = jit_train_step(make_train_step(model, opt), make_mesh((1, 1, 1)), trainable, opt_state, params)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, seq), 0, cfg.vocab_size)
    data = {"input_ids": tokens, "segment_ids": jnp.ones((batch, seq), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
            "loss_mask": jnp.ones((batch, seq), jnp.int32)}
    rng = jax.random.PRNGKey(3)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, params, data, rng, {}).compile()
    compile_s = time.perf_counter() - t0
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20  # XLA's own buffer plan
    setup = status()
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    trainable, opt_state, metrics = compiled(trainable, opt_state, params, data, rng, {})
    loss = float(jax.block_until_ready(metrics["loss"]))
    step_s = time.perf_counter() - t0
    after = status()
    return {"base_weights_mb": nbytes(params) / 2**20, "setup_peak_mb": setup["VmHWM"], "rss_before_step_mb": setup["VmRSS"],
            "step_peak_mb": after["VmHWM"], "step_increase_mb": after["VmHWM"] - setup["VmRSS"],
            "step_s": step_s, "compile_s": compile_s, "loss": loss, "xla_temp_mb": temp_mb}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=1, help="batch size B (default: 1)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length T (default: 128)")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per base kind (default: 1)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full",
                        help="remat policy of the step (default: full, the leanest, which crma train's "
                             "--remat auto falls back to when memory is short)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(child(args.child, args.batch_size, args.seq_len, args.remat)))
        return 0
    print(f"$ {command_line()}")
    print(f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (before)")
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for _ in range(args.reps):
        for kind in KINDS:
            runs[kind].append(run_child("qlora", "--child", kind, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                                        "--remat", args.remat))
    res = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    print(f"TinyLlama-1.1B shapes (random weights), bf16 compute, LoRA r=8 x7 + CRMA 4, B={args.batch_size}, "
          f"T={args.seq_len}, remat {args.remat}; one step in a fresh process, median of {args.reps}")
    print("| base | base weights MiB | setup peak MiB | RSS before step MiB | step peak MiB | step increase MiB | "
          "XLA temp MiB | step s | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r['base_weights_mb']:.0f} | {r['setup_peak_mb']:.0f} | {r['rss_before_step_mb']:.0f} | "
              f"{r['step_peak_mb']:.0f} | {r['step_increase_mb']:.0f} | {r['xla_temp_mb']:.0f} | {r['step_s']:.2f} | {r['loss']:.3f} |")
    nf4 = res["nf4"]
    for name in ("bf16", "bf16-bits"):
        bf16 = res[name]
        print(f"NF4 / {name}: step peak {nf4['step_peak_mb'] / bf16['step_peak_mb']:.2f} (target <= 0.45), "
              f"step increase {nf4['step_increase_mb'] / bf16['step_increase_mb']:.2f}, "
              f"base weights {nf4['base_weights_mb'] / bf16['base_weights_mb']:.2f}")
    return 0

