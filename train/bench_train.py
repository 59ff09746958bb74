"""Benchmark: LoRA (+ CRMA) training throughput on SmolLM2-135M, ours (JAX) vs PEFT (PyTorch), CPU.

    crma bench train [--steps 6] [--batch 4] [--seq 256] [--breakdown]

Same weights (the fp32 HF directory made from the GGUF), float32, B x T random tokens, LoRA r=8
alpha=16 on q,k,v,o,gate,up,down, AdamW (lr 2e-4, no weight decay), no dropout, no gradient
checkpointing. Contenders: our jitted train step (`make_train_step` + `jit_train_step`,
`make_optimizer`: ZClip + per-label AdamW) with CRMA rank 4 on and off, and PEFT LoRA +
`torch.optim.AdamW` with `torch.set_num_threads(os.cpu_count())`. Each is warmed up (compiled) by
one step, then `--steps` steps run interleaved (ours+CRMA, ours, PEFT, ours+CRMA, ...); tokens/s =
B*T / median step time.

Also the machine's fp32 matmul rate (XLA and torch) on the step's shapes, and our step's
achieved GFLOP/s, with N = B*T tokens:
  frozen projections: 4 * N * P_layers  (forward 2NP + input-gradient 2NP; frozen W gets no dW)
  LM head (tied):     4 * N * d * V     (forward + input-gradient into the hidden states)
  attention:          12 * L * B * T^2 * H * hd  (QK^T and PV: 4BT^2·H·hd forward, 2x that backward)
  LoRA:               6 * N * P_lora    (forward, input-grad and weight-grad of A and B)
CRMA, norms, RoPE, softmax and the optimizer are not counted (they are memory-bound).
`--breakdown` times the jitted sub-parts of our step (forward, head + loss, gradient, update).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from crma_jax.train.bench_util import command_line

import crma_jax
from crma_jax import CRMAConfig, LoraConfig, count_params, param_labels
from crma_jax.loss import next_token_loss
from crma_jax.optim import make_optimizer
from crma_jax.sharding import make_mesh
from crma_jax.train_step import forward_loss, jit_train_step, make_train_step

LR = {"lora_a": 2e-4, "lora_b": 2e-4, "crma_mix": 1e-3, "crma_gate": 1e-2}
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


def our_step(model: Any, variables: dict[str, Any], batch: dict[str, jax.Array]) -> Callable[[], Any]:
    """A closure running one jitted train step on fixed data, carrying trainable + optimizer state."""
    trainable = {c: jax.tree.map(jnp.copy, variables[c]) for c in ("lora", "crma") if c in variables}
    opt = make_optimizer(param_labels(trainable), LR, total_steps=0)
    mesh = make_mesh((1, 1, 1))
    fn, sh = jit_train_step(make_train_step(model, opt), mesh, trainable, opt.init(trainable), variables["params"])
    place = jax.jit(lambda t: t, out_shardings=(sh["trainable"], sh["opt_state"]))
    state = list(place((trainable, opt.init(trainable))))  # fresh buffers: the step donates them
    batch = jax.device_put(batch, sh["batch"])
    rng = jax.random.PRNGKey(0)

    def run() -> Any:
        state[0], state[1], metrics = fn(state[0], state[1], variables["params"], batch, rng)
        return metrics["loss"]

    run.hlo = lambda: fn.lower(state[0], state[1], variables["params"], batch, rng).compile().as_text()  # type: ignore[attr-defined]
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


def matmul_rates(reps: int = 5) -> list[tuple[str, str, float, float]]:
    """(shape, framework, best GFLOP/s, median GFLOP/s) for x (1024, 576) @ w (576, n)."""
    import torch

    rows = []
    for n in (1536, 49152):
        flops = 2 * 1024 * 576 * n
        x, w = np.random.default_rng(0).standard_normal((2, 1024 * 576 + 576 * n), np.float32)
        xj, wj = jnp.asarray(x[: 1024 * 576].reshape(1024, 576)), jnp.asarray(w[: 576 * n].reshape(576, n))
        xt, wt = torch.from_numpy(np.asarray(xj)), torch.from_numpy(np.asarray(wj))
        dot = jax.jit(jnp.dot)
        ts = interleave({"XLA (jax.jit(jnp.dot))": lambda: dot(xj, wj), "torch.mm": lambda: torch.mm(xt, wt)}, reps)
        rows += [(f"1024x576x{n}", k, flops / min(v) / 1e9, flops / statistics.median(v) / 1e9) for k, v in ts.items()]
    return rows


def step_flops(cfg: Any, batch: int, seq: int, lora_params: int) -> float:
    n, d, hd = batch * seq, cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * cfg.intermediate_size
    attention = 12 * cfg.num_layers * batch * seq**2 * cfg.num_heads * hd
    return 4 * n * (cfg.num_layers * per_layer + d * cfg.vocab_size) + attention + 6 * n * lora_params


@jax.custom_vjp
def lora_matmul(x: Any, w: Any, a: Any, b: Any, scale: float = 2.0) -> Any:
    """PROPOSAL: x @ w + scale (x @ a) @ b with a hand-written VJP on 2-D (tokens, features)."""
    return x @ w + (x @ a) @ b * scale


def _lora_fwd(x: Any, w: Any, a: Any, b: Any, scale: float = 2.0) -> Any:
    return lora_matmul(x, w, a, b, scale), (x, w, a, b, scale)


def _lora_bwd(res: Any, dy: Any) -> Any:
    x, w, a, b, scale = res
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dlow = (dy2 @ b.T) * scale
    dx = (dy2 @ w.T + dlow @ a.T).reshape(x.shape)
    return dx, jnp.zeros_like(w), x2.T @ dlow, (x2 @ a).T @ dy2 * scale, 0.0


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


def proposals(model: Any, batch: dict[str, jax.Array]) -> dict[str, Callable[[], Any]]:
    """fwd+bwd of one layer's MLP (library vs `lora_matmul`) and attention core (a verbatim replica
    of the library's vs heads-major layout, K/V repeated, additive mask), random weights."""
    from crma_jax.layers import MLP

    cfg, (b, t), hd, g = model.config, batch["input_ids"].shape, model.config.head_dim, model.config.num_heads // model.config.num_kv_heads
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(ks[0], (b, t, cfg.hidden_size))
    mlp = MLP(cfg, model.dtype, model.lora)
    v = mlp.init(ks[1], x)

    def lib_mlp(lora: Any, x_: Any, p: Any) -> Any:
        return jnp.sum(jnp.square(mlp.apply({"params": p, "lora": lora}, x_)))

    def new_mlp(lora: Any, x_: Any, p: Any) -> Any:
        def lin(name: str, h: Any) -> Any:
            return lora_matmul(h, p[name]["kernel"], lora[name]["a"], lora[name]["b"], model.lora.scale)
        return jnp.sum(jnp.square(lin("down_proj", jax.nn.silu(lin("gate_proj", x_)) * lin("up_proj", x_))))

    q = jax.random.normal(ks[2], (b, t, cfg.num_heads, hd))
    k, vv = jax.random.normal(ks[3], (2, b, t, cfg.num_kv_heads, hd))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def lib_attn(q_: Any, k_: Any, v_: Any) -> Any:
        s = jnp.einsum("btkgd,bskd->bkgts", q_.reshape(b, t, -1, g, hd) * hd**-0.5, k_).astype(jnp.float32)
        s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
        return jnp.sum(jnp.square(jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v_)))

    def new_attn(q_: Any, k_: Any, v_: Any) -> Any:
        k_, v_ = jnp.repeat(k_, g, axis=2), jnp.repeat(v_, g, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q_ * hd**-0.5, k_) + jnp.where(mask, 0.0, -1e30)[:, None]
        return jnp.sum(jnp.square(jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v_)))

    grads = [jax.jit(jax.grad(f, argnums=(0, 1))) for f in (lib_mlp, new_mlp, lib_attn, new_attn)]
    for i in (0, 2):
        args = (v["lora"], x, v["params"]) if i == 0 else (q, k, vv)
        diff = max(float(jnp.max(jnp.abs(u - w))) for u, w in zip(jax.tree.leaves(grads[i](*args)), jax.tree.leaves(grads[i + 1](*args))))
        print(f"proposal {'MLP' if i == 0 else 'attention'}: max |grad difference| vs library = {diff:.2e}")
    return {
        "1 layer: MLP+LoRA fwd+bwd, library (autodiff)": lambda: grads[0](v["lora"], x, v["params"]),
        "1 layer: MLP+LoRA fwd+bwd, proposal (lora_matmul VJP)": lambda: grads[1](v["lora"], x, v["params"]),
        "1 layer: attention core fwd+bwd, library layout": lambda: grads[2](q, k, vv),
        "1 layer: attention core fwd+bwd, proposal (bhts, bias)": lambda: grads[3](q, k, vv),
    }


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
    trainable, params = {c: variables[c] for c in ("lora", "crma")}, variables["params"]

    def loss(t: Any, p: Any) -> Any:
        return forward_loss(model, {"params": p, **t}, batch, None)[0]

    def hidden(v: Any) -> Any:
        return model.apply(v, batch["input_ids"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], method="hidden")[0]

    def head_loss(h: Any, p: Any) -> Any:
        return next_token_loss(model.apply({"params": p}, h, method="logits"), batch["input_ids"], batch["loss_mask"])[0]

    def head_loss_chunked(h: Any, p: Any, chunk: int = 128) -> Any:
        """The same loss without the (B, T, V) logits: per-chunk logits, recomputed in backward."""
        hs = h[:, :-1].reshape(-1, h.shape[-1])
        tgt = batch["input_ids"][:, 1:].reshape(-1)
        w = batch["loss_mask"][:, 1:].reshape(-1).astype(jnp.float32)
        pad = -hs.shape[0] % chunk
        hs, tgt, w = jnp.pad(hs, ((0, pad), (0, 0))), jnp.pad(tgt, (0, pad)), jnp.pad(w, (0, pad))

        @jax.checkpoint
        def one(args: Any) -> Any:
            logits = (args[0] @ p["embed_tokens"]["embedding"].T).astype(jnp.float32)
            picked = jnp.take_along_axis(logits, args[1][:, None], axis=-1)[:, 0]
            return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * args[2])

        return jnp.sum(jax.lax.map(one, (hs.reshape(-1, chunk, hs.shape[-1]), tgt.reshape(-1, chunk), w.reshape(-1, chunk))))

    h = jax.block_until_ready(jax.jit(hidden)(variables))
    a, b = jax.jit(head_loss)(h, params), jax.jit(head_loss_chunked)(h, params)
    print(f"chunked head+loss matches the library's: {float(a):.4f} vs {float(b):.4f}")
    fns = [jax.jit(f) for f in (hidden, loss, jax.value_and_grad(loss), jax.value_and_grad(head_loss),
                                jax.value_and_grad(head_loss_chunked))]
    return interleave({
        "forward to hidden states (layers only)": lambda: fns[0](variables),
        "forward + head + loss": lambda: fns[1](trainable, params),
        "value_and_grad(loss) wrt lora+crma (no optimizer)": lambda: fns[2](trainable, params),
        "head + loss, fwd+bwd to h (library: full B,T,V logits)": lambda: fns[3](h, params),
        "head + loss, fwd+bwd to h (chunks of 128 tokens, remat)": lambda: fns[4](h, params),
        **proposals(model, batch),
    }, reps)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contender (default: 6)")
    parser.add_argument("--batch", type=int, default=4, help="batch size B (default: 4)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length T (default: 256)")
    parser.add_argument("--breakdown", action="store_true", help="also time sub-parts, profile, proposals")


def run(args: argparse.Namespace) -> int:
    import torch
    from crma_jax.convert.smollm2 import smollm2_hf_dir

    path = smollm2_hf_dir()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (before)")
    model, variables = crma_jax.load_pretrained(path, dtype="float32", lora=LoraConfig(rank=8, alpha=16.0),
                                                crma=CRMAConfig(rank=4))
    b, t = args.batch, args.seq
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (b, t)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "loss_mask": jnp.ones((b, t), jnp.int32)}
    off = {k: v for k, v in variables.items() if k != "crma"}
    fns = {"ours, LoRA + CRMA": our_step(model, variables, batch),
           "ours, LoRA (CRMA off)": our_step(model.clone(crma=None), off, batch),
           "PEFT LoRA (torch)": peft_step(path, ids)}
    first = {k: float(jax.device_get(fn())) for k, fn in fns.items()}  # also the warm-up / compile
    print("step-0 loss (same weights, B=0 LoRA): " + ", ".join(f"{k}: {v:.4f}" for k, v in first.items()))
    times = interleave(fns, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops(model.config, b, t, count_params({"lora": variables["lora"]})["trainable"])
    rates = matmul_rates()
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (after)")
    print(f"\nSmolLM2-135M LoRA r=8 (7 targets) training step, B={b}, T={t}, float32; "
          f"median of {args.steps} interleaved steps after 1 warm-up; step FLOPs (formula above) = {flops / 1e9:.0f} G")
    print("| contender | median step s | min s | tokens/s | achieved GFLOP/s |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {min(v):.3f} | {b * t / med[k]:.0f} | {flops / med[k] / 1e9:.1f} |")
    peft_s, on_s, off_s = med["PEFT LoRA (torch)"], med["ours, LoRA + CRMA"], med["ours, LoRA (CRMA off)"]
    print(f"throughput ours/PEFT: CRMA off {peft_s / off_s:.2f}x, CRMA on {peft_s / on_s:.2f}x; "
          f"CRMA-on / CRMA-off step time {on_s / off_s:.3f}")
    print("\nfp32 matmul x (1024, 576) @ w (576, n), 5 interleaved reps")
    print("| shape | framework | best GFLOP/s | median GFLOP/s |")
    print("|---|---|---|---|")
    for shape, fw, best, medr in rates:
        print(f"| {shape} | {fw} | {best:.1f} | {medr:.1f} |")
    if args.breakdown:
        profile_step(fns["ours, LoRA + CRMA"], fns["ours, LoRA + CRMA"].hlo())  # type: ignore[attr-defined]
        sub = breakdown(model, variables, batch, args.steps)
        print(f"\nsub-parts of our step (LoRA + CRMA), jitted, median of {args.steps} interleaved reps")
        print(f"| part | median s | x{model.config.num_layers} layers for 1-layer parts | share of the full step |")
        print("|---|---|---|---|")
        for k, v in sub.items():
            m = statistics.median(v) * (model.config.num_layers if k.startswith("1 layer") else 1)
            print(f"| {k} | {statistics.median(v):.4f} | {m:.3f} | {m / on_s:.2f} |")
    return 0

