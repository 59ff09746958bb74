"""The results of one `crma cl` run: each condition summarised over its seeds (what
RUN/results.json holds under "summary") and RUN/results.md, the table `crma cl` prints."""

from __future__ import annotations

from typing import Any

import numpy as np

from crma_jax.train import stats


def summarize(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per condition, over seeds: each metric's `crma_jax.train.stats.summary` (n, mean, sample
    std, range), per-domain drift, final losses."""
    out = {}
    for cond, by_seed in results.items():
        runs = list(by_seed.values())
        drifts = np.asarray([r["drift"] for r in runs], np.float64)
        out[cond] = {
            "acc": stats.summary([r["acc"] for r in runs]),
            "bwt": stats.summary([r["bwt"] for r in runs]),
            "fwt": stats.summary([r["fwt"] for r in runs]),
            "mean_drift": stats.summary(drifts.mean(1).tolist()),
            "agnostic_acc": stats.summary([r["agnostic"]["acc"] for r in runs]),
            "drift_mean": drifts.mean(0).tolist(),
            "drift_std": stats.sample_std(drifts),
            "final_loss_mean": np.asarray([r["L"][-1] for r in runs], np.float64).mean(0).tolist(),
            "wall_s": stats.summary([r["wall_s"] for r in runs]),
        }
        for toggle in ("crma_on", "crma_off"):
            if all(toggle in r.get("qa", {}) for r in runs):
                out[cond][f"qa_{toggle}"] = stats.summary([r["qa"][toggle] for r in runs])
    return out


METRICS_LEGEND = (
    "Drift (L[K][j] − L[j][j]) / L[j][j]: positive = forgetting. Mean loss: the holdout loss after the last domain, "
    "averaged over the domains (GEM's ACC, on loss: lower is better). BWT = mean (L[j][j] − L[K][j]) and FWT = mean "
    "(base[j] − L[j−1][j]), GEM's definitions on loss: positive = transfer, negative BWT = forgetting. Task-agnostic "
    "mean loss: no task id (routing for the per-domain LoRAs), on the tokens after each row's routing prefix.")


def markdown_table(summary: dict[str, Any], names: list[str], seeds: list[int]) -> str:
    """Per-domain drift and the transfer metrics per condition, mean ± std over seeds."""
    earlier = names[:-1]
    lines = [
        f"Holdout loss after the last domain, " + ("mean ± sample std (ddof 1) " if len(seeds) > 1 else "")
        + f"over the n = {len(seeds)} seed{'s' if len(seeds) > 1 else ''} {seeds}. {METRICS_LEGEND}",
        "",
        "| condition | " + " | ".join(f"drift {n}" for n in earlier) + " | mean drift | mean loss ↓ | BWT | FWT | "
        "task-agnostic mean loss ↓ | wall s |",
        "|---|" + "---|" * (len(earlier) + 6),
    ]

    def pm(s: dict[str, Any], scale: float = 1.0, signed: bool = False, digits: int = 4) -> str:
        return stats.spread(s, scale, signed, digits, extremes=False)

    for cond, s in summary.items():
        cells = [pm({"mean": m, "std": sd}, 100, True, 2) + "%" for m, sd in zip(s["drift_mean"], s["drift_std"])]
        lines.append(f"| {cond.upper()} | " + " | ".join(cells) + f" | {pm(s['mean_drift'], 100, True, 2)}% | "
                     f"{pm(s['acc'])} | {pm(s['bwt'], signed=True)} | {pm(s['fwt'], signed=True)} | "
                     f"{pm(s['agnostic_acc'])} | {s['wall_s']['mean']:.0f} |")
    if any("qa_crma_on" in s for s in summary.values()):
        lines += ["", "QA on the fictional facts (held-out wording, greedy answer, exact match), with the task id; "
                  "CRMA off only for conditions that train it, on the same weights.", "",
                  "| condition | accuracy, CRMA on | accuracy, CRMA off |", "|---|---|---|"]
        for cond, s in summary.items():
            if "qa_crma_on" in s:
                off = pm(s["qa_crma_off"], 100, digits=1) + "%" if "qa_crma_off" in s else "–"
                lines.append(f"| {cond.upper()} | {pm(s['qa_crma_on'], 100, digits=1)}% | {off} |")
    return "\n".join(lines) + "\n"
