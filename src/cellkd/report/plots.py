"""Training curves of every model, one panel per phase, for the Snakemake report."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from cellkd.report.figures import png_figure
from cellkd.types import PathLike

VALIDATION_SCORE = ("val_dice", "val_f1")
"""The per-epoch validation score a history may carry (segmentation: Dice; classifiers: macro F1)."""


def plot_training_curves(histories: Mapping[str, Mapping[str, PathLike]], png_path: PathLike) -> None:
    """Plot loss and validation score per epoch: ``histories`` maps phase -> model label -> history.csv.

    One row of panels per phase (left: train/validation loss, right: validation Dice or F1).
    """
    phases = [phase for phase, models in histories.items() if models]
    figure = png_figure(png_path, dpi=110, nrows=len(phases), ncols=2, figsize=(11, 3.2 * len(phases)), squeeze=False)
    with figure as (_, axes):
        for row, phase in enumerate(phases):
            loss_ax, score_ax = axes[row]
            for label, path in histories[phase].items():
                history = pd.read_csv(path)
                (line,) = loss_ax.plot(history["epoch"], history["train_loss"], label=f"{label} train")
                loss_ax.plot(history["epoch"], history["val_loss"], "--", color=line.get_color(), label=f"{label} val")
                score = next((c for c in VALIDATION_SCORE if c in history), None)
                if score:
                    score_ax.plot(history["epoch"], history[score], color=line.get_color(), label=label)
                    score_ax.set_ylabel(score.replace("val_", "validation "))
            loss_ax.set_title(f"{phase}: loss")
            score_ax.set_title(f"{phase}: validation score")
            score_ax.set_ylim(0, 1)
            for ax in (loss_ax, score_ax):
                ax.set_xlabel("epoch")
                ax.legend(fontsize=6, ncol=2)
