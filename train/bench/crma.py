"""Benchmark: what CRMA costs. (i) forward-pass time on SmolLM2-135M, (ii) parameter counts.

    crma bench crma [--reps 10] [--batch-size 4] [--seq-len 256]

(i) The real SmolLM2-135M (fp32 HF directory made from the GGUF), B x T random tokens, float32,
CPU. Both contenders carry the SAME LoRA (r=8 on q,k,v,o,gate,up,down) and the same base
weights; one adds CRMA rank 4 after every layer (diagnostics off, as at inference). Each is a
jitted `model.apply`; after one compile call each, reps are interleaved (A, B, A, B, ...) and we
report median and min step time and the ratio of medians (issue target <= 1.03). A second pair
without LoRA in either is reported too.
(ii) Trainable parameters of CRMA rank 4 vs LoRA r=8 on all 7 targets for SmolLM2-135M,
TinyLlama-1.1B and Mistral-7B shapes, from `jax.eval_shape` of `Decoder.init` (no weights).
(iii) The gradient of CRMA's orthonormal streams U wrt `read`: autodiff of `jnp.linalg.qr` (what
CRMA used before commit 15a87ef; it dominated CRMA's backward in training), a custom VJP for the
same Q (`qr_q`), and the library's current Gram-Schmidt, each in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from crma_jax.train.bench.util import command_line, cpu_env

import crma_jax
from crma_jax import CRMAConfig, Decoder, LoraConfig, ModelConfig, count_params

SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 49152, True),
    "TinyLlama-1.1B": (2048, 5632, 22, 32, 4, 32000, False),
    "Mistral-7B": (4096, 14336, 32, 32, 8, 32000, False),
}


def model_config(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, tie_word_embeddings=tied,
    )


def param_counts(lora: LoraConfig, crma: CRMAConfig) -> list[tuple[str, int, int, int]]:
    """(model, base params, LoRA params, CRMA params) per shape, from an abstract init."""
    rows = []
    for name, shape in SHAPES.items():
        model = Decoder(model_config(*shape), lora_config=lora, crma_config=crma)
        ids = jnp.zeros((1, 1), jnp.int32)
        tree = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), ids))
        rows.append((name, count_params({"params": tree["params"]})["frozen"],
                     count_params({"lora": tree["lora"]})["trainable"], count_params({"crma": tree["crma"]})["trainable"]))
    return rows


@jax.custom_vjp
def qr_q(a: jax.Array) -> jax.Array:
    """PROPOSAL for `crma.mixing_operator`: Q of `jnp.linalg.qr(a)` (same forward, same Q), with a
    backward that inverts the (n, n) R once instead of a triangular solve against the (d, n) matrix.
    For A = QR, Q̄ given: G = QᵀQ̄, X̄ = Q̄ − QG + Q·tril(G − Gᵀ, −1), Ā = X̄ R⁻ᵀ."""
    return jnp.linalg.qr(a)[0]


def _qr_fwd(a: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    q, r = jnp.linalg.qr(a)
    return q, (q, r)


def _qr_bwd(res: tuple[jax.Array, jax.Array], q_bar: jax.Array) -> tuple[jax.Array]:
    q, r = res
    r_inv = jax.scipy.linalg.solve_triangular(r, jnp.eye(r.shape[0], dtype=r.dtype), lower=False)
    g = q.T @ q_bar
    return ((q_bar - q @ g + q @ jnp.tril(g - g.T, -1)) @ r_inv.T,)


qr_q.defvjp(_qr_fwd, _qr_bwd)


def qr_backward(reps: int) -> dict[str, Any]:
    """Gradient of sum(U * g) wrt `read` (576, 4), interleaved: autodiff of `jnp.linalg.qr` (CRMA
    before commit 15a87ef), `qr_q`, and the library's current Gram-Schmidt `orthonormal_columns`."""
    from crma_jax.crma import orthonormal_columns

    read, g = jax.random.normal(jax.random.PRNGKey(0), (2, 576, 4))
    fns = {name: jax.jit(jax.grad(lambda a, g_, f=f: jnp.sum(f(a) * g_))) for name, f in
           (("qr", lambda a: jnp.linalg.qr(a)[0]), ("qr_q", qr_q), ("gram_schmidt", orthonormal_columns))}
    diff = float(jnp.max(jnp.abs(fns["qr"](read, g) - fns["qr_q"](read, g))))
    times = time_interleaved({k: (lambda f=f: f(read, g)) for k, f in fns.items()}, reps)
    return {"max_abs_diff": diff, **{k: statistics.median(v) for k, v in times.items()}}


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Compile/warm each once, then `reps` rounds of A, B, ... (each call blocked on)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def forward_pairs(batch: int, seq: int, reps: int, lora: LoraConfig, crma: CRMAConfig) -> dict[str, list[float]]:
    from crma_jax.convert.smollm2 import smollm2_hf_dir

    model, variables = crma_jax.load_pretrained(smollm2_hf_dir(), dtype="float32", lora_config=lora, crma_config=crma)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)), jnp.int32)
    base = model.clone(lora_config=None, crma_config=None)
    lora_only = model.clone(crma_config=None)
    crma_only = model.clone(lora_config=None)
    p = variables["params"]

    def fwd(m: Decoder, v: dict[str, Any]) -> Callable[[], Any]:
        f = jax.jit(lambda v_, x: m.apply(v_, x))
        return lambda: f(v, ids)

    return time_interleaved({
        "LoRA r=8": fwd(lora_only, {"params": p, "lora": variables["lora"]}),
        "LoRA r=8 + CRMA rank 4": fwd(model, variables),
        "base (no adapters)": fwd(base, {"params": p}),
        "base + CRMA rank 4": fwd(crma_only, {"params": p, "crma": variables["crma"]}),
    }, reps)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=10, help="interleaved repetitions (default: 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size B (default: 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length T (default: 256)")
    parser.add_argument("--skip-forward", action="store_true", help="only the parameter counts")
    parser.add_argument("--qr-procs", type=int, default=3, help="fresh processes for (iii) (default: 3)")
    parser.add_argument("--qr-child", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.qr_child:
        print(json.dumps(qr_backward(200)))
        return 0
    lora, crma = LoraConfig(rank=8, alpha=16.0), CRMAConfig(rank=4)
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (before)")
    if not args.skip_forward:
        times = forward_pairs(args.batch_size, args.seq_len, args.reps, lora, crma)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n(i) SmolLM2-135M forward, jitted model.apply, B={args.batch_size}, T={args.seq_len}, float32; "
              f"median of {args.reps} interleaved reps (load average {os.getloadavg()[0]:.2f} after)")
        print("| contender | median s | min s | tokens/s (median) |")
        print("|---|---|---|---|")
        for k, v in times.items():
            print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {args.batch_size * args.seq_len / med[k]:.0f} |")
        for off, on in (("LoRA r=8", "LoRA r=8 + CRMA rank 4"), ("base (no adapters)", "base + CRMA rank 4")):
            ratios = [b / a for a, b in zip(times[off], times[on])]
            print(f"ratio [{on}] / [{off}]: {med[on] / med[off]:.3f} (median of per-round ratios "
                  f"{statistics.median(ratios):.3f}, ratio of minima {min(times[on]) / min(times[off]):.3f}; target <= 1.03)")
    print(f"\n(ii) trainable parameters, LoRA r={lora.rank} on {','.join(lora.targets)} vs CRMA rank {crma.rank}")
    print("| model shape | base params | LoRA params | CRMA params | CRMA / LoRA | CRMA / base |")
    print("|---|---|---|---|---|---|")
    for name, base, n_lora, n_crma in param_counts(lora, crma):
        print(f"| {name} | {base:,} | {n_lora:,} | {n_crma:,} | {n_crma / n_lora:.4f} | {n_crma / base:.2e} |")
    if args.qr_procs:
        print(f"\n(iii) CRMA's orthonormal streams, grad of sum(U*g) wrt read (576, 4), median of 200 interleaved "
              f"calls, {args.qr_procs} fresh processes")
        print("| process | jnp.linalg.qr autodiff ms | qr_q custom VJP ms | library Gram-Schmidt ms | max abs grad diff qr vs qr_q |")
        print("|---|---|---|---|---|")
        for i in range(args.qr_procs):
            cmd = [sys.executable, "-m", "crma_jax.train.cli", "bench", "crma", "--qr-child"]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                          env=cpu_env()).stdout.strip().splitlines()[-1])
            print(f"| {i} | {r['qr'] * 1e3:.3f} | {r['qr_q'] * 1e3:.3f} | {r['gram_schmidt'] * 1e3:.3f} | "
                  f"{r['max_abs_diff']:.1e} |")
    return 0

