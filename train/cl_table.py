"""`crma cl-table RUN [RUN ...]`: markdown tables comparing finished `crma cl` runs.

Each row is one condition over its seeds, after the settings that differ between the runs (or
those named with --settings). Runs with the same settings pool their seeds into one row, so a
condition's seeds may come from several invocations, provided every domain's documents are the
same (their fingerprints in results.json agree; `check_same_documents`); a seed found in two
runs is kept once if both hold the same results, and is an error otherwise. The first table
gives the transfer metrics as mean ± sample std [min, max] over seeds (`crma_jax.train.stats`):
mean drift, mean loss (GEM's ACC), BWT, FWT, the task-agnostic mean loss, (for routed methods) how often routing picked
the right LoRA, and the minutes per sequence. The second gives the mean starting and final
holdout losses per domain, and how far the CRMA substrate sat from the identity at init and
after each domain (mean over layers of ‖α(Mᵀ − I)‖_F) with the mean ‖h′ − h‖/‖h‖ it made on the
holdout. Every number is read from RUN/results.json and RUN/config.yaml, so a table in
RESULTS.md is the output of this command over the runs it names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from crma_jax.train.cl_results import METRICS_LEGEND
from crma_jax.train.stats import paired_interval, spread
from crma_jax.train.continual import CLConfig, unread_settings
from crma_jax.train.run_dir import RESULT_NEUTRAL, read_config

SHOWN = {"conditions", "seeds"}  # every row names its condition and seeds anyway


def varying_settings(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The settings whose value differs between the runs, in config order."""
    keys = [k for k in configs[0] if k not in RESULT_NEUTRAL | SHOWN]
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _mean(values: list[Any]) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _substrate(runs: list[dict[str, Any]]) -> tuple[str, str]:
    """("init → after d1 → …" of the mean displacement, the same of the hidden change)."""
    steps: list[tuple[float | None, float | None]] = []
    inits = [r.get("substrate_init") for r in runs]
    if all(inits):
        steps.append((_mean([np.mean(s["mix_displacement"]) for s in inits]), _mean([s["hidden_change"] for s in inits])))
    else:
        steps.append((None, None))
    for i in range(len(runs[0].get("substrate") or [])):
        entries = [r["substrate"][i] for r in runs]
        steps.append((_mean([np.mean(e["mix_displacement"]) for e in entries]), _mean([e["hidden_change"] for e in entries])))
    if len(steps) == 1:
        return "–", "–"
    fmt = lambda v: "?" if v is None else f"{v:.2g}"  # noqa: E731 - local formatter
    return " → ".join(fmt(d) for d, _ in steps), " → ".join(fmt(h) for _, h in steps)


def _routing(runs: list[dict[str, Any]]) -> str:
    accuracies = [np.mean(list(r["agnostic"]["accuracy"].values())) for r in runs if r["agnostic"].get("accuracy")]
    return spread(accuracies, 100, signed=False, digits=1) + "%" if accuracies else "– (one model)"


def _wall(runs: list[dict[str, Any]]) -> str:
    minutes = _mean([r.get("wall_s") for r in runs])
    return "?" if minutes is None else f"{minutes / 60:.1f}"


class Row(NamedTuple):
    """One condition under one set of settings: its results by seed, pooled over runs."""

    config: dict[str, Any]
    condition: str
    by_seed: dict[str, dict[str, Any]]


def _cpus(rows: Sequence[Row]) -> str:
    """The CPU models the rows' wall minutes were measured on (runs record them in results.json)."""
    cpus = sorted({cpu for row in rows for r in row.by_seed.values() for cpu in r.get("cpus", ["an unrecorded CPU"])})
    return cpus[0] if len(cpus) == 1 else f"{len(cpus)} CPUs ({'; '.join(cpus)}): compare rows of one CPU only"


def pool(payloads: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows in order of first appearance: one per condition and result-relevant settings, with the
    seeds of every run that has them. The same seed twice must carry the same results (wall time
    aside: a rerun reproduces the numbers, not the minutes)."""
    rows: dict[tuple[str, str], Row] = {}
    for payload, config in zip(payloads, configs):
        for cond, by_seed in payload["results"].items():
            row = rows.setdefault((cond, _settings_key(config, cond)), Row(config, cond, {}))
            for seed, result in by_seed.items():
                kept = row.by_seed.get(seed)
                if kept is None:
                    row.by_seed[seed] = result
                elif _numbers(kept) != _numbers(result):
                    raise ValueError(f"seed {seed} of {cond} is in both {row.config.get('out')} and {config.get('out')} "
                                     "with different results; name one of them")
    for row in rows.values():
        ordered = sorted(row.by_seed.items(), key=lambda kv: int(kv[0]))  # results.json keys seeds as "0", "1", ...
        row.by_seed.clear()
        row.by_seed.update(ordered)
    return list(rows.values())


def _settings_key(config: dict[str, Any], condition: str) -> str:
    """The settings that decide `condition`'s results: all but the neutral ones and the
    method-only keys it does not read."""
    ignored = RESULT_NEUTRAL | SHOWN | unread_settings(condition)
    return json.dumps({k: v for k, v in config.items() if k not in ignored}, sort_keys=True)


def _shown(config: dict[str, Any], condition: str, key: str) -> str:
    """A setting's value in `condition`'s row; "–" for a method-only key it does not read."""
    return "–" if key in unread_settings(condition) else str(config.get(key))


def _numbers(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k not in ("wall_s", "cpus")}, sort_keys=True)


def versus(row: Row, reference: Row | None, key: str) -> str:
    """Paired over the seeds both rows have: 100·(x − x_ref)/x_ref of a loss (`acc`, or the
    task-agnostic `agnostic`), as mean ± sample std [min, max], with n and, for n >= 2, the
    95% Student-t confidence interval of the mean (`crma_jax.train.stats.paired_interval`);
    negative = lower loss than the reference."""
    if reference is None:
        return "–"
    get = (lambda r: r["agnostic"]["acc"]) if key == "agnostic" else (lambda r: r[key])  # noqa: E731
    seeds = [s for s in row.by_seed if s in reference.by_seed]
    if not seeds:
        return "– (no common seed)"
    ratios = [get(row.by_seed[s]) / get(reference.by_seed[s]) - 1 for s in seeds]
    interval = paired_interval(ratios)
    ci = "" if interval is None else f"; 95% CI [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"
    return spread(ratios, 100, digits=2) + f" ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}{ci})"


def transfer_table(rows: Sequence[Row], shown: Sequence[str], against: Sequence[str] = ()) -> str:
    """Per row: the transfer metrics as mean ± std [min, max] over its seeds; for each condition of
    `against`, also both mean losses relative to that condition's under the same settings, per seed."""
    head = [*shown, "condition", "seeds", "mean drift %", "mean loss ↓", "BWT", "FWT", "task-agnostic mean loss ↓",
            "routing accuracy", "wall min"]
    legend = (f"Mean ± sample std (ddof 1) [min, max] over the n seeds of the seeds column (one seed: its value); "
              f"mean drift over the earlier domains. {METRICS_LEGEND} Wall: "
              f"minutes per sequence (training, evaluation, checkpoints), mean over seeds, on {_cpus(rows)}.")
    for reference in against:
        head += [f"mean loss vs {reference.upper()} %", f"task-agnostic mean loss vs {reference.upper()} %"]
    if against:
        legend += (" Mean loss vs REFERENCE: per seed, (mean loss − mean loss of REFERENCE) / mean loss of REFERENCE "
                   "under the same settings and seed, over the seeds both have, with the 95% Student-t confidence "
                   "interval of the mean difference; negative = lower loss.")
    references = [{_settings_key(row.config, name): row for row in rows if row.condition == name} for name in against]
    lines = [legend, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in rows:
        config, cond, by_seed = entry
        runs = list(by_seed.values())
        row = [*(_shown(config, cond, k) for k in shown), cond.upper(), ",".join(by_seed),
               spread([np.mean(r["drift"]) for r in runs], 100, digits=2), spread([r["acc"] for r in runs], signed=False),
               spread([r["bwt"] for r in runs]), spread([r["fwt"] for r in runs]),
               spread([r["agnostic"]["acc"] for r in runs], signed=False), _routing(runs), _wall(runs)]
        for name, by_settings in zip(against, references):
            reference = by_settings.get(_settings_key(config, name))
            row += [versus(entry, reference, "acc"), versus(entry, reference, "agnostic")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load(run_dirs: Sequence[Path]) -> tuple[list[str], list[dict[str, Any]], list[Row]]:
    """(domains, each run's settings, the pooled rows) of `run_dirs`, each a finished `crma cl`
    RUN over the same domains; ValueError naming the run otherwise."""
    payloads, configs = [], []
    for run in run_dirs:
        path = Path(run) / "results.json"
        try:
            payloads.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a finished `crma cl` run ({e})") from e
        configs.append(read_config(run, CLConfig))
    names = payloads[0]["domains"]
    for payload, config in zip(payloads, configs):
        if payload["domains"] != names:
            raise ValueError(f"{config.get('out')}: domains {payload['domains']} differ from {names}")
    check_same_documents(run_dirs, payloads)
    return names, configs, pool(payloads, configs)


def check_same_documents(run_dirs: Sequence[Path], payloads: Sequence[dict[str, Any]]) -> None:
    """ValueError naming both runs and the domain when two runs' domains are not the same
    documents (their fingerprints differ; a run from before fingerprints has none)."""
    first = payloads[0].get("fingerprints")
    for run, payload in zip(run_dirs[1:], payloads[1:]):
        prints = payload.get("fingerprints")
        if prints == first:
            continue
        differ = [n for n in payloads[0]["domains"] if (first or {}).get(n) != (prints or {}).get(n)]
        raise ValueError(f"{run_dirs[0]} and {run} trained on different documents (domain fingerprints differ: "
                         f"{', '.join(differ)}); their results cannot be pooled")


def cl_table(run_dirs: Sequence[Path], settings: Sequence[str] | None = None, against: Sequence[str] = ()) -> str:
    """The markdown tables of `run_dirs` (each a finished `crma cl` RUN); each condition of `against`
    adds each row's mean losses relative to that condition's (`versus`); it must be in the runs."""
    names, configs, rows = load(run_dirs)
    for name in against:
        if not any(row.condition == name for row in rows):
            raise ValueError(f"--versus {name}: no such condition in the runs (they have "
                             f"{', '.join(sorted({row.condition for row in rows}))})")
    shown = list(settings) if settings else varying_settings(configs)
    head = [*shown, "condition", "seeds", "base loss", "L[j][j] after training j", "L[K][j] at the end", "mean loss ↓",
            "BWT", "FWT",
            "‖α(Mᵀ−I)‖ init → after each domain", "‖h′−h‖/‖h‖ init → after each domain"]
    lines = [f"Domains {' → '.join(names)}; losses per domain in that order, mean over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, cond, by_seed in rows:
        runs = list(by_seed.values())
        L = np.mean([r["L"] for r in runs], axis=0)
        base = np.mean([r["base"] for r in runs], axis=0)
        disp, hidden = _substrate(runs)
        row = [*(_shown(config, cond, k) for k in shown), cond.upper(), ",".join(by_seed),
               " / ".join(f"{v:.4f}" for v in base), " / ".join(f"{L[j, j]:.4f}" for j in range(len(names))),
               " / ".join(f"{v:.4f}" for v in L[-1]),
               *(f"{_mean([r[k] for r in runs]):+.4f}" if k != "acc" else f"{_mean([r[k] for r in runs]):.4f}"
                 for k in ("acc", "bwt", "fwt")), disp, hidden]
        lines.append("| " + " | ".join(row) + " |")
    return transfer_table(rows, shown, against) + "\n" + "\n".join(lines) + "\n"


def cl_plots(run_dirs: Sequence[Path], out: Path, settings: Sequence[str] | None = None) -> list[Path]:
    """The `crma cl` plots (heatmaps, drift, mean loss/BWT, substrate) of the pooled rows, written into
    `out`, which must be new or empty (earlier plots are never overwritten). A condition found
    under several settings is labelled with them."""
    from crma_jax.train.cl_results import summarize
    from crma_jax.train.plots import plot_continual

    names, configs, rows = load(run_dirs)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new directory for the plots")
    shown = list(settings) if settings else varying_settings(configs)
    repeated = {row.condition for row in rows if sum(r.condition == row.condition for r in rows) > 1}
    results = {}
    for config, cond, by_seed in rows:
        settings = ", ".join(f"{k}={_shown(config, cond, k)}" for k in shown)
        label = f"{cond} ({settings})" if cond in repeated and shown else cond
        if label in results:
            raise ValueError(f"{cond} appears under settings that --settings {','.join(shown) or '(none)'} does not "
                             "tell apart; name the settings that differ")
        results[label] = by_seed
    out.mkdir(parents=True, exist_ok=True)
    return plot_continual({"domains": names, "results": results, "summary": summarize(results)}, out)
