"""Phase IV results: Table 6 (the student before and after fine-tuning on expert labels) and its F1 curve."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cellkd.errors import StoreError
from cellkd.report.figures import png_figure
from cellkd.report.seeds import SEEDS_COLUMN, mean_ci95
from cellkd.report.tables import SeedTablePaths, concat_tables, write_seed_outputs
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

TABLE6_TITLE = (
    "Table 6: the student before and after fine-tuning on expert (EA) labels, on the reserved EA test nuclei - "
    "`f1_macro`: unweighted mean over the nucleus classes (the expert labels nuclei, never background: a nucleus "
    "predicted as background is an error in its class's recall); `f1_weighted`: weighted by class support; "
    "`f1_macro_gain`: after - before, paired within each seed"
)
_KEY_COUNT = "_requested_count"  # the key's count; metrics.csv has its own "count" column to check it against
TABLE6_KEYS = ("stain", "labels", "count")
TABLE6_METRICS = (
    "f1_macro_before",
    "f1_macro_after",
    "f1_macro_gain",
    "f1_weighted_before",
    "f1_weighted_after",
    "accuracy_before",
    "accuracy_after",
)
_AVERAGES = ("f1_macro", "f1_weighted")
KEPT_STUDENT = "student kept"
"""The ``setting`` of a seed whose un-fine-tuned student won on validation (lr, dropout and epochs NaN)."""


def table6(metrics_csvs: Mapping[tuple[str, str, int, int], PathLike]) -> pd.DataFrame:
    """Per-seed Table 6: one row per (stain, labels, count, seed) from the ``metrics.csv`` of ``finetune_student``.

    Columns: stain, labels, count (requested), seed, effective_count, lr, dropout, epochs (of the chosen grid
    point, from the ``grid.csv`` beside each metrics.csv; NaN when the un-fine-tuned student won on validation
    and was kept), setting (those three as text), f1_macro_before, f1_macro_after, f1_macro_gain (after -
    before: the chosen model minus that seed's own student, on that seed's test nuclei), f1_weighted_before,
    f1_weighted_after, accuracy_before, accuracy_after, f1_<class>_after per class of the metrics (background
    included), nuclei (test rows); sorted by stain, labels, count, seed.
    """
    if not metrics_csvs:
        raise StoreError(
            "no fine-tuning metrics.csv given; pass results/finetune/{stain}/{labels}/n{count}/seed{seed}/metrics.csv"
        )
    long = concat_tables(metrics_csvs, ("stain", "labels", _KEY_COUNT, "seed"))
    missing_columns = sorted({"f1_macro", "f1_weighted", "accuracy"} - set(long.columns))
    if missing_columns:
        msg = (
            f"{list(metrics_csvs.values())}: no column(s) {missing_columns} (written by an older cellkd, which named "
            "macro F1 plain 'f1'); rerun the fine-tuning rules (snakemake --forcerun finetune_student)"
        )
        raise StoreError(msg)
    mismatch = long[long[_KEY_COUNT].astype(int) != long["count"].astype(int)]
    if len(mismatch):
        first = mismatch.iloc[0]
        key = (str(first["stain"]), str(first["labels"]), int(first[_KEY_COUNT]), int(first["seed"]))
        msg = (
            f"{metrics_csvs[key]}: holds count {int(first['count'])} but was given for {key}; "
            "pass each metrics.csv under its own (stain, labels, count, seed)"
        )
        raise StoreError(msg)
    per_class = [c for c in long.columns if c.startswith("f1_") and c not in _AVERAGES]  # f1_<class>, background too
    rows = []
    for (stain, labels, count, seed), group in long.groupby(["stain", "labels", "count", "seed"], sort=True):
        key = (str(stain), str(labels), int(count), int(seed))
        phases = group.set_index("phase")
        missing = sorted({"before", "after"} - set(phases.index))
        if missing:
            raise StoreError(f"{metrics_csvs[key]}: no {missing} row(s); rerun the fine-tuning rule for {key}")
        before, after = phases.loc["before"], phases.loc["after"]
        lr, dropout = float(after["lr"]), float(after["dropout"])
        epochs = _chosen_epochs(metrics_csvs[key])
        rows.append(
            {
                "stain": stain,
                "labels": labels,
                "count": int(count),
                "seed": int(seed),
                "effective_count": int(after["effective_count"]),
                "lr": lr,
                "dropout": dropout,
                "epochs": epochs,
                "setting": _setting(lr, dropout, epochs),
                "f1_macro_before": float(before["f1_macro"]),
                "f1_macro_after": float(after["f1_macro"]),
                "f1_macro_gain": float(after["f1_macro"]) - float(before["f1_macro"]),
                "f1_weighted_before": float(before["f1_weighted"]),
                "f1_weighted_after": float(after["f1_weighted"]),
                "accuracy_before": float(before["accuracy"]),
                "accuracy_after": float(after["accuracy"]),
                **{f"{column}_after": float(after[column]) for column in per_class},
                "nuclei": int(after["nuclei"]),
            }
        )
    return pd.DataFrame(rows)


def _chosen_epochs(metrics_csv: PathLike) -> float:
    """Best epoch of the selected grid point, from the grid.csv that finetune_student writes beside metrics.csv.

    NaN when the student was kept (its best_epoch is 0) or when there is no grid.csv (a hand-made metrics.csv).
    """
    grid_csv = Path(metrics_csv).with_name("grid.csv")
    if not grid_csv.exists():
        return math.nan
    grid = pd.read_csv(grid_csv)
    chosen = grid[grid["selected"].astype(bool)]
    if chosen.empty or int(chosen["best_epoch"].iloc[0]) == 0:
        return math.nan
    return float(chosen["best_epoch"].iloc[0])


def _setting(lr: float, dropout: float, epochs: float) -> str:
    if math.isnan(lr):
        return KEPT_STUDENT
    text = f"lr={lr:g}, dropout={dropout:g}"
    return text if math.isnan(epochs) else f"{text}, epochs={epochs:g}"


def table6_metrics(per_seed: pd.DataFrame) -> tuple[str, ...]:
    """:data:`TABLE6_METRICS` plus the per-class ``f1_<class>_after`` columns that ``per_seed`` holds."""
    per_class = [
        c for c in per_seed.columns if c.startswith("f1_") and c.endswith("_after") and c not in TABLE6_METRICS
    ]
    return (*TABLE6_METRICS, *per_class)


def summarize_table6(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Table 6 over seeds: per (stain, labels, count) the mean ± 95% CI of :func:`table6_metrics` (so
    ``f1_macro_gain_mean``/``_ci95`` is the gain vs the student), effective_count, nuclei, seeds, and the
    most frequent chosen ``setting`` with ``setting_seeds``: how many seeds chose it (ties: the lowest seed's).
    """
    aggregated = mean_ci95(per_seed, TABLE6_KEYS, table6_metrics(per_seed), carry=("effective_count", "nuclei"))
    # Counter.most_common keeps first-seen order among ties; the rows are sorted by seed.
    modes = per_seed.groupby(list(TABLE6_KEYS), sort=False)["setting"].apply(lambda s: Counter(s).most_common(1)[0])
    chosen = pd.DataFrame(modes.tolist(), columns=["setting", "setting_seeds"], index=modes.index).reset_index()
    return aggregated.merge(chosen, on=list(TABLE6_KEYS), how="left", validate="one_to_one")


def plot_finetune_curve(table: pd.DataFrame, png_path: PathLike) -> None:
    """Mean macro F1 over seeds against the effective labels per class, one colour per (stain, labels): solid
    after fine-tuning, dashed before (the student), each with its shaded 95% CI band (none with one seed)."""
    import matplotlib
    import matplotlib.ticker

    counts = table["effective_count"].to_numpy()
    with png_figure(png_path, dpi=120, figsize=(6.0, 4.2)) as (_, ax):
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, ((stain, labels), group) in enumerate(table.groupby(["stain", "labels"], sort=True)):
            group = group.sort_values(["effective_count", "count"])
            colour = colours[i % len(colours)]
            for phase, style in (("after", "o-"), ("before", "x--")):
                mean = group[f"f1_macro_{phase}_mean"].to_numpy(dtype=float)
                ci = group[f"f1_macro_{phase}_ci95"].to_numpy(dtype=float)
                ax.plot(group["effective_count"], mean, style, color=colour, label=f"{stain} / {labels}: {phase}")
                if np.isfinite(ci).any():
                    ax.fill_between(group["effective_count"], mean - ci, mean + ci, color=colour, alpha=0.15, lw=0)
        if len(counts) and counts.min() > 0 and counts.max() / counts.min() >= 10:
            ax.set_xscale("log")  # counts grow geometrically in the grid (10, 50, 100, 500, ...)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 10, 100 rather than 10^1, 10^2
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("expert labels per class (effective count)")
        ax.set_ylabel("macro F1 (mean over nucleus classes)\non the reserved EA test nuclei")
        seeds = sorted(set(table[SEEDS_COLUMN].astype(int)))
        band = (
            "no band: one seed" if seeds == [1] else f"band: 95% CI, t-interval over {'/'.join(map(str, seeds))} seeds"
        )
        ax.set_title(f"Fine-tuning the student on expert labels\n(mean over seeds; {band})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def write_table6(
    metrics_csvs: Mapping[tuple[str, str, int, int], PathLike], paths: SeedTablePaths, png_path: PathLike
) -> pd.DataFrame:
    """Table 6 from the fine-tuning ``metrics.csv`` files keyed by (stain, labels, count, seed) -> CSVs, Markdown, PNG.

    See :func:`table6` for the per-seed rows, :func:`summarize_table6` for the aggregated table and
    :func:`plot_finetune_curve` for the plot. Returns the aggregated table.
    """
    per_seed = table6(metrics_csvs)
    aggregated = summarize_table6(per_seed)
    write_seed_outputs(per_seed, aggregated, table6_metrics(per_seed), paths, TABLE6_TITLE)
    plot_finetune_curve(aggregated, png_path)
    logger.info("Table 6:\n%s", aggregated.to_string(index=False))
    return aggregated
