"""`crma cl`: the continual-learning protocol over an ordered list of domains.

Conditions (identical data, seeds and hyper-parameters):

- NAIVE:   one shared LoRA trained on every domain in turn, no CRMA;
- FROZEN:  a fresh LoRA per domain, no CRMA (no shared state: drift is 0 by construction);
- MODULAR: a fresh LoRA per domain on a shared CRMA substrate that keeps training.

After training domain i, the holdout loss L[i][j] of every domain j <= i is measured, domain j
with its own LoRA_j (oracle routing) on the substrate as it is now. Drift of domain j < K is
(L[K][j] − L[j][j]) / L[j][j]: positive is forgetting. Optional automatic routing picks, per
sequence, the LoRA with the lowest loss on the first k tokens.

Layout: RUN/<condition>/seed<s>/<domain>/ is an ordinary `crma train` run dir (resumable);
RUN/<condition>/seed<s>/progress.json records finished domains and their L rows, and
RUN/<condition>/seed<s>/adapters/ the LoRA sets and substrate after the last finished domain,
so an interrupted `crma cl --resume` restarts at the domain it stopped in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crma_jax.adapters import init_adapters
from crma_jax.convert.adapter_files import Adapters, load_adapters, save_adapters
from crma_jax.data import BatchIterator, build_dataset
from crma_jax.loss import next_token_loss
from crma_jax.train.config import TrainConfig
from crma_jax.train.finetune import Session, evaluate_holdout, open_session, train

CONDITIONS = ("naive", "frozen", "modular")


@dataclasses.dataclass
class CLConfig(TrainConfig):
    out: str = "runs/cl"
    domains: str = "legal,code,docs"  # NAME or NAME=PATH, comma-separated, in training order
    conditions: str = "naive,frozen,modular"
    seeds: str = "0"
    routing: bool = False
    routing_tokens: int = 32

    def domain_sources(self) -> dict[str, str]:
        out = {}
        for item in self.domains.split(","):
            name, _, path = item.partition("=")
            out[name.strip()] = (path or name).strip()
        if len(out) < 2:
            raise ValueError(f"continual learning needs >= 2 domains, got {list(out)}")
        return out

    def condition_list(self) -> list[str]:
        conds = [c.strip().lower() for c in self.conditions.split(",") if c.strip()]
        bad = set(conds) - set(CONDITIONS)
        if bad:
            raise ValueError(f"unknown conditions {sorted(bad)}; choose from {CONDITIONS}")
        return conds


def drift(matrix: list[list[float | None]]) -> list[float]:
    """drift_j = (L[K][j] − L[j][j]) / L[j][j] for every domain j before the last."""
    last = len(matrix) - 1
    return [(matrix[last][j] - matrix[j][j]) / matrix[j][j] for j in range(last)]


def routed_eval(
    session: Session, sets: dict[str, Any], crma: Any, holdout: Any, true_name: str, batches: int, k: int
) -> tuple[float, float]:
    """(routing accuracy, loss under routing) on one domain's holdout.

    Per sequence, the LoRA set with the lowest loss on the first `k` target tokens is chosen
    (an input-only decision), and that set's loss on the whole sequence is counted.
    """
    names = list(sets)
    model = session.model

    @jax.jit
    def per_row(variables: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = model.apply(variables, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        prefix = mask * (jnp.cumsum(mask, axis=1) <= k)

        def row_loss(m: jax.Array) -> tuple[jax.Array, jax.Array]:
            return jax.vmap(lambda lg, ids, mm: next_token_loss(lg[None], ids[None], mm[None]))(logits, batch["input_ids"], m)

        full, count = row_loss(mask)
        head, head_count = row_loss(prefix)
        return full, count, head / jnp.maximum(head_count, 1.0)

    hits, rows, total, count = 0, 0, 0.0, 0.0
    for _, batch in zip(range(batches), BatchIterator(holdout, session.cfg.batch_size, seed=0, shuffle=False)):
        batch = {key: jnp.asarray(v) for key, v in batch.items()}
        extra = {"crma": crma} if crma is not None else {}
        results = [jax.device_get(per_row({"params": session.frozen, "lora": sets[n], **extra}, batch)) for n in names]
        choice = np.stack([r[2] for r in results]).argmin(axis=0)
        for row, c in enumerate(choice):
            total += float(results[c][0][row])
            count += float(results[c][1][row])
            hits += names[c] == true_name
            rows += 1
    return hits / max(rows, 1), total / max(count, 1.0)


def run_sequence(cfg: CLConfig, condition: str, seed: int, domains: dict[str, tuple[Any, Any]], session: Session) -> dict[str, Any]:
    """Train `condition` over `domains` in order for one seed; returns {"L": ..., "drift": ...}."""
    root = Path(cfg.out) / condition / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    progress_file = root / "progress.json"
    progress = json.loads(progress_file.read_text()) if cfg.resume and progress_file.exists() else {"finished": [], "L": []}
    names = list(domains)
    modular = condition == "modular"
    sets: dict[str, Any] = {}
    crma = session.trainable.get("crma")
    shared_lora = session.trainable["lora"]
    if progress["finished"]:
        saved = load_adapters(root)
        sets, crma = saved.lora_sets, saved.crma_params if modular else None
        shared_lora = sets[progress["finished"][-1]]
    for i, name in enumerate(names):
        if name in progress["finished"]:
            continue
        fresh = init_lora(session, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        lora = shared_lora if condition == "naive" and i > 0 else fresh
        session.trainable = {"lora": lora, **({"crma": crma} if modular else {})}
        session.train_data, session.holdout = domains[name]
        step_cfg = dataclasses.replace(cfg, out=str(root / name), data=name, seed=seed, crma=modular, resume=True)
        train(step_cfg, session, log_prefix=f"{condition} s{seed} {name}")
        shared_lora = session.trainable["lora"]
        crma = session.trainable.get("crma")
        sets[name] = shared_lora
        row: list[float | None] = []
        for j, other in enumerate(names):
            if j > i:
                row.append(None)
                continue
            lora_j = shared_lora if condition == "naive" else sets[other]
            variables = {"params": session.frozen, "lora": lora_j, **({"crma": crma} if modular else {})}
            row.append(evaluate_holdout(session, variables, cfg.eval_batches, holdout=domains[other][1]))
        progress["finished"].append(name)
        progress["L"].append(row)
        save_adapters(root, Adapters(cfg.model, session.model.lora, session.model.crma, sets, crma))
        progress_file.write_text(json.dumps(progress, indent=2))
    result: dict[str, Any] = {"L": progress["L"], "drift": drift(progress["L"])}
    if cfg.routing and condition != "naive":
        routing = {n: routed_eval(session, sets, crma, domains[n][1], n, cfg.eval_batches, cfg.routing_tokens) for n in names}
        routed_last = [routing[n][1] for n in names]
        result["routing"] = {
            "accuracy": {n: routing[n][0] for n in names},
            "L_last": routed_last,
            "drift": [(routed_last[j] - progress["L"][j][j]) / progress["L"][j][j] for j in range(len(names) - 1)],
        }
    return result


def init_lora(session: Session, rng: jax.Array) -> Any:
    return init_adapters(session.model.clone(crma=None), session.frozen, rng)["lora"]


def summarize(results: dict[str, dict[int, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """Mean ± std over seeds of every domain's drift and of L, per condition."""
    out = {}
    for cond, by_seed in results.items():
        drifts = np.asarray([r["drift"] for r in by_seed.values()], np.float64)
        last = np.asarray([[x for x in r["L"][-1]] for r in by_seed.values()], np.float64)
        out[cond] = {
            "drift_mean": drifts.mean(0).tolist(),
            "drift_std": drifts.std(0).tolist(),
            "mean_drift": float(drifts.mean()),
            "mean_drift_std_over_seeds": float(drifts.mean(1).std()),
            "final_loss_mean": last.mean(0).tolist(),
        }
    return out


def markdown_table(summary: dict[str, Any], names: list[str], seeds: list[int]) -> str:
    """Drift per earlier domain (mean ± std over seeds), conditions side by side."""
    earlier = names[:-1]
    lines = [
        f"Drift (L[K][j] − L[j][j]) / L[j][j], mean ± std over seeds {seeds}; positive = forgetting.",
        "",
        "| condition | " + " | ".join(earlier) + " | mean |",
        "|---|" + "---|" * (len(earlier) + 1),
    ]
    for cond, s in summary.items():
        cells = [f"{100 * m:+.2f}% ± {100 * sd:.2f}" for m, sd in zip(s["drift_mean"], s["drift_std"])]
        lines.append(f"| {cond.upper()} | " + " | ".join(cells) + f" | {100 * s['mean_drift']:+.2f}% ± {100 * s['mean_drift_std_over_seeds']:.2f} |")
    return "\n".join(lines) + "\n"


def run_continual(cfg: CLConfig) -> dict[str, Any]:
    """Every condition x seed over the domains; writes results.json/.md and the plots."""
    from crma_jax.train.plots import plot_continual

    sources = cfg.domain_sources()
    conditions = cfg.condition_list()
    seeds = [int(s) for s in cfg.seeds.split(",")]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    results: dict[str, dict[int, dict[str, Any]]] = {}
    domains: dict[str, tuple[Any, Any]] | None = None
    sessions: dict[bool, Session] = {}
    for cond in conditions:
        # NAIVE and FROZEN (no CRMA) share one session, MODULAR has its own: all seeds and
        # domains reuse the loaded base and the compiled steps.
        modular = cond == "modular"
        if modular not in sessions:
            sessions[modular] = open_session(dataclasses.replace(cfg, crma=modular), load_data=False)
        session = sessions[modular]
        if domains is None:
            domains = {
                n: build_dataset(src, session.tokenizer, cfg.seq_len, holdout_fraction=cfg.holdout_fraction,
                                 seed=0, text_field=cfg.text_field, max_documents=cfg.max_documents or None)
                for n, src in sources.items()
            }
        for seed in seeds:
            session.trainable = init_adapters(session.model, session.frozen, jax.random.PRNGKey(seed))
            results.setdefault(cond, {})[seed] = run_sequence(cfg, cond, seed, domains, session)
    names = list(sources)
    summary = summarize(results, names)
    payload = {"domains": names, "conditions": conditions, "seeds": seeds, "results": results, "summary": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(summary, names, seeds)
    (out / "results.md").write_text(table)
    if cfg.plots:
        plot_continual(payload, out)
    return payload
