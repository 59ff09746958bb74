"""`crma cl`: the continual-learning protocol over an ordered list of domains.

Conditions (identical data, seeds and hyper-parameters):

- NAIVE:   one shared LoRA trained on every domain in turn, no CRMA;
- FROZEN:  a fresh LoRA per domain, no CRMA (no shared state: drift is 0 by construction);
- MODULAR: a fresh LoRA per domain on a shared CRMA substrate that keeps training.

After training domain i, the holdout loss L[i][j] of every domain j <= i is measured, domain j
with its own LoRA_j (oracle routing) on the substrate as it is now, over every token of its
holdout (`crma_jax.evaluate`). Drift of domain j < K is (L[K][j] − L[j][j]) / L[j][j]: positive
is forgetting. Optional automatic routing picks, per packed row, the LoRA with the lowest loss
on the first k target tokens, and is scored on the row's later tokens only.

With `--lora-init pissa` the frozen base is PiSSA's residual W − s·A0·B0, and every fresh LoRA
(each domain's for FROZEN/MODULAR, the shared one for NAIVE) starts from the same factors
(A0, B0), so each domain starts from exactly the base model.

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
import numpy as np

from crma_jax.adapters import init_adapters
from crma_jax.convert.adapter_files import load_adapters
from crma_jax.data import DataSpec, PackedData
from crma_jax.evaluate import route
from crma_jax.train.config import TrainConfig, setting
from crma_jax.train.finetune import OnCheckpoint, Session, data_spec, evaluate_holdout, open_session, \
    save_run_adapters, train
from crma_jax.train.run_dir import check_run_dir, write_config
from crma_jax.train_step import batch_sharding

CONDITIONS = ("naive", "frozen", "modular")
Domain = tuple[PackedData, PackedData, DataSpec]  # (train, holdout, spec)


@dataclasses.dataclass
class CLConfig(TrainConfig):
    cli_exclude = ("data",)

    out: str = setting("runs/cl", "output directory; must be new or empty unless --resume")
    domains: str = setting("legal,code,docs", "NAME or NAME=PATH, comma-separated, in training order "
                                              "(--domain flags take precedence)")
    conditions: str = setting("naive,frozen,modular", "comma-separated conditions to run")
    seeds: str = setting("0", "comma-separated seeds; every condition runs every seed")
    routing: bool = setting(False, "also report automatic routing (the LoRA picked from the input)")
    routing_tokens: int = setting(32, "target tokens per row used to pick the LoRA; scored on the rest")

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


def run_sequence(cfg: CLConfig, condition: str, seed: int, domains: dict[str, Domain], session: Session,
                 on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
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
        session.train_data, session.holdout, session.data_spec = domains[name]
        step_cfg = dataclasses.replace(cfg, out=str(root / name), data=domains[name][2].source, seed=seed, crma=modular)
        train(step_cfg, session, log_prefix=f"{condition} s{seed} {name}", on_checkpoint=on_checkpoint, data_name=name)
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
            row.append(evaluate_holdout(session, variables, holdout=domains[other][1]))
        progress["finished"].append(name)
        progress["L"].append(row)
        save_run_adapters(root, session, sets, crma, {n: domains[n][2] for n in sets})
        progress_file.write_text(json.dumps(progress, indent=2))
    result: dict[str, Any] = {"L": progress["L"], "drift": drift(progress["L"])}
    if cfg.routing and condition != "naive":
        sharding = batch_sharding(session.mesh)
        routing = {n: route(session.model, session.frozen, sets, domains[n][1], n, cfg.batch_size, cfg.routing_tokens,
                            shared={"crma": crma} if modular else None,
                            place=lambda b: jax.device_put(b, sharding)) for n in names}
        result["routing"] = {
            "prefix_tokens": cfg.routing_tokens,
            "accuracy": {n: r.accuracy for n, r in routing.items()},
            "routed_loss": [routing[n].routed.loss for n in names],
            "oracle_loss": [routing[n].oracle.loss for n in names],
            "scored_tokens": [routing[n].routed.tokens for n in names],
        }
    return result


def init_lora(session: Session, rng: jax.Array) -> Any:
    """A fresh LoRA set: PiSSA's initial factors (A0, B0) for a PiSSA session, else a new draw."""
    if session.lora_init is not None:
        return session.lora_init
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


def run_continual(cfg: CLConfig, on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """Every condition x seed over the domains; writes results.json/.md and the plots.

    `on_checkpoint` is passed to every domain's `train` (tests inject faults there).
    """
    from crma_jax.train.plots import plot_continual

    sources = cfg.domain_sources()
    conditions = cfg.condition_list()
    seeds = [int(s) for s in cfg.seeds.split(",")]
    out = Path(cfg.out)
    check_run_dir(out, cfg, cfg.resume)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    domains: dict[str, Domain] | None = None
    sessions: dict[bool, Session] = {}
    for cond in conditions:
        # NAIVE and FROZEN (no CRMA) share one session, MODULAR has its own: all seeds and
        # domains reuse the loaded base and the compiled steps.
        modular = cond == "modular"
        if modular not in sessions:
            sessions[modular] = open_session(dataclasses.replace(cfg, crma=modular), load_data=False)
        session = sessions[modular]
        if domains is None:
            # One split for every condition and seed: the holdout never depends on the seed.
            domains = {}
            for n, src in sources.items():
                spec = data_spec(cfg, source=src, split_seed=0)
                domains[n] = (*spec.build(session.tokenizer), spec)
            write_config(out, cfg)  # model and data loaded: the run directory is claimed
        for seed in seeds:
            session.trainable = init_adapters(session.model, session.frozen, jax.random.PRNGKey(seed))
            results.setdefault(cond, {})[seed] = run_sequence(cfg, cond, seed, domains, session, on_checkpoint)
    names = list(sources)
    summary = summarize(results, names)
    payload = {"domains": names, "conditions": conditions, "seeds": seeds, "results": results, "summary": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(summary, names, seeds)
    (out / "results.md").write_text(table)
    if cfg.plots:
        plot_continual(payload, out)
    return payload
