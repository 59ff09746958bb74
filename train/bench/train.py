"""Benchmark: LoRA (+ CRMA) training throughput on SmolLM2-135M, ours (JAX) vs PEFT (PyTorch), CPU.

    crma bench train [--steps 4] [--rounds 2] [--batch-size 4] [--seq-len 256] [--xla-flags-sweep] [--breakdown]

Same weights (the fp32 HF directory made from the GGUF), float32, B x T random tokens, LoRA r=8
alpha=16 on q,k,v,o,gate,up,down, AdamW (lr 2e-4, no weight decay), no dropout. Contenders: our
jitted train step (`make_train_step` + `jit_train_step`, `make_optimizer`: ZClip + per-label
AdamW) with CRMA rank 4 on and off under `crma train`'s default `--remat auto` (the fastest
policy whose step fits in free memory: here `none`, like PEFT without gradient checkpointing),
the same with remat `full`, and PEFT LoRA + `torch.optim.AdamW` with
`torch.set_num_threads(os.cpu_count())`.

Each contender runs in **its own process**, one per round, alternating (A, B, C, D, A, ...):
torch's OpenMP threads keep spinning after each torch op and took the cores from XLA when both
ran in one process. Each process compiles / warms up with one step, then times `--steps` steps;
tokens/s = B*T / median step time over all rounds.

Step efficiency = the step's achieved FLOP/s over XLA's own fp32 matmul rate on the step's
matmul shapes, measured in a JAX-only process (`xla_matmul_rate`). Step FLOPs, N = B*T tokens:
  frozen projections: 4 * N * P_layers  (forward 2NP + input-gradient 2NP; frozen W gets no dW)
  LM head (tied):     4 * N * d * V     (forward + input-gradient into the hidden states)
  attention:          12 * L * B * T^2 * H * hd  (QK^T and PV: 4BT^2·H·hd forward, 2x that backward)
  LoRA:               6 * N * P_lora    (forward, input-grad and weight-grad of A and B)
CRMA, norms, RoPE, softmax, the optimizer and remat's recomputation are not counted.
`--xla-flags-sweep` times our step under each XLA:CPU option of `XLA_CANDIDATES` against the
default; `--breakdown` profiles our step and times its jitted sub-parts.
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

import crma_jax
from crma_jax import CRMAConfig, LoraConfig, count_params, param_labels
from crma_jax.adapters import TRAINABLE
from crma_jax.loss import next_token_loss
from crma_jax.memory_plan import REMAT_BY_SPEED, fastest_fitting, free_bytes
from crma_jax.optim import make_optimizer
from crma_jax.sharding import make_mesh
from crma_jax.train.bench.util import command_line, cpu_env, machine_note, run_child
from crma_jax.train_step import forward_loss, jit_train_step, make_train_step

LR = {"lora_a": 2e-4, "lora_b": 2e-4, "crma_read_mix": 1e-3, "crma_gate": 1e-2}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleave(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """One untimed call each (compile / warm-up), then `reps` rounds of A, B, C, ..."""
    for fn in fns.values():
        timed(fn)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(timed(fn))
    return out


def our_step(model: Any, variables: dict[str, Any], batch: dict[str, jax.Array], remat: str = "none") -> Callable[[], Any]:
    """A closure running one compiled train step on fixed data, carrying trainable + optimizer
    state. `remat` "auto" picks the policy as `crma train --remat auto` does (`run.remat`)."""
    trainable = {c: jax.tree.map(jnp.copy, variables[c]) for c in TRAINABLE if c in variables}
    opt = make_optimizer(param_labels(trainable), LR, total_steps=0)
    mesh = make_mesh((1, 1, 1))
    rng = jax.random.PRNGKey(0)
    shardings: dict[str, Any] = {}

    def compile_for(policy: str) -> Any:
        fn, sh = jit_train_step(make_train_step(model.clone(remat=policy), opt), mesh, trainable,
                                opt.init(trainable), variables["params"])
        shardings.update(sh)
        return fn.lower(trainable, opt.init(trainable), variables["params"], batch, rng, {}).compile()

    choice = fastest_fitting(compile_for, free_bytes(mesh.devices.flat), REMAT_BY_SPEED if remat == "auto" else (remat,))
    place = jax.jit(lambda t: t, out_shardings=(shardings["trainable"], shardings["opt_state"]))
    state = list(place((trainable, opt.init(trainable))))  # fresh buffers: the step donates them
    batch = jax.device_put(batch, shardings["batch"])

    def run() -> Any:
        state[0], state[1], metrics = choice.compiled(state[0], state[1], variables["params"], batch, rng, {})
        return metrics["loss"]

    run.hlo = choice.compiled.as_text  # type: ignore[attr-defined]
    run.remat = choice.policy  # type: ignore[attr-defined]
    return run


def peft_step(path: Any, ids: np.ndarray) -> Callable[[], Any]:
    import torch
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = get_peft_model(hf, PeftLora(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    x = torch.from_numpy(ids.astype(np.int64))

    def run() -> float:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def step_matmuls(cfg: Any, batch: int, seq: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of the step's frozen matmuls, forward x·W and input-gradient dy·Wᵀ."""
    m, d, hd = batch * seq, cfg.hidden_size, cfg.head_dim
    q_out, kv_out, f = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    shapes = [(d, q_out, 1), (d, kv_out, 2), (q_out, d, 1), (d, f, 2), (f, d, 1)]
    out = []
    for k, n, c in shapes:
        out += [(m, k, n, c * cfg.num_layers), (m, n, k, c * cfg.num_layers)]
    return out + [(m, d, cfg.vocab_size, 1), (m, cfg.vocab_size, d, 1)]


def xla_matmul_rate(cfg: Any, batch: int, seq: int, reps: int = 5) -> tuple[float, list[tuple[str, float]]]:
    """XLA's own fp32 matmul rate on the step's shapes, in this (JAX-only) process: the
    FLOP-weighted harmonic mean over `step_matmuls` of each shape's best-of-`reps` GFLOP/s."""
    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    rows, total_flops, total_s = [], 0.0, 0.0
    for m, k, n, count in step_matmuls(cfg, batch, seq):
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        w = jnp.asarray(rng.standard_normal((k, n), np.float32))
        best = min(interleave({"dot": lambda: dot(x, w)}, reps)["dot"])
        flops = 2 * m * k * n
        rows.append((f"{m}x{k}x{n} (x{count})", flops / best / 1e9))
        total_flops += count * flops
        total_s += count * best
    return total_flops / total_s / 1e9, rows


def step_flops(cfg: Any, batch: int, seq: int, lora_params: int) -> float:
    n, d, hd = batch * seq, cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * cfg.intermediate_size
    attention = 12 * cfg.num_layers * batch * seq**2 * cfg.num_heads * hd
    return 4 * n * (cfg.num_layers * per_layer + d * cfg.vocab_size) + attention + 6 * n * lora_params


def profile_step(run: Callable[[], Any], hlo: str, top: int = 12) -> None:
    """One step under jax.profiler; XLA:CPU op time by layer part (from each op's source op_name)."""
    import collections
    import glob
    import re
    import tempfile

    where = {m.group(1): m.group(2) for m in re.finditer(r'%([\w.\-]+) = .*?op_name="([^"]*)"', hlo)}
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(run())
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    ops: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if line.name.startswith("tf_XLAEigen") and not ev.name.startswith(("ThunkExecutor", "Slinky")):
                    ops[ev.name] += ev.duration_ns / 1e9
    parts: collections.Counter = collections.Counter()
    for name, sec in ops.items():
        op = where.get(name, "")
        part = next((p for p in ("self_attn", "mlp", "crma", "layernorm", "logits") if p in op), "other (scan stacks, loss, optimizer)")
        parts[("backward " if "transpose(jvp" in op else "forward ") + part] += sec
    total = sum(ops.values())
    print(f"\njax.profiler, one step of ours LoRA + CRMA: {total:.2f} s of XLA op time")
    print("| part | s | share |\n|---|---|---|")
    for k, sec in parts.most_common():
        print(f"| {k} | {sec:.2f} | {sec / total:.2f} |")
    print("| top op | s | source op |\n|---|---|---|")
    for name, sec in ops.most_common(top):
        print(f"| {name} | {sec:.3f} | {where.get(name, '')[-90:]} |")


def breakdown(model: Any, variables: dict[str, Any], batch: dict[str, jax.Array], reps: int) -> dict[str, list[float]]:
    """Jitted sub-parts of our step (LoRA + CRMA), interleaved; weights are arguments, not constants."""
    trainable, params = {c: variables[c] for c in TRAINABLE}, variables["params"]

    def loss(t: Any, p: Any) -> Any:
        return forward_loss(model, {"params": p, **t}, batch, None)[0]

    def hidden(v: Any) -> Any:
        return model.apply(v, batch["input_ids"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], method="hidden")[0]

    def loss_blockwise(t: Any, p: Any) -> Any:  # the LM head + loss forced onto its blockwise path
        return model.apply({"params": p, **t}, batch["input_ids"], batch["loss_mask"], batch["positions"],
                           batch["segment_ids"], full_logits_max=0, method="loss")[0]

    def head_loss(h: Any, p: Any) -> Any:
        return next_token_loss(model.apply({"params": p}, h, method="logits"), batch["input_ids"], batch["loss_mask"])[0]

    h = jax.block_until_ready(jax.jit(hidden)(variables))
    fns = [jax.jit(f) for f in (hidden, loss, jax.value_and_grad(loss), jax.value_and_grad(loss_blockwise),
                                jax.value_and_grad(head_loss))]
    return interleave({
        "forward to hidden states (layers only)": lambda: fns[0](variables),
        "forward + head + loss": lambda: fns[1](trainable, params),
        "value_and_grad(loss) wrt lora+crma (no optimizer)": lambda: fns[2](trainable, params),
        "the same, LM head + loss forced blockwise (full_logits_max=0)": lambda: fns[3](trainable, params),
        "head + loss alone, fwd+bwd to h (all logits)": lambda: fns[4](h, params),
    }, reps)


CONTENDERS = {
    "ours+crma": "ours, LoRA + CRMA (remat auto, crma train's default)",
    "ours": "ours, LoRA, CRMA off (remat auto)",
    "ours+crma-remat": "ours, LoRA + CRMA (remat full, the leanest)",
    "peft": "PEFT LoRA (torch)",
}
# XLA:CPU options tried by --xla-flags-sweep, each against the default in alternating processes.
XLA_CANDIDATES = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
)


def _setup(batch_size: int, seq: int) -> tuple[Any, Any, Any, dict[str, Any], np.ndarray]:
    from crma_jax.convert.smollm2 import smollm2_hf_dir

    path = smollm2_hf_dir()
    model, variables = crma_jax.load_pretrained(path, dtype="float32", lora_config=LoraConfig(rank=8, alpha=16.0),
                                                crma_config=CRMAConfig(rank=4))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch_size, seq)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((batch_size, seq), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch_size, seq)),
             "loss_mask": jnp.ones((batch_size, seq), jnp.int32)}
    return path, model, variables, batch, ids


def child(name: str, steps: int, batch_size: int, seq: int) -> dict[str, Any]:
    """One contender in this process: warm-up (compile) step, then `steps` timed steps."""
    path, model, variables, batch, ids = _setup(batch_size, seq)
    if name == "matmul":
        rate, rows = xla_matmul_rate(model.config, batch_size, seq)
        return {"rate": rate, "rows": rows}
    if name == "peft":
        fn = peft_step(path, ids)
    elif name == "ours":
        fn = our_step(model.clone(crma_config=None), {k: v for k, v in variables.items() if k != "crma"}, batch, "auto")
    else:
        fn = our_step(model, variables, batch, "full" if name.endswith("remat") else "auto")
    first = float(jax.device_get(fn()))
    return {"loss0": first, "times": interleave({name: fn}, steps)[name], "remat": getattr(fn, "remat", None)}


def _spawn(name: str, args: argparse.Namespace, xla_flags: str = "") -> dict[str, Any]:
    env = cpu_env(XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags])))
    return run_child("train", "--child", name, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                     "--seq-len", str(args.seq_len), env=env)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=4, help="timed steps per contender process (default: 4)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of one fresh process per contender, alternating (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size B (default: 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length T (default: 256)")
    parser.add_argument("--breakdown", action="store_true", help="also profile our step and time its sub-parts")
    parser.add_argument("--xla-flags-sweep", action="store_true",
                        help="also time our step under each XLA:CPU option in XLA_CANDIDATES against the default")
    parser.add_argument("--child", choices=[*CONTENDERS, "matmul", "breakdown"], help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child == "breakdown":
        _, model, variables, batch, _ = _setup(args.batch_size, args.seq_len)
        fn = our_step(model, variables, batch)
        fn()
        profile_step(fn, fn.hlo())  # type: ignore[attr-defined]
        sub = breakdown(model, variables, batch, args.steps)
        print(f"\nsub-parts of our step (LoRA + CRMA, remat none), jitted, median of {args.steps} interleaved reps")
        print("| part | median s |\n|---|---|")
        for k, v in sub.items():
            print(f"| {k} | {statistics.median(v):.4f} |")
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.seq_len)))
        return 0
    print(f"$ {command_line()}")
    print(f"{machine_note()} (before); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    loss0, chosen = {}, {}
    for _ in range(args.rounds):
        for name in CONTENDERS:
            res = _spawn(name, args)
            times[name] += res["times"]
            loss0[name], chosen[name] = res["loss0"], res["remat"]
    rate, rows = (lambda r: (r["rate"], r["rows"]))(_spawn("matmul", args))
    print(f"{machine_note()} (after)")
    b, t = args.batch_size, args.seq_len
    _, model, variables, _, _ = _setup(1, 8)
    flops = step_flops(model.config, b, t, count_params({"lora": variables["lora"]})["trainable"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nSmolLM2-135M LoRA r=8 (7 targets) training step, B={b}, T={t}, float32; each contender in its own "
          f"process, {args.rounds} alternating rounds x {args.steps} steps after 1 warm-up; step FLOPs (formula above) "
          f"= {flops / 1e9:.0f} G")
    print("step-0 loss (same weights): " + ", ".join(f"{k}: {v:.4f}" for k, v in loss0.items()))
    print("| contender | median step s | min s | tokens/s | achieved GFLOP/s | step efficiency |")
    print("|---|---|---|---|---|---|")
    for k, v in times.items():
        achieved = flops / med[k] / 1e9
        label = CONTENDERS[k] + (f" → {chosen[k]}" if "auto" in CONTENDERS[k] else "")
        print(f"| {label} | {med[k]:.3f} | {min(v):.3f} | {b * t / med[k]:.0f} | {achieved:.1f} | "
              f"{achieved / rate:.2f} |")
    print(f"XLA's own fp32 matmul rate on the step's shapes (JAX-only process): {rate:.1f} GFLOP/s "
          f"(FLOP-weighted over {len(rows)} shapes: " + ", ".join(f"{s} {r:.0f}" for s, r in rows) + ")")
    peft_s = med["peft"]
    print(f"ours/PEFT throughput: CRMA off {peft_s / med['ours']:.2f}x, CRMA on {peft_s / med['ours+crma']:.2f}x, "
          f"CRMA on with remat full {peft_s / med['ours+crma-remat']:.2f}x; "
          f"CRMA-on / CRMA-off step time {med['ours+crma'] / med['ours']:.3f}")
    if args.xla_flags_sweep:
        print("\nXLA:CPU options, ours LoRA + CRMA (remat auto), alternating processes with the default")
        print("| XLA_FLAGS | median step s | default's median s | speed-up |\n|---|---|---|---|")
        for flag in XLA_CANDIDATES:
            got, base = [], []
            for _ in range(args.rounds):
                got += _spawn("ours+crma", args, flag)["times"]
                base += _spawn("ours+crma", args)["times"]
            print(f"| `{flag}` | {statistics.median(got):.3f} | {statistics.median(base):.3f} | "
                  f"{statistics.median(base) / statistics.median(got):.2f}x |")
    if args.breakdown:
        out = subprocess.run([sys.executable, "-m", "crma_jax.train.cli", "bench", "train", "--child", "breakdown",
                              "--steps", str(args.steps), "--batch-size", str(b), "--seq-len", str(t)],
                             capture_output=True, text=True, env=cpu_env())
        print(out.stdout)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            return 1
    return 0
