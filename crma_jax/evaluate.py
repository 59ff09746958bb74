"""Held-out evaluation: the one loop that `crma train`, `crma cl` and `crma eval` all use.

Every row of a packed split is visited exactly once, in order; the last batch is topped up with
all-masked rows so that every batch has the same (B, T) shape (one compiled program) and
contributes nothing. Each target token (`loss_mask == 1`, see `crma_jax.data`) therefore counts
exactly once, whatever the split's size relative to the batch.

Automatic routing (`route`) picks, per row, the LoRA set with the lowest loss on the first k
target tokens, and scores that choice only on the tokens *after* those k, so the choice never
sees the tokens it is scored on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from crma_jax.data import PackedData
from crma_jax.distributed import to_host

Batch = dict[str, np.ndarray]
Place = Callable[[Batch], Any]


def to_device(batch: Batch) -> dict[str, jax.Array]:
    """The default `place`: every array onto the default device."""
    return {k: jnp.asarray(v) for k, v in batch.items()}


def eval_batches(data: PackedData, batch_size: int) -> Iterator[Batch]:
    """Batches of int32 (batch_size, T) arrays over every row of `data` once, in order.

    The final batch is padded with rows whose `loss_mask` and `segment_ids` are all 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, data.num_rows, batch_size):
        batch = data.rows(slice(start, start + batch_size))
        short = batch_size - batch["input_ids"].shape[0]
        if short:
            batch = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in batch.items()}
        yield batch


@functools.partial(jax.jit, static_argnames=("model", "crma_enabled"))
def batch_token_nll(model: Any, variables: dict[str, Any], batch: dict[str, jax.Array],
                    crma_enabled: bool = True) -> jax.Array:
    """(B, T) float32 per-token NLL of `model` with `variables` on one batch (`Decoder.token_nll`:
    column t scores input_ids[:, t]; 0 in column 0 and where `loss_mask` is 0). Deterministic,
    jitted once per model and batch shape."""
    return model.apply(variables, batch["input_ids"], batch["loss_mask"], batch["positions"],
                       batch["segment_ids"], crma_enabled=crma_enabled, method="token_nll")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Mean NLL over `tokens` target tokens (`nll_sum` / `tokens`)."""

    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def evaluate(model: Any, variables: dict[str, Any], data: PackedData, batch_size: int, *,
             crma_enabled: bool = True, place: Place = to_device,
             progress: Callable[[Iterator[Batch], int], Iterator[Batch]] | None = None) -> EvalResult:
    """Next-token loss of `model` over every target token of `data`, each counted once.

    `place` puts a host batch on the devices (default: the default device; a training run passes
    its batch sharding). Summation is in float64 on the host.
    """
    batches: Iterator[Batch] = eval_batches(data, batch_size)
    if progress is not None:
        batches = progress(batches, -(-data.num_rows // batch_size))
    total, count = 0.0, 0
    for batch in batches:
        nll = to_host(batch_token_nll(model, variables, place(batch), crma_enabled)).astype(np.float64)
        total += float(nll.sum())
        count += int(batch["loss_mask"][:, 1:].sum())
    return EvalResult(total, count)


@functools.partial(jax.jit, static_argnames=("model",))
def _relative_change(model: Any, variables: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    def hidden(enabled: bool) -> jax.Array:
        return model.apply(variables, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                           crma_enabled=enabled, method="hidden")[0].astype(jnp.float32)

    on, off = hidden(True), hidden(False)
    return jnp.linalg.norm(on - off, axis=-1) / jnp.maximum(jnp.linalg.norm(off, axis=-1), 1e-30)


def crma_effect(model: Any, variables: dict[str, Any], data: PackedData, batch_size: int, *,
                place: Place = to_device) -> float:
    """Mean over the real tokens of `data` of ‖h_on − h_off‖ / ‖h_off‖, the final hidden states
    with CRMA on and off on the same weights: how much the substrate changes the function."""
    total, count = 0.0, 0
    for batch in eval_batches(data, batch_size):
        change = to_host(_relative_change(model, variables, place(batch))).astype(np.float64)
        real = batch["segment_ids"] > 0
        total += float(change[real].sum())
        count += int(real.sum())
    return total / count if count else float("nan")


@dataclasses.dataclass(frozen=True)
class RoutingResult:
    """Automatic routing on one split.

    choices: (rows,) index (into the routed set names) chosen for every real row;
    accuracy: fraction of real rows routed to `true_name`;
    routed: the loss of the chosen sets on the scored tokens (those after the first k);
    oracle: the loss of the true set on the same scored tokens.
    """

    names: tuple[str, ...]
    choices: np.ndarray
    accuracy: float
    routed: EvalResult
    oracle: EvalResult


def route(model: Any, frozen: Any, sets: Mapping[str, Any], data: PackedData, true_name: str, batch_size: int,
          prefix_tokens: int, *, shared: Mapping[str, Any] | None = None,
          per_set: Mapping[str, Mapping[str, Any]] | None = None, place: Place = to_device) -> RoutingResult:
    """Route every row of `data` among the LoRA `sets` by the loss on its first `prefix_tokens`
    target tokens; score only the later target tokens. `shared` holds other collections used by
    every set (the CRMA substrate); `per_set[name]` those of one set only (its own substrate)."""
    if prefix_tokens < 1:
        raise ValueError(f"prefix_tokens must be >= 1, got {prefix_tokens}")
    names = tuple(sets)
    if true_name not in names:
        raise ValueError(f"true set {true_name!r} is not among the routed sets {list(names)}")
    truth = names.index(true_name)
    choices, routed_sum, oracle_sum, scored = [], 0.0, 0.0, 0
    for batch in eval_batches(data, batch_size):
        device_batch = place(batch)
        nll = np.stack([to_host(batch_token_nll(model, {"params": frozen, "lora": sets[n], **(shared or {}),
                                                        **(per_set or {}).get(n, {})},
                                                 device_batch)).astype(np.float64) for n in names])
        mask = batch["loss_mask"].astype(bool)
        seen = np.cumsum(mask, axis=1)
        prefix, suffix = mask & (seen <= prefix_tokens), mask & (seen > prefix_tokens)
        head = (nll * prefix).sum(-1) / np.maximum(prefix.sum(-1), 1)  # (sets, B)
        choice = head.argmin(axis=0)
        real = mask.any(axis=1)
        tail = (nll * suffix).sum(-1)  # (sets, B)
        rows = np.arange(len(choice))
        routed_sum += float(tail[choice, rows][real].sum())
        oracle_sum += float(tail[truth][real].sum())
        scored += int(suffix[real].sum())
        choices.append(choice[real])
    chosen = np.concatenate(choices) if choices else np.zeros(0, int)
    accuracy = float(np.mean(chosen == truth)) if chosen.size else float("nan")
    return RoutingResult(names, chosen, accuracy, EvalResult(routed_sum, scored), EvalResult(oracle_sum, scored))
