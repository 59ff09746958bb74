"""PNG plots of a run: loss, gradient norm with clip events, CRMA spectral-norm deviation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from crma_jax.train.metrics import read_metrics  # noqa: E402


def plot_run(run: Path) -> list[Path]:
    """Write loss.png (the holdout curve from its step-0 loss, RUN/initial_eval.json, when it
    was measured), grad_norm.png (raw and after ZClip, told apart by colour, width and dash) and
    (with CRMA) spectral_norm.png into `run`."""
    import json

    run = Path(run)
    rec = read_metrics(run)
    steps = [r["step"] for r in rec]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rec], label="train loss", lw=1)
    ev = [(r["step"], r["eval_loss"]) for r in rec if "eval_loss" in r]
    if ev and (run / "initial_eval.json").exists():
        ev.insert(0, (0, json.loads((run / "initial_eval.json").read_text())["holdout_loss"]))
    if ev:
        ax.plot(*zip(*ev), "o-", label="holdout loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    written.append(_save(fig, run / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    # The raw norm is drawn wide and grey under the clipped one, which follows it except at clips.
    ax.plot(steps, [r["grad_norm"] for r in rec], lw=2.4, color="0.6", label="grad norm (raw)")
    if any("zclip/clipped_norm" in r for r in rec):
        ax.plot(steps, [r.get("zclip/clipped_norm") for r in rec], lw=1, ls="--", color="C0", label="after ZClip")
    clipped = [(r["step"], r["grad_norm"]) for r in rec if r.get("zclip/clipped")]
    if clipped:
        ax.scatter(*zip(*clipped), color="red", s=14, zorder=3, label=f"clipped ({len(clipped)})")
    ax.set(xlabel="step", ylabel="global grad norm", title="Gradient norm", yscale="log")
    ax.legend()
    written.append(_save(fig, run / "grad_norm.png"))

    if any("crma_spectral_dev" in r for r in rec):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [max(r["crma_spectral_dev"], 1e-12) for r in rec], lw=1)
        ax.set(xlabel="step", ylabel="max over layers |‖M‖₂ − 1|", title="CRMA spectral-norm deviation", yscale="log")
        written.append(_save(fig, run / "spectral_norm.png"))
    return written


def plot_overlay(runs: dict[str, Path], key: str, out: Path, title: str, log: bool = True) -> Path:
    """One line per run of metric `key` against step (e.g. grad norm, CRMA on vs off)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        rec = read_metrics(Path(run))
        ax.plot([r["step"] for r in rec], [r[key] for r in rec], lw=1, label=name)
    ax.set(xlabel="step", ylabel=key, title=title, yscale="log" if log else "linear")
    ax.legend()
    return _save(fig, out)


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    if tight:  # a colour bar shared by several axes does not survive tight_layout
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__: Sequence[str] = ("plot_run", "plot_overlay", "plot_continual")


def _bars(stds: list[float | None]) -> Any:
    """Error bars of sample stds, or None (no bars) when one seed leaves them undefined."""
    import numpy as np

    if any(v is None for v in stds):
        return None
    return np.asarray(stds, np.float64)


def _seeds(payload: dict) -> str:
    """"n = 3 seeds": what every CL figure says its means are over."""
    n = min(len(by_seed) for by_seed in payload["results"].values())
    return f"n = {n} seed{'s' if n > 1 else ''}" + ("" if n > 1 else ", no error bars")


def plot_continual(payload: dict, out: Path) -> list[Path]:
    """heatmap.png (seed-mean holdout loss L[i][j] per condition, one colour scale for all),
    drift.png (drift per domain, ± sample std over seeds), transfer.png (mean loss with and
    without the task id, BWT per condition) and, when a condition trains the CRMA substrate,
    substrate.png (its per-layer displacement at init and after each domain). Every figure
    states its number of seeds; error bars only when there are two or more."""
    import numpy as np

    names, summary = payload["domains"], payload["summary"]
    conds = list(summary)
    seeds = _seeds(payload)
    means = {}
    for cond in conds:
        mats = [[[np.nan if x is None else x for x in row] for row in r["L"]] for r in payload["results"][cond].values()]
        means[cond] = np.mean(np.asarray(mats, float), axis=0)
    # One scale for every panel, so that equal colours are equal losses across conditions.
    lo, hi = np.nanmin([m for m in means.values()]), np.nanmax([m for m in means.values()])
    fig, axes = plt.subplots(1, len(conds), figsize=(4.0 * len(conds) + 1.2, 3.9), squeeze=False)
    for ax, cond in zip(axes[0], conds):
        mat = means[cond]
        im = ax.imshow(mat, cmap="viridis", vmin=lo, vmax=hi)
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):  # white on the dark (low-loss) half, black on the light half
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if v < (lo + hi) / 2 else "k")
        ax.set(title=cond.upper(), xticks=range(len(names)), yticks=range(len(names)),
               xticklabels=names, yticklabels=[f"after {n}" for n in names], xlabel="evaluated on")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="holdout loss (nats/token, lower is better)")
    fig.suptitle(f"Holdout loss L[i][j] after training domain i, mean over seeds ({seeds})", fontsize=10)
    heat = _save(fig, Path(out) / "heatmap.png", tight=False)

    fig, ax = plt.subplots(figsize=(8.5, 4))
    earlier = names[:-1]
    width = 0.8 / len(conds)
    for k, cond in enumerate(conds):
        x = np.arange(len(earlier)) + k * width
        y = 100 * np.asarray(summary[cond]["drift_mean"])
        errors = _bars(summary[cond]["drift_std"])
        bars = ax.bar(x, y, width, yerr=None if errors is None else 100 * errors, label=cond.upper(), capsize=3)
        # A zero-height bar is invisible: a thick line across each bar's top, over the axis line, shows zeros too.
        ax.hlines(y, x - width / 2, x + width / 2, color=bars.patches[0].get_facecolor(), lw=3, zorder=3,
                  label=f"_{cond} tops")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xticks=np.arange(len(earlier)) + width * (len(conds) - 1) / 2, xticklabels=earlier,
           ylabel="drift (%)", title=f"Forgetting of earlier domains (positive = forgot; {seeds})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    paths = [heat, _save(fig, Path(out) / "drift.png")]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(conds))
    for ax, (key, label) in zip(axes, [("acc", "mean loss, with task id (lower is better)"),
                                       ("agnostic_acc", "mean loss, without task id (lower is better)"),
                                       ("bwt", "BWT (negative = forgetting)")]):
        values, errors = [summary[c][key]["mean"] for c in conds], _bars([summary[c][key]["std"] for c in conds])
        if key == "bwt":
            ax.bar(x, values, yerr=errors, capsize=3)
            ax.hlines(values, x - 0.4, x + 0.4, color="C0", lw=3, zorder=3)  # zeros visible
        else:  # losses differ by a few percent: points on a zoomed axis, not bars from 0
            ax.errorbar(x, values, yerr=errors, fmt="o", capsize=3)
            ax.grid(axis="y", alpha=0.3)
        ax.set(xticks=x, xticklabels=[c.upper() for c in conds], title=label)
        ax.tick_params(axis="x", rotation=30)
    axes[2].axhline(0, color="k", lw=0.8)
    fig.suptitle(f"Over the sequence ({seeds})", fontsize=10)
    paths.append(_save(fig, Path(out) / "transfer.png"))

    moved = {}
    for c in conds:
        runs = [r for r in payload["results"][c].values() if r.get("substrate")]
        if runs:
            moved[c] = runs[0]
    if moved:
        fig, ax = plt.subplots(figsize=(11, 4))
        for cond, r in moved.items():
            if r.get("substrate_init"):
                start = r["substrate_init"]
                ax.plot(start["mix_displacement"], ls="--", color="0.5", label=f"{cond.upper()} at init "
                        f"(‖h′−h‖/‖h‖ = {start['hidden_change']:.2e})")
            for i, entry in enumerate(r["substrate"]):
                ax.plot(entry["mix_displacement"], marker=".", label=f"{cond.upper()} after {names[i]} "
                        f"(‖h′−h‖/‖h‖ = {entry['hidden_change']:.2e})")
        ax.set(xlabel="layer", ylabel="‖α(Mᵀ − I)‖_F", title="How far the CRMA substrate moved (first seed)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never on them
        paths.append(_save(fig, Path(out) / "substrate.png"))
    return paths
