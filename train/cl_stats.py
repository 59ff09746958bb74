"""The statistics a continual-learning method needs of a task's training data (`Method.stats_before`
and `stats_after`): EWC's diagonal Fisher and InfLoRA's input Gram matrices, both over the same
batches drawn shuffled from the whole domain."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from crma_jax.cl import Memory, Method, diagonal_fisher, per_sequence_grads
from crma_jax.data import BatchIterator, PackedData
from crma_jax.lora import LORA_INPUTS
from crma_jax.train.finetune import Session
from crma_jax.train_step import forward_loss


def task_stats(names: tuple[str, ...], session: Session, method: Method, lora: Any, memory: Memory,
               data: PackedData, batches: int, seed: int) -> dict[str, Any]:
    """The statistics `names` ("fisher", "input_gram") of one domain's training data, each over
    the same `batches` full batches drawn in a seeded shuffled order from the whole domain (not
    the first rows, which would be the first documents only)."""
    if not names:
        return {}
    chosen = list(itertools.islice(BatchIterator(data, session.cfg.batch_size, seed=seed, epochs=1), batches))
    return {name: TASK_STATS[name](session, method, lora, memory, chosen) for name in names}


def task_fisher(session: Session, method: Method, lora: Any, memory: Memory, batches: list[Any]) -> Any:
    """EWC's diagonal Fisher of `lora`: the mean squared gradient of each sequence's own mean
    token loss, over every sequence of `batches` (`crma_jax.cl.diagonal_fisher`)."""
    def mean_loss(x: Any, batch: Any) -> jax.Array:
        total, (count, _) = forward_loss(session.model, {"params": session.frozen, "lora": x}, batch, None)
        return total / jnp.maximum(count, 1.0)

    grads = jax.jit(per_sequence_grads(mean_loss))
    return diagonal_fisher(lambda p, b: grads(p, session.place(b)), lora, batches)


def task_input_grams(session: Session, method: Method, lora: Any, memory: Memory, batches: list[Any]) -> Any:
    """XᵀX of every LoRA target's inputs (L, in, in), summed over `batches`, on the model the
    method trains (its forward LoRA on the base)."""
    @jax.jit
    def grams(forward: Any, batch: Any) -> Any:
        _, state = session.model.apply({"params": session.frozen, "lora": forward}, batch["input_ids"],
                                       positions=batch["positions"], segment_ids=batch["segment_ids"],
                                       method="hidden", mutable=[LORA_INPUTS])
        return jax.tree.map(lambda sown: sown[0], state[LORA_INPUTS], is_leaf=lambda x: isinstance(x, tuple))

    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))  # one program, not one per leaf (`_accumulate_squares`)
    total = None
    for batch in batches:
        g = grams(method.forward_lora(lora, memory), session.place(batch))
        total = g if total is None else jax.block_until_ready(add(total, g))
    if total is None:
        raise ValueError(f"no batch of {session.cfg.batch_size} rows to measure the inputs on")
    # {module: {proj: {"gram": G}}} -> {module: {proj: G}}, the layout of a LoRA set's pairs
    return jax.tree.map(lambda node: node["gram"], total, is_leaf=lambda x: isinstance(x, dict) and "gram" in x)


TASK_STATS = {"fisher": task_fisher, "input_gram": task_input_grams}
