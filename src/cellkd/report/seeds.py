"""Mean and 95% confidence interval over training seeds, shared by Tables 2, 4, 5 and 6 and the fine-tuning curve.

Every model is trained once per seed of the config's ``seeds`` on the same data (the data seed ``seed`` fixes
slides and splits), so the seeds' scores are independent draws of the training noise. The interval is the
Student t-interval of their mean: ``t.ppf(0.975, n - 1) * sd / sqrt(n)`` with the sample standard deviation
(``ddof=1``). It needs two seeds; with one it is NaN and the tables say ``n=1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

SEED_COLUMN = "seed"
SEEDS_COLUMN = "seeds"
"""Column of the aggregated tables: how many seeds each mean is over (n)."""
CI_LEVEL = 0.95


def ci95_half_width(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% Student t-interval of the mean of ``values``; NaN for fewer than two finite values."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    n = finite.size
    if n < 2:
        return math.nan
    # scipy.stats is imported here, not at module level: it costs ~1 CPU s, and the fine-tuning and evaluation jobs
    # import this module (through cellkd.report.classification) without ever computing an interval.
    from scipy import stats

    t = float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1))
    return t * float(finite.std(ddof=1)) / math.sqrt(n)


def mean_ci95(
    per_seed: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str], carry: Sequence[str] = ()
) -> pd.DataFrame:
    """Aggregate per-seed rows: one row per ``keys`` group (in first-seen order) with ``<metric>_mean``,
    ``<metric>_ci95`` (95% t-interval half-width, NaN with one seed) for each of ``metrics``, the ``carry``
    columns (the same for every seed, e.g. the test-set size; the first seed's value) and ``seeds`` (n).
    """
    rows = []
    for key, group in per_seed.groupby(list(keys), sort=False, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{metric}_mean"] = float(finite.mean()) if finite.size else math.nan
            row[f"{metric}_ci95"] = ci95_half_width(values)
        for column in carry:
            row[column] = group[column].iloc[0]
        row[SEEDS_COLUMN] = int(group[SEED_COLUMN].nunique()) if SEED_COLUMN in group else len(group)
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_ci(mean: float, ci95: float, digits: int = 3) -> str:
    """``0.892 ± 0.010``; the mean alone when there is no interval (one seed); empty for NaN."""
    if not math.isfinite(mean):
        return ""
    if not math.isfinite(ci95):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci95:.{digits}f}"


def markdown_view(aggregated: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """The aggregated table for people: each ``<metric>_mean``/``_ci95`` pair as one ``<metric>`` text column."""
    view = aggregated.copy()
    for metric in metrics:
        position = view.columns.get_loc(f"{metric}_mean")
        text = [
            format_mean_ci(mean, ci, digits)
            for mean, ci in zip(view[f"{metric}_mean"], view[f"{metric}_ci95"], strict=True)
        ]
        view = view.drop(columns=[f"{metric}_mean", f"{metric}_ci95"])
        view.insert(position, metric, text)
    return view


def interval_note(seed_counts: Sequence[int] | pd.Series) -> str:
    """What the ± means, for a table title: ``mean ± 95% CI, t-interval over 3 seeds`` (or ``n=1``: no CI)."""
    counts = sorted({int(n) for n in seed_counts})
    if counts == [1]:
        return "one training seed (n=1): no confidence interval"
    listed = "/".join(str(n) for n in counts)
    return f"mean ± 95% CI, t-interval over {listed} seeds"
