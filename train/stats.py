"""Mean, sample standard deviation and range over seeds: the one way every table reports them.

The std is the sample std (n − 1 in the denominator, numpy's ddof=1), the estimate the papers we
compare with report; it is undefined for one value (None), and a table then shows the value
alone, without ±. Every table states n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def summary(values: Sequence[float]) -> dict[str, Any]:
    """{"n", "mean", "std" (sample; None when n < 2), "min", "max"} of `values` (n >= 1)."""
    a = np.asarray(values, np.float64)
    if a.size == 0:
        raise ValueError("summary needs at least one value")
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None,
            "min": float(a.min()), "max": float(a.max())}


def sample_std(rows: np.ndarray) -> list[float | None]:
    """Per column of `rows` (n, k): the sample std, or None for every column when n < 2."""
    rows = np.asarray(rows, np.float64)
    return rows.std(0, ddof=1).tolist() if rows.shape[0] > 1 else [None] * rows.shape[1]


def spread(values: Sequence[float] | dict[str, Any], scale: float = 1.0, signed: bool = True, digits: int = 4,
           extremes: bool = True) -> str:
    """"mean ± std [min, max]" of `values` (or of their `summary`) × `scale`, or "mean ± std"
    without `extremes`; a std carries no sign. One value is just that value: it has no spread."""
    s = values if isinstance(values, dict) else summary(values)
    sign = "+" if signed else ""
    if s["std"] is None:
        return f"{scale * s['mean']:{sign}.{digits}f}"
    text = f"{scale * s['mean']:{sign}.{digits}f} ± {scale * s['std']:.{digits}f}"
    return text + (f" [{scale * s['min']:{sign}.{digits}f}, {scale * s['max']:{sign}.{digits}f}]" if extremes else "")


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t confidence interval (n − 1 degrees of freedom) of the mean of paired
    per-seed differences at `level`; None for fewer than two pairs."""
    from scipy import stats as scipy_stats  # a dependency of jax itself

    a = np.asarray(diffs, np.float64)
    if a.size < 2:
        return None
    half = float(scipy_stats.t.ppf(0.5 + level / 2, a.size - 1)) * float(a.std(ddof=1)) / np.sqrt(a.size)
    return float(a.mean()) - half, float(a.mean()) + half
