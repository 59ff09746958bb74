"""`crma cl`'s evaluations after a sequence: every domain without its task id (routing for the
per-domain LoRAs), and the CRMA-toggle QA benchmark on the facts domains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from crma_jax.cl import Memory, Method
from crma_jax.data import split_holdout
from crma_jax.domains import FACTS_PREFIX, is_builtin
from crma_jax.evaluate import route
from crma_jax.facts import Fact, answer_questions, domain_facts, questions
from crma_jax.train.cl_data import Domain
from crma_jax.train.finetune import Session

if TYPE_CHECKING:
    from crma_jax.train.continual import CLConfig


def trained_facts(cfg: CLConfig, source: str) -> list[Fact]:
    """The facts of a facts-<domain> source whose documents fell in the training split."""
    facts = domain_facts(source[len(FACTS_PREFIX):])
    if cfg.max_documents:
        facts = facts[:cfg.max_documents]
    train_idx, _ = split_holdout(list(range(len(facts))), cfg.holdout_fraction, seed=0)
    return [facts[i] for i in train_idx]


def qa_eval(cfg: CLConfig, method: Method, session: Session, names: list[str], domains: dict[str, Domain],
            trained: list[Any], memory: Memory, fresh: list[Any], substrate_of: Callable[[int], Any]
            ) -> dict[str, Any] | None:
    """The CRMA-toggle QA benchmark on the facts domains among `names`: each trained fact asked
    in its held-out wording, greedy answer, exact match; with the task id, CRMA on and off on
    the same weights (off only for a method that trains CRMA). None without facts domains."""
    asked = {n: questions(trained_facts(cfg, domains[n][2].source)) for n in names
             if is_builtin(domains[n][2].source) and domains[n][2].source.startswith(FACTS_PREFIX)}
    if not asked:
        return None
    toggles = (True, False) if method.uses_crma else (True,)
    per_domain: dict[str, dict[str, float]] = {}
    right = {on: 0 for on in toggles}
    for j, n in enumerate(names):
        if n not in asked:
            continue
        lora = method.eval_lora(trained, memory, j, fresh[j])
        variables = {"params": session.frozen, "lora": lora, **({"crma": substrate_of(j)} if method.uses_crma else {})}
        per_domain[n] = {}
        for on in toggles:
            correct = answer_questions(session.model, variables, session.tokenizer, asked[n], crma_enabled=on,
                                       batch_size=cfg.batch_size)
            per_domain[n]["crma_on" if on else "crma_off"] = float(np.mean(correct))
            right[on] += sum(correct)
    total = sum(len(q) for q in asked.values())
    return {"questions": total, "per_domain": per_domain,
            **{("crma_on" if on else "crma_off"): right[on] / total for on in toggles}}


def agnostic_eval(cfg: CLConfig, method: Method, session: Session, names: list[str], domains: dict[str, Domain],
                  trained: list[Any], memory: Memory, fresh: list[Any], substrate_of: Callable[[int], Any]
                  ) -> dict[str, Any]:
    """Every domain scored without its task id, on each row's tokens after the first
    `routing_tokens` targets: routed methods pick a LoRA per row by the loss on those first
    tokens, the others are one model. `oracle_loss` is the task-id model on the same tokens.
    Each domain's LoRA routes with its own substrate (`substrate_of`: ISOLATED's differ)."""
    if method.routed:
        sets = dict(zip(names, trained))
        per_set = {n: {"crma": substrate_of(j)} for j, n in enumerate(names)} if method.uses_crma else None
    else:
        sets = {"model": method.eval_lora(trained, memory, None, fresh[0])}
        per_set = {"model": {"crma": substrate_of(len(names) - 1)}} if method.uses_crma else None
    out: dict[str, Any] = {"prefix_tokens": cfg.routing_tokens, "routed": method.routed, "loss": [], "oracle_loss": [],
                           "scored_tokens": [], "accuracy": {}}
    for n in names:
        r = route(session.model, session.frozen, sets, domains[n][1], n if method.routed else "model", cfg.batch_size,
                  cfg.routing_tokens, per_set=per_set, place=session.place)
        out["loss"].append(r.routed.loss)
        out["oracle_loss"].append(r.oracle.loss)
        out["scored_tokens"].append(r.routed.tokens)
        if method.routed:
            out["accuracy"][n] = r.accuracy
    out["acc"] = float(np.mean(out["loss"]))
    return out
