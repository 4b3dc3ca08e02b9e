"""Phase II results: agreement of the annotation sets (Table 3) and teacher scores (Table 4), with confusion plots.

Label convention of the nuclei stores: class indices 0..K-2 are nucleus classes, K-1 is background
(a nucleus the model found that the annotation does not have), and -1 means "not labelled"
(the expert labelled only a subset).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cellkd.metrics.classification import classification_metrics, confusion_matrix
from cellkd.report.figures import png_figure
from cellkd.report.tables import SeedTablePaths, concat_tables, write_seed_table, write_table
from cellkd.store.atomic import atomic_path
from cellkd.store.nuclei import NucleiStore
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

SUMMARY_METRICS: tuple[str, ...] = (
    "f1_macro",
    "f1_weighted",
    "accuracy",
    "precision_macro",
    "precision_weighted",
    "recall_macro",
    "recall_weighted",
)
"""Summary columns of every classification table, in order. ``*_macro``: unweighted mean over the classes
(each class counts the same, so a rare class weighs as much as a common one); ``*_weighted``: mean weighted by
each class's support in the reference (so ``recall_weighted`` equals ``accuracy``, as in the paper's Table 3)."""
AVERAGES_NOTE = (
    "`*_macro`: unweighted mean over classes; `*_weighted`: weighted by class support (`recall_weighted` = accuracy)"
)
"""What the ``*_macro`` and ``*_weighted`` columns mean, appended to every classification table's title."""
DOCTOR_NOTE = "; the `doctor` rows average over the nucleus classes (an expert labels no background)"
"""Appended to the titles of Tables 4 and 5, whose ``doctor`` rows are scored against the expert."""


EXPERT_SET = "ea"
"""The expert's annotation set: the labels of fine-tuning (Phase IV), a reference of Table 3 and the ``doctor``
rows of Tables 4 and 5."""


def expert_classes(classes: Sequence[str]) -> list[int]:
    """Indices of the classes the expert's labels can hold: every class but background (the last, see
    ``cellkd.store.nuclei``), since the expert labelled matched nuclei only. The averages of every score against
    the expert (fine-tuning's validation, Table 6, Table 3's expert rows, the ``doctor`` rows of Tables 4 and 5)
    run over these (``average_over`` of ``cellkd.metrics.classification``): a nucleus called background is then an
    error in its true class's recall, not a zero-F1 class of its own."""
    return list(range(len(classes) - 1))


def read_labels(nuclei_stores: Sequence[PathLike]) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Concatenate ``labels/{set}`` and ``split`` of the stores (in order) -> (labels per set, split, class names).

    A set missing from some store is filled with -1 (unlabelled) there.
    """
    columns: list[dict[str, np.ndarray]] = []
    splits, class_names = [], []
    for path in nuclei_stores:
        with NucleiStore(path) as store:
            class_names = store.classes
            splits.append(store.split)
            columns.append({name: store.labels(name) for name in store.label_sets})
    names = sorted({name for store in columns for name in store})
    labels = {
        name: np.concatenate(
            [store.get(name, np.full(len(split), -1, np.int8)) for store, split in zip(columns, splits, strict=True)]
        )
        for name in names
    }
    return labels, np.concatenate(splits) if splits else np.zeros(0, np.int8), class_names


def summary_row(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    *,
    average_over: Sequence[int] | None = None,
) -> dict[str, float]:
    """:data:`SUMMARY_METRICS`, per-class F1 (``f1_<class>``) and ``nuclei`` of the rows where both labels are known.

    ``average_over``: class indices the ``*_macro`` and ``*_weighted`` columns average over (None: every class that
    occurs), see ``cellkd.metrics.classification``.
    """
    known = (y_true >= 0) & (y_pred >= 0)
    metrics = classification_metrics(
        y_true[known], y_pred[known], len(class_names), list(class_names), average_over=average_over
    )
    row = {
        "f1_macro": metrics["f1"],
        "f1_weighted": metrics["f1_weighted"],
        "accuracy": metrics["accuracy"],
        "precision_macro": metrics["precision"],
        "precision_weighted": metrics["precision_weighted"],
        "recall_macro": metrics["recall"],
        "recall_weighted": metrics["recall_weighted"],
    }
    row.update({f"f1_{name}": metrics["per_class"][name]["f1"] for name in class_names})
    row["nuclei"] = int(known.sum())
    return row


def label_agreement(
    nuclei_stores: Mapping[str, Sequence[PathLike]], candidates: Sequence[str], references: Sequence[str]
) -> pd.DataFrame:
    """Table 3: agreement of each candidate set (ssa, wsa) with each reference (ea, truth), per stain.

    ``nuclei_stores`` maps stain -> that stain's stores; only nuclei labelled in both sets count. Against the
    expert (``EXPERT_SET``), the averages run over the nucleus classes (:func:`expert_classes`).
    """
    rows = []
    for stain, stores in nuclei_stores.items():
        labels, _, class_names = read_labels(stores)
        for reference in references:
            for candidate in candidates:
                if reference not in labels or candidate not in labels:
                    continue
                average_over = expert_classes(class_names) if reference == EXPERT_SET else None
                row = summary_row(labels[reference], labels[candidate], class_names, average_over=average_over)
                rows.append({"stain": stain, "labels": candidate, "reference": reference, **row})
    return pd.DataFrame(rows)


def write_table3(table: pd.DataFrame, csv_path: PathLike, md_path: PathLike) -> None:
    write_table(
        table,
        csv_path,
        md_path,
        f"Table 3: agreement of the weak annotations with the expert (and truth) - {AVERAGES_NOTE}; against the "
        "expert (`ea`), averaged over the nucleus classes, since an expert labels no background",
    )


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], title: str, png_path: PathLike) -> None:
    """Row-normalized confusion matrix (rows = reference, columns = prediction) with counts, as PNG."""
    totals = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, totals, out=np.zeros(confusion.shape, float), where=totals > 0)
    with png_figure(png_path, dpi=120, figsize=(4.8, 4.2)) as (_, ax):
        ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(confusion):
            color = "white" if fractions[i, j] > 0.6 else "black"
            ax.text(j, i, f"{fractions[i, j]:.2f}\n({count})", ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(class_names)), class_names, rotation=30)
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(title, fontsize=9)


def evaluate_predictions(
    predictions: np.ndarray,
    labels: Mapping[str, np.ndarray],
    split: np.ndarray,
    class_names: Sequence[str],
    training_labels: str,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Score a classifier's predictions (one per nucleus) on the test split and on the expert / truth sets.

    Rows: ``test`` (test split vs its training labels), ``doctor`` (every EA-labelled nucleus; EA is
    never trained on by teacher or student; averaged over the nucleus classes, :func:`expert_classes`),
    ``truth`` (test split vs truth, synthetic data only).
    Returns the table and the confusion matrix of each row.
    """
    evaluations = {"test": (labels[training_labels], split == 2)}
    if EXPERT_SET in labels:
        evaluations["doctor"] = (labels[EXPERT_SET], labels[EXPERT_SET] >= 0)
    if "truth" in labels:
        evaluations["truth"] = (labels["truth"], split == 2)
    rows, confusions = [], {}
    for name, (reference, rows_mask) in evaluations.items():
        y_true = np.where(rows_mask, reference, -1)
        average_over = expert_classes(class_names) if name == "doctor" else None
        rows.append({"evaluation": name, **summary_row(y_true, predictions, class_names, average_over=average_over)})
        known = y_true >= 0
        confusions[name] = confusion_matrix(y_true[known], predictions[known], len(class_names))
    return pd.DataFrame(rows), confusions


def write_classifier_table(
    metrics_csvs: Mapping[tuple, PathLike], key_names: Sequence[str], paths: SeedTablePaths, title: str
) -> pd.DataFrame:
    """A table of classifiers trained once per seed (Tables 4 and 5), mean ± 95% CI over the seeds.

    ``metrics_csvs`` maps ``(*key_names, seed)`` to the ``metrics.csv`` of :func:`evaluate_classifier_stores`.
    Every score column (summary, per-class F1, speeds) is averaged; ``nuclei`` is the same for every seed.
    """
    per_seed = concat_tables(metrics_csvs, (*key_names, "seed"))
    keys = (*key_names, "evaluation")
    metrics = [c for c in per_seed.columns if c not in {*keys, "seed", "nuclei"}]
    return write_seed_table(per_seed, keys, metrics, paths, title, carry=("nuclei",))


def write_table4(metrics_csvs: Mapping[tuple[str, str, str, int], PathLike], paths: SeedTablePaths) -> pd.DataFrame:
    """Table 4: teacher scores per stain, training labels and architecture (keys ``(stain, labels, arch, seed)``)."""
    title = f"Table 4: teachers on the test split, the doctor (EA) set and the truth - {AVERAGES_NOTE}{DOCTOR_NOTE}"
    return write_classifier_table(metrics_csvs, ("stain", "labels", "arch"), paths, title)


def evaluate_classifier_stores(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    training_labels: str,
    metrics_csv: PathLike,
    confusion_png: PathLike,
    extra_columns: Mapping[str, float] | None = None,
    logits_h5: PathLike | None = None,
) -> pd.DataFrame:
    """Score a trained classifier (teacher, student or fine-tuned) -> metrics CSV and a confusion-matrix plot.

    The plot shows the doctor (EA) evaluation when there is one, else the test split. ``extra_columns``
    (e.g. measured speeds) are appended to every row. ``logits_h5`` (a teacher's): the logits of every nucleus
    are also cached there (``cellkd.training.classifier.cache_teacher_logits``) for the students it teaches,
    so that one pass of the model both scores it and labels their training rows.
    """
    from cellkd.training.classifier import cache_teacher_logits, predict_logits

    labels, split, class_names = read_labels(nuclei_stores)
    if logits_h5 is None:
        logits = predict_logits(model_path, nuclei_stores)
    else:
        logits = cache_teacher_logits(model_path, nuclei_stores, logits_h5)
    predictions = logits.argmax(axis=1)
    table, confusions = evaluate_predictions(predictions, labels, split, class_names, training_labels)
    for column, value in (extra_columns or {}).items():
        table[column] = value
    with atomic_path(metrics_csv) as tmp:
        table.to_csv(tmp, index=False)
    shown = "doctor" if "doctor" in confusions else "test"
    title = f"{model_path}\nagainst {'EA (doctor set)' if shown == 'doctor' else training_labels + ' (test split)'}"
    plot_confusion(confusions[shown], class_names, title, confusion_png)
    logger.info("%s:\n%s", model_path, table.to_string(index=False))
    return table


def measure_throughput(model_path: PathLike, nuclei_stores: Sequence[PathLike], repeats: int = 3) -> float:
    """Crops per second of a classifier over every nucleus of the first store (best of ``repeats`` full passes).

    Reading the checkpoint and the crops from HDF5 is part of the measurement, as in the workflow's own prediction
    path. One slide's store (~1,200 crops in the demo, far more on a real slide) is enough for a stable figure:
    timing every store three times made the student's evaluation the slowest evaluation job of the demo.
    """
    import time

    from cellkd.training.classifier import predict_logits

    best = float("inf")
    rows = 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = len(predict_logits(model_path, nuclei_stores[:1]))
        best = min(best, time.perf_counter() - start)
    return rows / best if best > 0 else float("nan")


def write_table5(metrics_csvs: Mapping[tuple[str, str, int], PathLike], paths: SeedTablePaths) -> pd.DataFrame:
    """Table 5: the distilled student per stain and teacher labels (keys ``(stain, labels, seed)``), with speeds."""
    title = f"Table 5: distilled RCCNet student (test split, doctor set, truth) - {AVERAGES_NOTE}{DOCTOR_NOTE}"
    return write_classifier_table(metrics_csvs, ("stain", "labels"), paths, title)
