"""Continual learning: the methods `crma cl` compares, as plug-in objects, and the metrics.

A *method* says, for a sequence of tasks (domains) trained one after another:

- which LoRA each task starts from (`fresh_lora`): the previous task's (one shared model) or a
  fresh one (one LoRA per task), which `start` may shape from the new task's data (InfLoRA);
- what the forward pass uses while training (`forward_lora`): the trainable LoRA alone, or, for
  O-LoRA, the earlier tasks' frozen LoRAs beside it (concatenated along the rank);
- its loss regulariser (`penalty`), added to the mean token loss;
- what it keeps after each task (`remember`): EWC's Fisher and anchor, O-LoRA's and InfLoRA's
  LoRAs, InfLoRA's subspace of earlier tasks' inputs;
- the statistics of a task's training data it needs (`stats_before` the task, `stats_after`):
  the diagonal Fisher, the Gram matrix of each LoRA target's inputs;
- which LoRA evaluation uses (`eval_lora`): with the task id (oracle) or without it;
- whether it has a CRMA substrate (`uses_crma`), which one each task trains from (`start_crma`:
  the one substrate, or a fresh one per task), whether a task trains it (`trains_crma`; the
  forward pass of `forward` stops its gradient otherwise), which one evaluation uses
  (`eval_crma`), and how much earlier data it replays (`replay`).

Everything a method keeps is a `Memory` of plain arrays, so the training step takes it as an
argument (no recompilation per task) and a run can be resumed from it.

Metrics on the holdout-loss matrix L (K × K; L[i, j] = loss on task j after training tasks
0..i; lower is better), in GEM's form (Lopez-Paz & Ranzato, 2017) with the sign chosen so that
**positive is good**, as for GEM's accuracies:

    ACC = mean_j L[K−1, j]                                (final mean loss; lower is better)
    BWT = mean_{j<K−1} (L[j, j] − L[K−1, j])             (> 0: later tasks helped; < 0: forgetting)
    FWT = mean_{j≥1}   (b[j] − L[j−1, j])                (> 0: earlier tasks helped before training j)
    drift_j = (L[K−1, j] − L[j, j]) / L[j, j]            (relative; > 0: forgetting)

with b[j] the starting model's loss on task j.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Lora = Any  # a LoRA set: {"layers": {module: {proj: {"a": (L, in, r), "b": (L, r, out)}}}}
Memory = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Metrics.


def transfer_metrics(losses: np.ndarray, base: np.ndarray) -> dict[str, Any]:
    """ACC, BWT, FWT and per-task drift (module docstring) of a full K × K loss matrix.

    `losses[i, j]` for every i, j (j > i too: the model as it stood before training task j);
    `base[j]` the starting model's loss on task j. Needs K >= 2.
    """
    losses, base = np.asarray(losses, np.float64), np.asarray(base, np.float64)
    k = losses.shape[0]
    if losses.shape != (k, k) or base.shape != (k,) or k < 2:
        raise ValueError(f"need a K x K loss matrix and K base losses with K >= 2, got {losses.shape} and {base.shape}")
    diag, last = np.diag(losses), losses[-1]
    return {
        "acc": float(last.mean()),
        "bwt": float(np.mean(diag[:-1] - last[:-1])),
        "fwt": float(np.mean(base[1:] - losses[np.arange(k - 1), np.arange(1, k)])),
        "drift": ((last[:-1] - diag[:-1]) / diag[:-1]).tolist(),
    }


# ----------------------------------------------------------------------------------------------
# LoRA set arithmetic.


def _is_pair(node: Any) -> bool:
    return isinstance(node, dict) and "a" in node and "b" in node


def _map_pairs(fn: Callable[[list[dict[str, jax.Array]]], Any], sets: Sequence[Lora]) -> Any:
    """The first set's tree with fn(the matching {"a", "b"} pairs of every set) at each pair."""
    leaves = [jax.tree.leaves(s, is_leaf=_is_pair) for s in sets]
    treedef = jax.tree.structure(sets[0], is_leaf=_is_pair)
    return jax.tree.unflatten(treedef, [fn(list(pairs)) for pairs in zip(*leaves)])


def concat_lora(sets: Sequence[Lora]) -> Lora:
    """One LoRA set equal to the sum of `sets`: A's joined along the rank (last) axis, B's along
    their rank axis, so x·[A₁|A₂]·[B₁;B₂]·s = Σᵢ x·Aᵢ·Bᵢ·s with the same scale s (LoRA's scale
    comes from its config, not from the arrays' rank)."""
    if not sets:
        raise ValueError("concat_lora needs at least one set")
    return _map_pairs(lambda pairs: {"a": jnp.concatenate([p["a"] for p in pairs], axis=-1),
                                     "b": jnp.concatenate([p["b"] for p in pairs], axis=-2)}, sets)


# ----------------------------------------------------------------------------------------------
# Regularisers.


def ewc_penalty(params: Any, fisher: Any, anchor: Any) -> jax.Array:
    """Σ F·(θ − θ*)² over every leaf (float32 scalar); 0 at θ = θ*. EWC's λ/2 is the caller's."""
    terms = jax.tree.map(lambda p, f, a: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a)), params, fisher, anchor)
    return sum(jax.tree.leaves(terms), jnp.float32(0.0))


def ewc_accumulate(fisher_sum: Any, anchor: Any, fisher: Any, theta: Any) -> tuple[Any, Any]:
    """Fold one more task's (Fisher F, optimum θ*) into (ΣF, μ), with μ the F-weighted mean of
    the optima, so that Σₜ Fₜ(θ − θ*ₜ)² = ΣF·(θ − μ)² + a constant: the same gradient as one
    penalty per earlier task, in memory that does not grow with the number of tasks."""
    total = jax.tree.map(jnp.add, fisher_sum, fisher)
    mean = jax.tree.map(lambda t, fs, a, f, th: jnp.where(t > 0, (fs * a + f * th) / jnp.where(t > 0, t, 1.0), 0.0),
                        total, fisher_sum, anchor, fisher, theta)
    return total, mean


def per_sequence_grads(mean_loss: Callable[[Any, Any], jax.Array]) -> Callable[[Any, Any], tuple[Any, jax.Array]]:
    """grad_fn(params, batch) -> (grads, weights) for `diagonal_fisher`, from `mean_loss(params,
    batch)`, the mean token loss of a (B, T) batch: grads[leaf] is (B, *leaf.shape), each row's
    gradient of its own mean token loss (`jax.vmap` over the rows, each a batch of one); weights
    (B,) float32 is 1 for a row with targets (`loss_mask`), 0 for a padding row."""
    def one(params: Any, row: Any) -> Any:
        return jax.grad(mean_loss)(params, jax.tree.map(lambda x: x[None], row))

    def grad_fn(params: Any, batch: Any) -> tuple[Any, jax.Array]:
        grads = jax.vmap(one, in_axes=(None, 0))(params, batch)
        return grads, (jnp.sum(batch["loss_mask"], axis=1) > 0).astype(jnp.float32)

    return grad_fn


@jax.jit
def _accumulate_squares(total: Any, grads: Any, weights: jax.Array) -> tuple[Any, jax.Array]:
    """total + Σ_rows weight·grad² per leaf, and Σ weights, as one compiled program: in a
    multi-process run, a chain of eager ops on global arrays is a chain of SPMD programs whose
    collectives can deadlock when several are in flight."""
    sq = jax.tree.map(lambda g: jnp.tensordot(weights, jnp.square(g.astype(jnp.float32)), axes=1), grads)
    return (sq if total is None else jax.tree.map(jnp.add, total, sq)), jnp.sum(weights)


def diagonal_fisher(grad_fn: Callable[[Any, Any], tuple[Any, jax.Array]], params: Any, batches: Iterable[Any]) -> Any:
    """The empirical diagonal Fisher: the mean over every sequence of `batches` of its squared
    gradient, per leaf (float32, shaped like `params`).

    grad_fn(params, batch) -> (grads, weights) as `per_sequence_grads` makes them: per-row
    gradients with a leading (B,) axis and (B,) weights, 1 for the rows that count. Squaring each
    sequence's own gradient, not the batch mean's, is what makes this the Fisher: the square of a
    mean of B independent gradients is about B times smaller.
    """
    total, n = None, 0.0
    for batch in batches:
        grads, weights = grad_fn(params, batch)
        total, count = _accumulate_squares(total, grads, weights)
        n += float(count)  # also waits for the batch: one multi-process computation in flight at a time
    if total is None or n == 0:
        raise ValueError("diagonal_fisher needs at least one sequence with targets")
    return jax.tree.map(lambda t: t / n, total)


def gpm_extend(projector: jax.Array, gram: jax.Array, threshold: float) -> jax.Array:
    """GPM's memory update (Saha et al., 2021), as InfLoRA keeps it: the orthogonal projector
    (n, n) onto the span of the earlier tasks' inputs, grown by the fewest top eigenvectors of
    the new inputs' residual Gram (I−P)·G·(I−P) that bring the share of the new inputs' energy
    tr(G) lying in the span to at least `threshold`. `gram` is XᵀX (n, n) of the new inputs."""
    n = gram.shape[-1]
    eye = jnp.eye(n, dtype=jnp.float32)
    gram = gram.astype(jnp.float32)
    residual = (eye - projector) @ gram @ (eye - projector)
    values, vectors = jnp.linalg.eigh((residual + residual.T) / 2)
    values, vectors = jnp.clip(values[::-1], 0.0), vectors[:, ::-1]
    total = jnp.maximum(jnp.trace(gram), 1e-30)
    captured = jnp.trace(projector @ gram) + jnp.cumsum(values)
    k = jnp.sum(captured / total < threshold) + 1  # directions needed to reach the threshold
    k = jnp.where(jnp.trace(projector @ gram) / total >= threshold, 0, k)
    keep = (jnp.arange(n) < k) & (values > 1e-12 * total)
    new = vectors * keep
    return projector + new @ new.T


def orthogonal_top(gram: jax.Array, projector: jax.Array, rank: int) -> jax.Array:
    """(n, rank) orthonormal columns orthogonal to the projector's span, along the largest
    directions of the inputs left outside it: InfLoRA's fixed down-projection for a new task."""
    n = gram.shape[-1]
    gram = gram.astype(jnp.float32)
    outside = jnp.eye(n, dtype=jnp.float32) - projector
    # δ·(I − P) ranks every direction outside the span above every one inside it, also where the
    # inputs leave fewer than `rank` directions with energy (while rank <= n − dim span).
    trace = jnp.trace(gram)
    delta = jnp.where(trace > 0, 1e-6 * trace / n, 1.0)
    residual = outside @ gram @ outside + delta * outside
    _, vectors = jnp.linalg.eigh((residual + residual.T) / 2)
    q, _ = jnp.linalg.qr(outside @ vectors[:, ::-1][:, :rank])
    return q


def olora_penalty(new: Lora, old: Lora) -> jax.Array:
    """O-LoRA's orthogonality loss Σ |A_oldᵀ·A_new| (elementwise L1, every layer and target).

    `old` holds the earlier tasks' LoRAs concatenated along the rank (`concat_lora`; zero
    columns for tasks not yet trained add nothing). 0 exactly when every new A column is
    orthogonal to every old one.
    """
    terms = _map_pairs(lambda pairs: jnp.sum(jnp.abs(jnp.einsum("lir,lis->lrs", pairs[1]["a"], pairs[0]["a"]))),
                       [new, old])
    return sum(jax.tree.leaves(terms), jnp.float32(0.0))


# ----------------------------------------------------------------------------------------------
# Methods.


def _zeros_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


@dataclasses.dataclass(frozen=True)
class Method:
    """NAIVE: one LoRA trained on every task in turn; the base class of the other methods.

    Attributes: `uses_crma` trains a CRMA substrate shared by every task; `fresh_lora` starts
    each task from a new LoRA (else from the previous task's); `replay` is the fraction of each
    later task's training rows drawn from earlier tasks' training data; `routed` means the
    method keeps one LoRA per task and needs the task id, or automatic routing, to evaluate.
    """

    name: str = "naive"
    uses_crma: bool = False
    fresh_lora: bool = False
    replay: float = 0.0
    routed: bool = False
    stats_before: tuple[str, ...] = ()  # statistics of a task's training data `start` needs
    stats_after: tuple[str, ...] = ()   # ... and `remember` needs: "fisher", "input_gram"

    def init_memory(self, lora: Lora, tasks: int) -> Memory:
        """What the method keeps across tasks, before the first: plain arrays (a `Memory`)."""
        return {}

    def start(self, lora: Lora, memory: Memory, stats: dict[str, Any]) -> Lora:
        """The LoRA a task trains from, given the one it would start from and `stats_before`
        of its training data, measured on the model as it stands."""
        return lora

    def forward_lora(self, lora: Lora, memory: Memory) -> Lora:
        """The LoRA the forward pass uses while `lora` trains."""
        return lora

    def forward(self, trainable: dict[str, Any], memory: Memory) -> dict[str, Any]:
        """The adapter collections the training step's forward pass uses, from the trainable
        ones ({"lora", and "crma" with a substrate}): the LoRA of `forward_lora`; the substrate
        as it is, or, where `memory["substrate_frozen"]` is 1, with its gradient stopped (one
        compiled step serves the tasks that train it and those that do not)."""
        out = {**trainable, "lora": self.forward_lora(trainable["lora"], memory)}
        if "crma" in trainable and "substrate_frozen" in memory:
            f = memory["substrate_frozen"]
            out["crma"] = jax.tree.map(lambda c: f * jax.lax.stop_gradient(c) + (1 - f) * c, trainable["crma"])
        return out

    def start_crma(self, current: Any, fresh: Any) -> Any:
        """The substrate a task trains from: the one the earlier tasks left (`current`), or for a
        method with one substrate per task, `fresh`."""
        return current

    def eval_crma(self, substrates: Sequence[Any], current: Any, task: int, fresh: Any) -> Any:
        """The substrate to evaluate task `task` with, given each trained task's substrate
        (`substrates[t]`), the latest one and the one the task would start from."""
        return current

    def penalty(self, lora: Lora, memory: Memory) -> jax.Array:
        """The regulariser added to the mean token loss (float32 scalar)."""
        return jnp.float32(0.0)

    def remember(self, memory: Memory, lora: Lora, task: int, stats: dict[str, Any] | None = None) -> Memory:
        """Memory after task `task` ended with `lora`; `stats` holds `stats_after` of its data."""
        return memory

    def eval_lora(self, trained: Sequence[Lora], memory: Memory, task: int | None, fresh: Lora) -> Lora:
        """The LoRA to evaluate task `task` with (None: no task id), after `remember` of the
        last trained task. `trained[t]` is task t's trained LoRA for every task so far; `fresh`
        the LoRA a new task starts from. A routed method evaluates a task it has not trained yet
        with `fresh`, and has no single model: without a task id, routing picks among `trained`."""
        if not self.routed:
            return trained[-1]
        if task is None:
            raise ValueError(f"{self.name} keeps one LoRA per task: evaluate it with a task id or routing")
        return trained[task] if task < len(trained) else fresh

    def saved_sets(self, names: Sequence[str], trained: Sequence[Lora]) -> dict[str, Lora]:
        """The LoRA sets a run saves (and `crma export` exports): each task's trained LoRA by
        its name, and, for a method whose model is not one of them, that model last."""
        return dict(zip(names, trained))


def naive() -> Method:
    return Method()


def frozen() -> Method:
    """FROZEN: a fresh LoRA per task, no shared state; forgets nothing by construction."""
    return Method("frozen", fresh_lora=True, routed=True)


def modular() -> Method:
    """MODULAR (CRMA's proposal): a fresh LoRA per task on a CRMA substrate trained throughout."""
    return Method("modular", uses_crma=True, fresh_lora=True, routed=True)


@dataclasses.dataclass(frozen=True)
class FrozenSubstrate(Method):
    """FROZEN-SUBSTRATE, the paper's matched baseline: the CRMA substrate trains with the first
    task's LoRA, then stays frozen (its gradient stopped) while each later task trains a fresh
    LoRA on it. Against MODULAR it isolates what sharing a substrate that keeps training adds;
    against FROZEN, what a trained substrate adds. Memory: the 0/1 flag `substrate_frozen`."""

    name: str = "frozen_substrate"
    uses_crma: bool = True
    fresh_lora: bool = True
    routed: bool = True

    def init_memory(self, lora: Lora, tasks: int) -> Memory:
        return {"substrate_frozen": jnp.zeros((), jnp.float32)}

    def remember(self, memory: Memory, lora: Lora, task: int, stats: dict[str, Any] | None = None) -> Memory:
        return {"substrate_frozen": jnp.ones((), jnp.float32)}  # after the first task, for good


@dataclasses.dataclass(frozen=True)
class Isolated(Method):
    """ISOLATED: a fresh CRMA substrate and a fresh LoRA per task, each pair trained on its task
    alone and routed like FROZEN: nothing is shared, so no task can interfere with another. The
    no-interference bound with CRMA's capacity."""

    name: str = "isolated"
    uses_crma: bool = True
    fresh_lora: bool = True
    routed: bool = True

    def start_crma(self, current: Any, fresh: Any) -> Any:
        return fresh

    def eval_crma(self, substrates: Sequence[Any], current: Any, task: int, fresh: Any) -> Any:
        return substrates[task] if task < len(substrates) else fresh


def replay(fraction: float = 0.1) -> Method:
    """REPLAY: NAIVE with `fraction` of each later task's rows drawn from earlier tasks (TRACE: 10%)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"replay fraction must be in (0, 1), got {fraction}")
    return Method("replay", replay=fraction)


@dataclasses.dataclass(frozen=True)
class EWC(Method):
    """EWC: NAIVE plus λ/2·Σₜ Fₜ(θ − θ*ₜ)² over the earlier tasks' diagonal Fishers and optima
    (Kirkpatrick et al., 2017), kept as (ΣF, μ) by `ewc_accumulate`. TRACE uses λ = 400."""

    name: str = "ewc"
    stats_after: tuple[str, ...] = ("fisher",)
    lam: float = 400.0

    def init_memory(self, lora: Lora, tasks: int) -> Memory:
        return {"fisher": _zeros_like(lora), "anchor": _zeros_like(lora)}

    def penalty(self, lora: Lora, memory: Memory) -> jax.Array:
        return 0.5 * self.lam * ewc_penalty(lora, memory["fisher"], memory["anchor"])

    def remember(self, memory: Memory, lora: Lora, task: int, stats: dict[str, Any] | None = None) -> Memory:
        if not stats or "fisher" not in stats:
            raise ValueError("EWC needs the Fisher of the task it just trained")
        total, mean = ewc_accumulate(memory["fisher"], memory["anchor"], stats["fisher"], lora)
        return {"fisher": total, "anchor": mean}


@dataclasses.dataclass(frozen=True)
class OLoRA(Method):
    """O-LoRA (Wang et al., 2023): each task trains a fresh LoRA while the earlier tasks' LoRAs
    stay in the forward pass, frozen; the loss adds λ₁·Σ|A_oldᵀ·A_new| (official code: 0.5).
    One model, no task id at test time: the sum of every trained task's LoRA. The trained LoRAs
    sit in a rank-tasks·r buffer of zeros that fills task by task, so its shape never changes."""

    name: str = "olora"
    fresh_lora: bool = True
    lam: float = 0.5

    def init_memory(self, lora: Lora, tasks: int) -> Memory:
        return {"old": concat_lora([_zeros_like(lora)] * tasks)}

    def forward_lora(self, lora: Lora, memory: Memory) -> Lora:
        return concat_lora([jax.lax.stop_gradient(memory["old"]), lora])

    def penalty(self, lora: Lora, memory: Memory) -> jax.Array:
        return self.lam * olora_penalty(lora, jax.lax.stop_gradient(memory["old"]))

    def remember(self, memory: Memory, lora: Lora, task: int, stats: dict[str, Any] | None = None) -> Memory:
        return {**memory, "old": put_lora(memory["old"], lora, task, self.name)}

    def eval_lora(self, trained: Sequence[Lora], memory: Memory, task: int | None, fresh: Lora) -> Lora:
        return memory["old"]

    def saved_sets(self, names: Sequence[str], trained: Sequence[Lora]) -> dict[str, Lora]:
        if self.name in names:
            raise ValueError(f"a domain named {self.name!r} would clash with {self.name}'s summed set; rename it")
        return {**dict(zip(names, trained)), self.name: concat_lora(trained)}


def put_lora(old: Lora, new: Lora, task: int, owner: str) -> Lora:
    """`old` (every task's LoRA side by side, rank tasks·r, zeros for tasks not trained yet) with
    task `task`'s slot set to `new`."""
    def put(slots: dict[str, jax.Array], lora: dict[str, jax.Array]) -> dict[str, jax.Array]:
        r = lora["a"].shape[-1]
        if (task + 1) * r > slots["a"].shape[-1]:
            raise ValueError(f"task {task} is past the {slots['a'].shape[-1] // r} tasks {owner}'s memory was made for")
        a = jax.lax.dynamic_update_slice_in_dim(slots["a"], lora["a"].astype(jnp.float32), task * r, axis=-1)
        b = jax.lax.dynamic_update_slice_in_dim(slots["b"], lora["b"].astype(jnp.float32), task * r, axis=-2)
        return {"a": a, "b": b}

    return _map_pairs(lambda pairs: put(*pairs), [old, new])


@dataclasses.dataclass(frozen=True)
class InfLoRA(OLoRA):
    """InfLoRA (Liang & Li, CVPR 2024): like O-LoRA, each task adds a LoRA beside the earlier,
    frozen ones, and the model is their sum (no task id). The new A is not trained: it is fixed
    before the task to the top directions of the task's inputs that lie outside the subspace of
    the earlier tasks' inputs (`orthogonal_top`), and only B trains, from zero. An earlier task's
    inputs x then give x·A_new ≈ 0: the new LoRA does not interfere with it. After each task the
    subspace grows by GPM's rule (`gpm_extend`, `threshold` of the inputs' energy). No penalty.
    Memory per target: the LoRAs so far (`old`) and the projector (L, in, in) onto the subspace,
    float32: quadratic in the input width (Mistral-7B's down_proj alone: 32·14336²·4 B ≈ 26 GB)."""

    name: str = "inflora"
    stats_before: tuple[str, ...] = ("input_gram",)
    stats_after: tuple[str, ...] = ("input_gram",)
    threshold: float = 0.97
    lam: float = 0.0

    def init_memory(self, lora: Lora, tasks: int) -> Memory:
        def zero_projector(pair: list[dict[str, jax.Array]]) -> jax.Array:
            layers, n, _ = pair[0]["a"].shape
            return jnp.zeros((layers, n, n), jnp.float32)

        return {"old": concat_lora([_zeros_like(lora)] * tasks), "projector": _map_pairs(zero_projector, [lora])}

    def start(self, lora: Lora, memory: Memory, stats: dict[str, Any]) -> Lora:
        def design(pairs: list[Any]) -> dict[str, jax.Array]:
            fresh, projector, gram = pairs[0], pairs[1], pairs[2]
            a = jax.vmap(orthogonal_top, in_axes=(0, 0, None))(gram, projector, fresh["a"].shape[-1])
            return {"a": a.astype(fresh["a"].dtype), "b": jnp.zeros_like(fresh["b"])}

        return _map_pairs(design, [lora, memory["projector"], stats["input_gram"]])

    def forward_lora(self, lora: Lora, memory: Memory) -> Lora:
        fixed = _map_pairs(lambda pairs: {"a": jax.lax.stop_gradient(pairs[0]["a"]), "b": pairs[0]["b"]}, [lora])
        return concat_lora([jax.lax.stop_gradient(memory["old"]), fixed])

    def penalty(self, lora: Lora, memory: Memory) -> jax.Array:
        return jnp.float32(0.0)

    def remember(self, memory: Memory, lora: Lora, task: int, stats: dict[str, Any] | None = None) -> Memory:
        if not stats or "input_gram" not in stats:
            raise ValueError("InfLoRA needs the input Gram matrices of the task it just trained")
        extend = jax.vmap(gpm_extend, in_axes=(0, 0, None))
        projector = _map_pairs(lambda pairs: extend(pairs[0], pairs[1], self.threshold),
                               [memory["projector"], stats["input_gram"]])
        return {"old": put_lora(memory["old"], lora, task, self.name), "projector": projector}


METHODS: dict[str, Callable[[], Method]] = {
    "naive": naive, "frozen": frozen, "modular": modular, "replay": replay, "ewc": EWC, "olora": OLoRA,
    "inflora": InfLoRA, "frozen_substrate": FrozenSubstrate, "isolated": Isolated,
}
