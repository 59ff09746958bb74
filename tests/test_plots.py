"""Plots a person can compare: one colour scale across the CL heatmaps, zeros that show, error
bars only over two or more seeds with n on every figure, legends off the data, and a run's
holdout curve from its step-0 loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from crma_jax.train import plots
from crma_jax.train.cl_results import summarize


@pytest.fixture
def figures(monkeypatch):
    """Every figure `plots` saves, by file name, inspected after it was drawn."""
    saved = {}
    original = plots._save

    def keep(fig, path, tight=True):
        fig.canvas.draw()
        saved[Path(path).name] = fig
        return original(fig, path, tight)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def _payload(seeds: int) -> dict:
    rng = np.random.default_rng(seeds)
    results = {}
    for cond, scale in (("naive", 3.0), ("frozen", 1.0)):  # very different ranges of loss
        by_seed = {}
        for s in range(seeds):
            L = (scale * (1 + rng.random((2, 2)))).tolist()
            if cond == "frozen":
                L[1][0] = L[0][0]  # FROZEN does not forget: zero drift
            by_seed[str(s)] = {"L": L, "acc": float(np.mean(L[1])), "bwt": L[0][0] - L[1][0], "fwt": 0.1,
                               "drift": [(L[1][0] - L[0][0]) / L[0][0]], "agnostic": {"acc": float(np.mean(L[1]))},
                               "wall_s": 1.0, "substrate": [{"mix_displacement": [0.1, 0.2, 0.3],
                                                             "hidden_change": 0.1}] * 2,
                               "substrate_init": {"mix_displacement": [0.0, 0.0, 0.0], "hidden_change": 0.0}}
        results[cond] = by_seed
    return {"domains": ["a", "b"], "results": results, "summary": summarize(results)}


def _overlaps(fig, legend, ax) -> bool:
    a, b = legend.get_window_extent(), ax.get_window_extent()
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("seeds", [1, 3])
def test_cl_figures_share_a_scale_show_zeros_and_bar_only_real_spreads(tmp_path, figures, seeds):
    paths = plots.plot_continual(_payload(seeds), tmp_path)
    assert sorted(p.name for p in paths) == ["drift.png", "heatmap.png", "substrate.png", "transfer.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)

    heat = figures["heatmap.png"]
    panels = [ax for ax in heat.axes if ax.images]
    assert len(panels) == 2 and len({ax.images[0].get_clim() for ax in panels}) == 1  # one colour scale
    lo, hi = panels[0].images[0].get_clim()
    both = np.concatenate([np.ravel(ax.images[0].get_array()) for ax in panels])
    assert (lo, hi) == pytest.approx((both.min(), both.max()))
    colorbar = [ax for ax in heat.axes if not ax.images]
    assert len(colorbar) == 1 and "holdout loss" in colorbar[0].get_ylabel()

    n = f"n = {seeds} seed"
    for name in ("heatmap.png", "drift.png", "transfer.png"):
        fig = figures[name]
        titles = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        assert any(n in t for t in titles), (name, titles)
        if name == "heatmap.png":
            continue
        errors = [c if isinstance(c, ErrorbarContainer) else getattr(c, "errorbar", None)
                  for ax in fig.axes for c in ax.containers]
        bars = [c for c in errors if c is not None and c.lines[2]]  # (data line, caps, bar lines)
        assert bool(bars) == (seeds > 1), name  # error bars only over two or more seeds

    drift = figures["drift.png"].axes[0]
    tops = [c for c in drift.collections if c.get_label().endswith(" tops")]
    assert len(tops) == 2 and [seg[:, 1].tolist() for seg in tops[1].get_segments()] == [[0.0, 0.0]]  # FROZEN's zero
    assert tops[1].get_zorder() > max(line.get_zorder() for line in drift.lines)  # drawn over the axis line
    assert not _overlaps(figures["drift.png"], drift.get_legend(), drift)
    substrate = figures["substrate.png"].axes[0]
    assert not _overlaps(figures["substrate.png"], substrate.get_legend(), substrate)
    transfer = figures["transfer.png"]
    assert [ax.get_title() for ax in transfer.axes][:2] == ["mean loss, with task id (lower is better)",
                                                            "mean loss, without task id (lower is better)"]


def test_a_run_plot_starts_the_holdout_curve_at_step_0_and_tells_raw_from_clipped_norms(tmp_path, figures):
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "grad_norm": 1.0 + s, "zclip/clipped_norm": 1.0,
             "zclip/clipped": s == 3, **({"eval_loss": 2.5} if s == 4 else {})} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "initial_eval.json").write_text(json.dumps({"holdout_loss": 3.4}))
    plots.plot_run(tmp_path)
    holdout = next(line for line in figures["loss.png"].axes[0].lines if line.get_label() == "holdout loss")
    assert list(holdout.get_xdata()) == [0, 4] and list(holdout.get_ydata()) == [3.4, 2.5]
    raw, clipped = figures["grad_norm.png"].axes[0].lines[:2]
    assert (raw.get_color(), raw.get_linewidth(), raw.get_linestyle()) != (
        clipped.get_color(), clipped.get_linewidth(), clipped.get_linestyle())
    assert raw.get_linewidth() > clipped.get_linewidth() and clipped.get_linestyle() == "--"
