"""Phase IV results: Table 6 (the student before and after fine-tuning on expert labels) and its F1 curve."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd

from cellkd.errors import StoreError
from cellkd.report.figures import png_figure
from cellkd.report.tables import concat_tables, write_table
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

TABLE6_TITLE = (
    "Table 6: the student before and after fine-tuning on expert (EA) labels, on the reserved EA test nuclei - "
    "`f1_macro`: unweighted mean over classes; `f1_weighted`: weighted by class support"
)
_KEY_COUNT = "_requested_count"  # the key's count; metrics.csv has its own "count" column to check it against


def table6(metrics_csvs: Mapping[tuple[str, str, int], PathLike]) -> pd.DataFrame:
    """One row per (stain, labels, count) from the ``metrics.csv`` files of ``finetune_student``.

    Columns: stain, labels, count (requested), effective_count, lr, dropout (of the chosen grid point;
    NaN when the un-fine-tuned student won on validation and was kept), f1_macro_before, f1_macro_after,
    f1_macro_gain (after - before), f1_weighted_before, f1_weighted_after, accuracy_before, accuracy_after,
    nuclei (test rows); sorted by stain, labels, count. Macro F1 is the unweighted mean over the classes,
    weighted F1 the mean weighted by each class's support among the test nuclei.
    """
    if not metrics_csvs:
        raise StoreError(
            "no fine-tuning metrics.csv given; pass results/finetune/{stain}/{labels}/n{count}/metrics.csv"
        )
    long = concat_tables(metrics_csvs, ("stain", "labels", _KEY_COUNT))
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
        key = (str(first["stain"]), str(first["labels"]), int(first[_KEY_COUNT]))
        msg = (
            f"{metrics_csvs[key]}: holds count {int(first['count'])} but was given for {key}; "
            "pass each metrics.csv under its own (stain, labels, count)"
        )
        raise StoreError(msg)
    rows = []
    for (stain, labels, count), group in long.groupby(["stain", "labels", "count"], sort=True):
        phases = group.set_index("phase")
        missing = sorted({"before", "after"} - set(phases.index))
        if missing:
            key = (str(stain), str(labels), int(count))
            raise StoreError(f"{metrics_csvs[key]}: no {missing} row(s); rerun the fine-tuning rule for {key}")
        before, after = phases.loc["before"], phases.loc["after"]
        rows.append(
            {
                "stain": stain,
                "labels": labels,
                "count": int(count),
                "effective_count": int(after["effective_count"]),
                "lr": float(after["lr"]),
                "dropout": float(after["dropout"]),
                "f1_macro_before": float(before["f1_macro"]),
                "f1_macro_after": float(after["f1_macro"]),
                "f1_macro_gain": float(after["f1_macro"]) - float(before["f1_macro"]),
                "f1_weighted_before": float(before["f1_weighted"]),
                "f1_weighted_after": float(after["f1_weighted"]),
                "accuracy_before": float(before["accuracy"]),
                "accuracy_after": float(after["accuracy"]),
                "nuclei": int(after["nuclei"]),
            }
        )
    return pd.DataFrame(rows)


def plot_finetune_curve(table: pd.DataFrame, png_path: PathLike) -> None:
    """Macro F1 against the effective labels per class, one colour per (stain, labels): solid after, dashed before."""
    import matplotlib
    import matplotlib.ticker

    counts = table["effective_count"].to_numpy()
    with png_figure(png_path, dpi=120, figsize=(6.0, 4.2)) as (_, ax):
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, ((stain, labels), group) in enumerate(table.groupby(["stain", "labels"], sort=True)):
            group = group.sort_values(["effective_count", "count"])
            colour = colours[i % len(colours)]
            for phase, style in (("after", "o-"), ("before", "x--")):
                ax.plot(
                    group["effective_count"],
                    group[f"f1_macro_{phase}"],
                    style,
                    color=colour,
                    label=f"{stain} / {labels}: {phase}",
                )
        if len(counts) and counts.min() > 0 and counts.max() / counts.min() >= 10:
            ax.set_xscale("log")  # counts grow geometrically in the grid (10, 50, 100, 500, ...)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 10, 100 rather than 10^1, 10^2
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("expert labels per class (effective count)")
        ax.set_ylabel("macro F1 (unweighted mean over classes)\non the reserved EA test nuclei")
        ax.set_title("Fine-tuning the student on expert labels", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def write_table6(
    metrics_csvs: Mapping[tuple[str, str, int], PathLike], csv_path: PathLike, md_path: PathLike, png_path: PathLike
) -> pd.DataFrame:
    """Table 6 from the fine-tuning ``metrics.csv`` files keyed by (stain, labels, count) -> CSV, Markdown and PNG.

    See :func:`table6` for the columns and :func:`plot_finetune_curve` for the plot. Returns the table.
    """
    table = table6(metrics_csvs)
    write_table(table, csv_path, md_path, TABLE6_TITLE)
    plot_finetune_curve(table, png_path)
    logger.info("Table 6:\n%s", table.to_string(index=False))
    return table
