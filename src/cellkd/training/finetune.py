"""Phase IV (human in the loop): fine-tune the distilled student on the expert's (EA) labels.

The expert labelled only a subset of the nuclei (``labels/ea`` is -1 elsewhere, see
``cellkd.store.nuclei``). For a requested number of labels per class, :func:`select_expert_rows` draws
training and validation rows from the EA-labelled nuclei and reserves a test set that is the same
for every count, so the F1-against-count curve compares like with like. :func:`finetune_student`
then runs a grid over learning rate and dropout, each point a ``train_classifier`` run started from
the student's weights, and keeps the candidate with the best validation macro F1. The un-fine-tuned
student (epoch 0) is one of the candidates and wins ties, so fine-tuning is only kept when it beats
the student on the expert's validation labels: with few labels it can never make things worse on
validation. The student before and the chosen model after are scored on the reserved test rows.

Every macro average here, validation and test alike, runs over the nucleus classes (:func:`expert_classes`):
the expert's labels are matched nuclei, never background (a partial set, ``cellkd.nuclei.matching``). A
nucleus predicted as background is still an error, in the recall of its true class, but background itself,
whose F1 on expert labels is 0 by construction, does not enter the mean.

The store's ``split`` dataset is ignored here: the EA rows of every split are eligible, since the
expert's labels are the scarce resource (the teacher and student never trained on EA labels).

Output folder ``results/finetune/{stain}/{weak_set}/n{count}/seed{seed}/`` (one job writes every count's,
:func:`finetune_student_counts`): ``model.pt`` (the chosen candidate's
model, classifier checkpoint format of ``cellkd.models.checkpoint``), ``metrics.csv`` (before/after
rows, see :func:`finetune_student`), ``grid.csv`` (one row per candidate: the student, then each grid
point) and one sub-folder per grid point ``lr{lr}_do{dropout}/`` holding that run's history.csv. Each grid
point's checkpoints (model.pt, best.pt, last.pt) stay there while the grid search runs, so that a killed job
resumes it, and are deleted once the chosen model is published: a grid of many points would otherwise keep
three student-sized files per point that nothing reads. A rerun of a finished job retrains the grid
(deterministically: the same figures).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from cellkd.device import resolve_device
from cellkd.errors import ConfigError, StoreError
from cellkd.metrics.classification import classification_metrics
from cellkd.models.checkpoint import classifier_from_checkpoint, read_classifier_checkpoint
from cellkd.params import check_parameters, params_from_dict
from cellkd.report.classification import EXPERT_SET, SUMMARY_METRICS, expert_classes, summary_row
from cellkd.store.atomic import atomic_path
from cellkd.training.classifier import ClassifierTrainParams, NucleusRows, read_nucleus_rows, train_classifier
from cellkd.training.classifier.data import load_crops
from cellkd.training.classifier.evaluate import crop_logits, prepare_for_inference
from cellkd.training.common import publish_model
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

GRID_COLUMNS = ("lr", "dropout", "val_f1", "best_epoch", "train_loss", "selected")
_SPLIT_STREAM = 0x4541  # "EA": the per-class permutations get their own random stream


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tuning grid and data selection (``finetune:`` in workflow_config.yaml).

    lrs, dropouts: the grid (every pair is one ``train_classifier`` run). val_fraction: share of the
    selected labels per class held out to choose the best epoch and grid point. test_reserve: at
    least this fraction of each class's EA nuclei is never trained on; those rows are the test set.
    patience: each grid point stops after this many epochs without a better validation F1 (None = never).
    """

    lrs: tuple[float, ...] = (1e-4,)
    dropouts: tuple[float, ...] = (0.3,)
    epochs: int = 10
    patience: int | None = 3
    batch_size: int = 64
    val_fraction: float = 0.2
    test_reserve: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        # Config files give lists; tuples keep the dataclass hashable and comparable.
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "dropouts", tuple(float(v) for v in self.dropouts))
        where = "(see finetune: in workflow_config.yaml)"
        checks = [
            (len(self.lrs) >= 1 and all(v > 0 and math.isfinite(v) for v in self.lrs), "lrs", "positive numbers"),
            (len(self.dropouts) >= 1 and all(0.0 <= v < 1.0 for v in self.dropouts), "dropouts", "numbers in [0, 1)"),
            (len(set(self.lrs)) == len(self.lrs), "lrs", "distinct values"),
            (len(set(self.dropouts)) == len(self.dropouts), "dropouts", "distinct values"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.patience is None or self.patience >= 1, "patience", ">= 1 or None"),
            (self.batch_size >= 2, "batch_size", ">= 2 (BatchNorm needs two samples per batch)"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)"),
            (0.0 < self.test_reserve < 1.0, "test_reserve", "in (0, 1)"),
        ]
        check_parameters(self, checks, "finetune", f" {where}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneParams:
        """Build from a config mapping; unknown keys raise ``ConfigError`` naming them."""
        return params_from_dict(cls, values, "finetune")

    @property
    def grid(self) -> list[tuple[float, float]]:
        """(lr, dropout) pairs in run order: lrs outer, dropouts inner."""
        return [(lr, dropout) for lr in self.lrs for dropout in self.dropouts]


def select_expert_rows(
    ea_labels: npt.ArrayLike,
    count: int,
    params: FinetuneParams,
    class_names: Sequence[str] | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    """Choose the expert-labelled rows for fine-tuning with ``count`` labels per class.

    ea_labels: int (N,) class index per row of the concatenated stores, -1 where the expert did not label.
    Per class c with n_c EA rows (only classes the expert used; background too if marked): one
    permutation of its rows, fixed by ``params.seed`` and c alone; the last ``ceil(n_c * test_reserve)``
    rows of it are the test set, the ``available`` ones before them may be trained on, and the first
    ``min(count, available)`` of those are taken (a warning names each clipped class). Of the taken
    rows, ``round(val_fraction * taken)`` (at least 1 when 2 or more are taken and val_fraction > 0,
    at most taken - 1) go to validation, the rest to training. The test rows depend only on the
    labels and the seed, never on ``count``; available rows beyond ``count`` are left unused.
    Returns (train, val, test) sorted int64 row indices, pairwise disjoint, and the effective count
    ``max_c taken_c`` = ``min(count, max_c available_c)``: two counts with the same effective count
    select the same rows.
    """
    labels = np.asarray(ea_labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"ea_labels must be 1-D integer class indices, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < -1:
        raise ValueError(f"ea_labels holds {labels.min()}; expected class indices >= 0 or -1 (unlabelled)")
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ConfigError(f"labels per class count={count!r} must be an integer >= 1 (see finetune: counts)")
    classes = np.unique(labels[labels >= 0])
    if not classes.size:
        raise StoreError(f"no expert ({EXPERT_SET}) labels among the {labels.size} nuclei; fine-tuning needs some")

    train, val, test, effective = [], [], [], 0
    for c in classes.tolist():
        members = np.flatnonzero(labels == c)
        # One stream per (seed, class): the permutation of a class ignores every other class and the count.
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, _SPLIT_STREAM, c]))
        order = members[rng.permutation(len(members))]
        # ceil(n * reserve), robust to 10 * 0.3 = 3.0000000000000004: at least test_reserve of n is reserved.
        available = len(members) - math.ceil(len(members) * params.test_reserve - 1e-9)
        taken = min(int(count), available)
        if taken < count:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            logger.warning(
                "count %d clipped to %d for class %s (%d expert labels, %.0f %% reserved for testing)",
                count,
                taken,
                name,
                len(members),
                100 * params.test_reserve,
            )
        n_val = 0
        if taken >= 2 and params.val_fraction > 0:
            n_val = min(max(round(params.val_fraction * taken), 1), taken - 1)
        train.append(order[: taken - n_val])
        val.append(order[taken - n_val : taken])
        test.append(order[available:])
        effective = max(effective, taken)

    def joined(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
        return np.sort(np.concatenate(parts)).astype(np.int64)

    return joined(train), joined(val), joined(test), effective


def _grid_dir(out: Path, lr: float, dropout: float) -> Path:
    return out / f"lr{lr:g}_do{dropout:g}"


def _best_epoch(history_path: Path) -> dict[str, float]:
    """val_f1, epoch and train_loss of the epoch ``train_classifier`` kept (best val F1, else lowest train loss)."""
    history = pd.read_csv(history_path)
    if history["val_f1"].notna().any():
        best = history.loc[history["val_f1"].idxmax()]  # first maximum, as the trainer keeps the first
    else:
        best = history.loc[history["train_loss"].idxmin()]
    return {"val_f1": float(best["val_f1"]), "best_epoch": int(best["epoch"]), "train_loss": float(best["train_loss"])}


@dataclass(frozen=True)
class _ExpertData:
    """What every count of one student's fine-tuning shares, read once per job: the stores' rows with their EA
    labels, the crops of the EA-labelled rows and the student's predictions on them (-1 on the other rows)."""

    student_model: Path
    arch: str
    rows: NucleusRows
    expert_rows: npt.NDArray[np.int64]
    crops: torch.Tensor
    student_predictions: npt.NDArray[np.int64]

    def predictions(
        self, model_path: PathLike, rows: npt.NDArray[np.int64], device: torch.device
    ) -> npt.NDArray[np.int64]:
        """int64 (N,) argmax of ``model_path`` on the EA rows ``rows`` (from the held crops), -1 on every other row."""
        model = prepare_for_inference(classifier_from_checkpoint(read_classifier_checkpoint(model_path), device))
        out = np.full(len(self.rows.labels), -1, dtype=np.int64)
        if len(rows):
            out[rows] = crop_logits(model, self.crops[np.searchsorted(self.expert_rows, rows)]).argmax(axis=1)
        return out


def _read_expert_data(student_model: PathLike, nuclei_stores: Sequence[PathLike], device: torch.device) -> _ExpertData:
    """Rows, EA crops and the student's EA predictions of ``nuclei_stores``; the student must have their classes.

    The student is scored only on EA rows (validation and test rows are EA rows), so only their crops are read,
    once: not every row of the stores again for each count's "before" and "after" (which made these passes 60 %
    of a demo fine-tuning job's CPU time).
    """
    checkpoint = read_classifier_checkpoint(student_model)
    rows = read_nucleus_rows(nuclei_stores, EXPERT_SET)
    if int(checkpoint["num_classes"]) != len(rows.classes):
        msg = (
            f"{student_model}: the student has {checkpoint['num_classes']} classes but the stores have "
            f"{len(rows.classes)} {list(rows.classes)}; fine-tune a student trained on these stores"
        )
        raise StoreError(msg)
    model = prepare_for_inference(classifier_from_checkpoint(checkpoint, device))
    expert_rows = np.flatnonzero(rows.labels >= 0).astype(np.int64)
    crops = load_crops(rows, expert_rows, str(model.input_kind))
    student_predictions = np.full(len(rows.labels), -1, dtype=np.int64)
    if len(expert_rows):
        student_predictions[expert_rows] = crop_logits(model, crops).argmax(axis=1)
    return _ExpertData(Path(student_model), str(checkpoint["arch"]), rows, expert_rows, crops, student_predictions)


def finetune_student(
    student_model: PathLike,
    nuclei_stores: Sequence[PathLike],
    count: int,
    out_dir: PathLike,
    params: FinetuneParams,
    *,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Fine-tune ``student_model`` (a classifier model.pt) on ``count`` expert labels per class; return metrics.

    Rows come from :func:`select_expert_rows` on ``labels/ea`` of the concatenated ``nuclei_stores``.
    Each (lr, dropout) of ``params.grid`` trains ``out_dir/lr{lr}_do{dropout}/`` from the student's
    weights (same arch). Candidates are the student itself (lr and dropout NaN, best_epoch 0) and each
    grid point; the one with the best validation macro F1 over :func:`expert_classes` (ties: the earlier
    candidate, so the student wins a tie) is copied to ``out_dir/model.pt``. Without validation rows the
    student cannot be compared and the grid point with the lowest training loss is kept. ``grid.csv`` lists every
    candidate (lr, dropout, val_f1, best_epoch, train_loss, selected).
    Returns and writes ``out_dir/metrics.csv``: two rows, phase "before" (the student as is, lr and
    dropout NaN) and "after" (the chosen model; lr and dropout NaN when the student was kept), each
    scored on the reserved EA test rows, columns
    count (requested), effective_count, phase, lr, dropout, the summary columns of
    :func:`cellkd.report.classification.summary_row` (f1_macro, f1_weighted, accuracy, precision_macro, ...;
    the averages over :func:`expert_classes`), f1_<class> per class, nuclei (test rows).
    """
    dev = resolve_device(device)
    return _finetune_count(
        _read_expert_data(student_model, nuclei_stores, dev), nuclei_stores, count, out_dir, params, dev
    )


def _finetune_count(
    expert: _ExpertData,
    nuclei_stores: Sequence[PathLike],
    count: int,
    out_dir: PathLike,
    params: FinetuneParams,
    device: torch.device,
) -> pd.DataFrame:
    """:func:`finetune_student` of one count, on the data of its job (read once for every count)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student_model, rows = expert.student_model, expert.rows
    classes = list(rows.classes)
    averaged = expert_classes(classes)
    try:
        train_rows, val_rows, test_rows, effective = select_expert_rows(rows.labels, count, params, classes)
    except StoreError as err:
        raise StoreError(f"{list(rows.paths)}: {err} (check the ea GeoJSON files in the slide sheet)") from err
    if len(train_rows) < 2:
        msg = (
            f"{list(rows.paths)}: only {len(train_rows)} expert-labelled training rows for count={count}; "
            "need at least 2 (raise the count, lower test_reserve / val_fraction, or add EA annotations)"
        )
        raise StoreError(msg)
    logger.info(
        "fine-tuning %s (%s) with %d labels per class (requested %d): %d train, %d val, %d test rows",
        student_model,
        expert.arch,
        effective,
        count,
        len(train_rows),
        len(val_rows),
        len(test_rows),
    )

    # The student is candidate 0: its predictions serve both its validation score and its "before" test row.
    student_predictions = expert.student_predictions
    student_val_f1 = math.nan
    if len(val_rows):
        val_scores = classification_metrics(
            rows.labels[val_rows], student_predictions[val_rows], len(classes), average_over=averaged
        )
        student_val_f1 = val_scores["f1"]
    grid = [
        {
            "lr": math.nan,
            "dropout": math.nan,
            "val_f1": student_val_f1,
            "best_epoch": 0,
            "train_loss": math.nan,
            "selected": False,
            "model": Path(student_model),
        }
    ]
    logger.info("candidate: the student as is, val F1 %.4f", student_val_f1)
    for lr, dropout in params.grid:
        run_dir = _grid_dir(out, lr, dropout)
        train_params = ClassifierTrainParams(
            arch=expert.arch,
            epochs=params.epochs,
            patience=params.patience,
            batch_size=params.batch_size,
            lr=lr,
            dropout=dropout,
            seed=params.seed,
        )
        model_path = train_classifier(
            nuclei_stores,
            EXPERT_SET,
            run_dir,
            train_params,
            init_from=student_model,
            train_indices=train_rows,
            val_indices=val_rows,
            val_average_over=averaged,  # the student's val F1 above is averaged over the same classes
            device=device,
        )
        best = _best_epoch(run_dir / "history.csv")
        grid.append({"lr": lr, "dropout": dropout, **best, "selected": False, "model": model_path})
        logger.info("grid point lr=%g dropout=%g: %s", lr, dropout, best)

    if any(math.isfinite(point["val_f1"]) for point in grid):
        chosen = max(range(len(grid)), key=lambda i: (_finite_or(grid[i]["val_f1"], -math.inf), -i))
    else:
        logger.warning("no validation rows for count=%d; choosing the grid point by training loss", count)
        chosen = min(range(1, len(grid)), key=lambda i: (_finite_or(grid[i]["train_loss"], math.inf), i))
    grid[chosen]["selected"] = True
    best_model = grid[chosen].pop("model")
    if chosen == 0:
        # A copy: a hard link would share (and publish_model re-stamp) the mtime of the student rule's output.
        with atomic_path(out / "model.pt") as tmp:
            shutil.copyfile(best_model, tmp)
    else:  # a grid point of this job: one file on disk for both names
        publish_model(best_model, out / "model.pt")
    grid_table = pd.DataFrame([{k: point[k] for k in GRID_COLUMNS} for point in grid])
    with atomic_path(out / "grid.csv") as tmp:
        grid_table.to_csv(tmp, index=False)
    for lr, dropout in params.grid:  # the chosen weights live on as out/model.pt (see the module doc)
        for checkpoint_name in ("model.pt", "best.pt", "last.pt"):
            (_grid_dir(out, lr, dropout) / checkpoint_name).unlink(missing_ok=True)
    if chosen == 0:
        logger.info(
            "kept the student: no grid point beat its validation F1 %.4f -> %s", student_val_f1, out / "model.pt"
        )
    else:
        logger.info("selected lr=%g dropout=%g -> %s", grid[chosen]["lr"], grid[chosen]["dropout"], out / "model.pt")

    # Score only the reserved test rows: -1 elsewhere makes summary_row skip them.
    y_test = np.full(len(rows.labels), -1, dtype=np.int64)
    y_test[test_rows] = rows.labels[test_rows]
    after_predictions = student_predictions if chosen == 0 else expert.predictions(out / "model.pt", test_rows, device)
    table_rows = []
    for phase, predictions, lr, dropout in (
        ("before", student_predictions, math.nan, math.nan),
        ("after", after_predictions, grid[chosen]["lr"], grid[chosen]["dropout"]),
    ):
        scores = summary_row(y_test, predictions, classes, average_over=averaged)
        table_rows.append(
            {"count": int(count), "effective_count": effective, "phase": phase, "lr": lr, "dropout": dropout, **scores}
        )
    table = pd.DataFrame(table_rows)
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    summary = ", ".join(f"{m} {table.loc[0, m]:.4f} -> {table.loc[1, m]:.4f}" for m in SUMMARY_METRICS)
    logger.info("fine-tuning on %d EA test nuclei: %s", len(test_rows), summary)
    return table


def finetune_student_counts(
    student_model: PathLike,
    nuclei_stores: Sequence[PathLike],
    out_dirs: Mapping[int, PathLike],
    params: FinetuneParams,
    *,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """:func:`finetune_student` for each count of ``out_dirs`` (count -> its output folder), one after the other.

    One process for all counts of a student saves the others' interpreter and torch start-up (2-4.5 s a job, as
    long as a demo count's fine-tuning), and reads the EA crops and the student's predictions on them once for every
    count (:func:`_read_expert_data`). Every count's files are the ones a run of that count alone writes: its
    rows are drawn from ``params.seed`` and the class alone (:func:`select_expert_rows`), and each grid point's
    training seeds a forked torch RNG (``train_classifier`` leaves the global one untouched), so nothing carries
    over from one count to the next. Returns the metrics rows of every count, in ``out_dirs`` order.
    """
    dev = resolve_device(device)
    expert = _read_expert_data(student_model, nuclei_stores, dev)  # read once, shared by every count
    tables = [
        _finetune_count(expert, nuclei_stores, count, out_dir, params, dev) for count, out_dir in out_dirs.items()
    ]
    return pd.concat(tables, ignore_index=True)


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
