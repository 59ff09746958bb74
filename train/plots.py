"""PNG plots of a run: loss, gradient norm with clip events, CRMA spectral-norm deviation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from crma_jax.train.metrics import read_metrics  # noqa: E402


def plot_run(run: Path) -> list[Path]:
    """Write loss.png, grad_norm.png and (with CRMA) spectral_norm.png into `run`."""
    run = Path(run)
    rec = read_metrics(run)
    steps = [r["step"] for r in rec]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rec], label="train loss", lw=1)
    ev = [(r["step"], r["eval_loss"]) for r in rec if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="holdout loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    written.append(_save(fig, run / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["grad_norm"] for r in rec], lw=1, label="grad norm (raw)")
    if any("zclip/clipped_norm" in r for r in rec):
        ax.plot(steps, [r.get("zclip/clipped_norm") for r in rec], lw=1, label="after ZClip")
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


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__: Sequence[str] = ("plot_run", "plot_overlay", "plot_continual")


def _bars(stds: list[float | None]) -> Any:
    """Error bars of sample stds; none (0) where one seed leaves the std undefined (None)."""
    import numpy as np

    return np.asarray([0.0 if v is None else v for v in stds], np.float64)


def plot_continual(payload: dict, out: Path) -> list[Path]:
    """heatmap.png (seed-mean L[i][j] per condition), drift.png (drift per domain, ± std),
    transfer.png (ACC with and without the task id, BWT per condition) and, when a condition
    trains the CRMA substrate, substrate.png (its per-layer displacement at init and after each domain)."""
    import numpy as np

    names, summary = payload["domains"], payload["summary"]
    conds = list(summary)
    fig, axes = plt.subplots(1, len(conds), figsize=(4.2 * len(conds), 3.8), squeeze=False)
    for ax, cond in zip(axes[0], conds):
        mats = [[[np.nan if x is None else x for x in row] for row in r["L"]] for r in payload["results"][cond].values()]
        mat = np.mean(np.asarray(mats, float), axis=0)
        im = ax.imshow(mat, cmap="viridis")
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set(title=cond.upper(), xticks=range(len(names)), yticks=range(len(names)),
               xticklabels=names, yticklabels=[f"after {n}" for n in names], xlabel="evaluated on")
        fig.colorbar(im, ax=ax, fraction=0.046)
    heat = _save(fig, Path(out) / "heatmap.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    earlier = names[:-1]
    width = 0.8 / len(conds)
    for k, cond in enumerate(conds):
        x = np.arange(len(earlier)) + k * width
        ax.bar(x, 100 * np.asarray(summary[cond]["drift_mean"]), width, yerr=100 * _bars(summary[cond]["drift_std"]),
               label=cond.upper(), capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xticks=np.arange(len(earlier)) + width * (len(conds) - 1) / 2, xticklabels=earlier,
           ylabel="drift (%)", title="Forgetting of earlier domains (positive = forgot)")
    ax.legend()
    paths = [heat, _save(fig, Path(out) / "drift.png")]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(conds))
    for ax, (key, label) in zip(axes, [("acc", "ACC: mean final loss (task id)"),
                                       ("agnostic_acc", "ACC without task id"),
                                       ("bwt", "BWT (negative = forgetting)")]):
        means, stds = [summary[c][key]["mean"] for c in conds], _bars([summary[c][key]["std"] for c in conds])
        if key == "bwt":
            ax.bar(x, means, yerr=stds, capsize=3)
        else:  # losses differ by a few percent: points on a zoomed axis, not bars from 0
            ax.errorbar(x, means, yerr=stds, fmt="o", capsize=3)
            ax.grid(axis="y", alpha=0.3)
        ax.set(xticks=x, xticklabels=[c.upper() for c in conds], title=label)
        ax.tick_params(axis="x", rotation=30)
    axes[2].axhline(0, color="k", lw=0.8)
    paths.append(_save(fig, Path(out) / "transfer.png"))

    moved = {}
    for c in conds:
        runs = [r for r in payload["results"][c].values() if r.get("substrate")]
        if runs:
            moved[c] = runs[0]
    if moved:
        fig, ax = plt.subplots(figsize=(7, 4))
        for cond, r in moved.items():
            if r.get("substrate_init"):
                start = r["substrate_init"]
                ax.plot(start["mix_displacement"], ls="--", color="0.5", label=f"{cond.upper()} at init "
                        f"(‖h′−h‖/‖h‖ = {start['hidden_change']:.2e})")
            for i, entry in enumerate(r["substrate"]):
                ax.plot(entry["mix_displacement"], marker=".", label=f"{cond.upper()} after {names[i]} "
                        f"(‖h′−h‖/‖h‖ = {entry['hidden_change']:.2e})")
        ax.set(xlabel="layer", ylabel="‖α(Mᵀ − I)‖_F", title="How far the CRMA substrate moved (first seed)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, Path(out) / "substrate.png"))
    return paths
