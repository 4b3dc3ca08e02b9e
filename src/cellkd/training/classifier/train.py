"""The classifier training loop: parameters, epochs, resume state and the checkpoints it writes.

Rows, targets and model selection are described in ``cellkd.training.classifier``; the
checkpoint format in ``cellkd.models.checkpoint``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cellkd.device import resolve_device
from cellkd.errors import ConfigError, StoreError
from cellkd.metrics.classification import metrics_from_confusion
from cellkd.models import MODEL_REGISTRY, SEGMENTATION_ARCHS, create_model
from cellkd.models.checkpoint import (
    classifier_checkpoint,
    read_classifier_checkpoint,
    torch_save_atomic,
)
from cellkd.params import check_parameters, params_from_dict
from cellkd.training.classifier.data import (
    augment_dihedral,
    augment_stain,
    cap_per_class,
    draw_stain_jitter,
    input_kind_of,
    load_crops,
    read_nucleus_rows,
)
from cellkd.training.classifier.distillation import class_weights, distillation_loss, load_teacher_logits
from cellkd.training.classifier.evaluate import cpu_layout_input, score_crops, use_cpu_layout
from cellkd.training.common import (
    ResumableRun,
    Selection,
    data_fingerprint,
    epoch_seed,
    file_fingerprint,
    rng_devices,
)
from cellkd.types import SPLITS, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "seconds")

# More epochs extends a run; workers are unused (see the package doc). Everything else restarts it.
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "patience"})


def _selection(*, use_val: bool) -> Selection:
    """The best epoch: highest validation macro F1 (``use_val``), else lowest training loss; never a diverged one."""
    if use_val:
        return Selection("val_f1", lower_is_better=False, finite_train_loss=True)
    return Selection("train_loss", lower_is_better=True, finite_train_loss=True)


def epochs_without_improvement(history: list[dict[str, float]], *, use_val: bool) -> int:
    """Epochs since the best one in ``history`` (the first best, as the loop keeps the first), 0 if the last is best.

    The score is the validation macro F1 (``use_val``) or the training loss; an epoch whose training
    loss is not finite never counts as best. Computed from the history alone, so a resumed run stops
    where an uninterrupted one would.
    """
    return _selection(use_val=use_val).epochs_since_best(history)


def _classifier_archs() -> list[str]:
    return sorted(name for name in MODEL_REGISTRY if name not in SEGMENTATION_ARCHS)


@dataclass(frozen=True)
class ClassifierTrainParams:
    """Hyperparameters of one classifier run (``teacher:`` / ``student:`` / ``finetune:`` in workflow_config.yaml).

    ``class_weighting``: weight the cross-entropy by inverse class frequency of the training targets,
    ``w_c = n / (K_present * n_c)`` (0 for a class without rows). ``temperature``, ``w_task``, ``w_kd``:
    see :func:`distillation_loss`; ``w_kd`` > 0 needs teacher logits. ``max_per_class``: keep at most
    this many training rows per target class, drawn with ``seed``; None = all. ``patience``: stop
    early once this many epochs in a row have not beaten the best score (validation macro F1, or the
    training loss without validation rows); None = run every epoch. ``stain_augment``: strength of the
    HED stain jitter of every training crop (:func:`augment_stain`, Tellez et al. 2018), on top of the 8
    flips / rotations; 0 = none. ``num_workers``: no effect (crops are held in memory).
    """

    arch: str = "resnet18"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    dropout: float = 0.3
    class_weighting: bool = False
    temperature: float = 4.0
    w_task: float = 1.0
    w_kd: float = 0.0
    seed: int = 0
    num_workers: int = 0
    max_per_class: int | None = None
    patience: int | None = None
    stain_augment: float = 0.0

    def __post_init__(self) -> None:
        archs = _classifier_archs()
        if self.arch not in archs:
            raise ConfigError(f"classifier arch {self.arch!r} is unknown; expected one of {archs}")
        checks = [
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 2, "batch_size", ">= 2 (BatchNorm needs two samples per batch)"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number"),
            (0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)"),
            (self.temperature > 0 and math.isfinite(self.temperature), "temperature", "a positive number"),
            (self.w_task >= 0 and math.isfinite(self.w_task), "w_task", ">= 0"),
            (self.w_kd >= 0 and math.isfinite(self.w_kd), "w_kd", ">= 0"),
            (self.w_task + self.w_kd > 0, "w_task", "> 0 when w_kd = 0 (the loss would be zero)"),
            (self.num_workers >= 0, "num_workers", ">= 0"),
            (self.max_per_class is None or self.max_per_class >= 1, "max_per_class", ">= 1 or None"),
            (self.patience is None or self.patience >= 1, "patience", ">= 1 or None"),
            (0.0 <= self.stain_augment < 1.0, "stain_augment", "in [0, 1)"),
        ]
        check_parameters(self, checks, "classifier training")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierTrainParams:
        """Build from a config mapping; unknown keys raise ``ConfigError`` naming them."""
        return params_from_dict(cls, values, "classifier training")


def _check_indices(indices: npt.ArrayLike, total: int, name: str) -> npt.NDArray[np.int64]:
    array = np.unique(np.asarray(indices, dtype=np.int64))
    if array.size and (array[0] < 0 or array[-1] >= total):
        bad = array[0] if array[0] < 0 else array[-1]
        raise ConfigError(f"{name} holds row {bad}, outside the {total} rows of the nuclei stores")
    return array


def _digest(indices: npt.NDArray[np.int64] | None) -> str | None:
    return None if indices is None else hashlib.sha1(indices.tobytes()).hexdigest()


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    crops: torch.Tensor,
    targets: torch.Tensor,
    soft: torch.Tensor | None,
    weights: torch.Tensor | None,
    params: ClassifierTrainParams,
    epoch: int,
) -> float:
    model.train()
    rng = np.random.default_rng(epoch_seed(params.seed, epoch))
    n = len(crops)
    order = rng.permutation(n)
    rot, flip = rng.integers(4, size=n), rng.integers(2, size=n)
    # Drawn after the flips, and only when on: with stain_augment 0 every draw and batch is as before.
    stain = draw_stain_jitter(rng, n, params.stain_augment) if params.stain_augment > 0 else None
    # Nearly equal batches of <= batch_size: never a 1-sample batch, which BatchNorm cannot train on.
    batches = np.array_split(order, math.ceil(n / params.batch_size))
    total = 0.0
    for batch in progress(batches, desc=f"epoch {epoch}/{params.epochs}", total=len(batches)):
        index = torch.from_numpy(batch).to(crops.device)
        x = augment_dihedral(crops[index], rot[batch], flip[batch])
        if stain is not None:
            x = augment_stain(x, stain[0][batch], stain[1][batch])
        x = cpu_layout_input(x)
        logits = model(x)
        teacher = None if soft is None else soft[index]
        loss = distillation_loss(
            logits.float(), targets[index], teacher, params.temperature, params.w_task, params.w_kd, weights
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
    return total / max(n, 1)


def _init_weights(model: nn.Module, init_from: PathLike, params: ClassifierTrainParams, num_classes: int) -> None:
    checkpoint = read_classifier_checkpoint(init_from)
    if checkpoint["arch"] != params.arch or checkpoint["num_classes"] != num_classes:
        msg = (
            f"{init_from}: init_from holds a {checkpoint['arch']} with {checkpoint['num_classes']} classes, but this "
            f"run trains a {params.arch} with {num_classes}; set arch to {checkpoint['arch']!r} or drop init_from"
        )
        raise ConfigError(msg)
    model.load_state_dict(checkpoint["state_dict"])  # dropout has no weights: it may differ
    logger.info("initialised %s from %s (epoch %s)", params.arch, init_from, checkpoint.get("epoch"))


def train_classifier(
    nuclei_stores: Sequence[PathLike],
    label_set: str,
    out_dir: PathLike,
    params: ClassifierTrainParams,
    *,
    teacher_logits: PathLike | None = None,
    init_from: PathLike | None = None,
    train_indices: npt.ArrayLike | None = None,
    val_indices: npt.ArrayLike | None = None,
    val_average_over: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Train a nucleus classifier on ``nuclei_stores``; return ``out_dir/model.pt`` (see the module doc for rows).

    label_set: the ``labels/{set}`` used for training targets (without teacher) and always for validation.
    teacher_logits: an HDF5 file from :func:`cache_teacher_logits` for these stores: targets become
        argmax(teacher), soft targets its logits (``params.w_kd``). init_from: a classifier model.pt of
        the same arch to start from (fine-tuning; ignored when resuming). train_indices / val_indices:
        global rows replacing the train / val split (rows without a target are dropped). val_average_over: the
        class indices the validation macro F1 averages over (``average_over`` of
        ``cellkd.metrics.classification``; None: every class that occurs), e.g. the nucleus classes for the
        expert's labels, which never hold background.
    Writes ``history.csv`` (epoch, train_loss, val_loss, val_accuracy, val_f1, seconds; val_loss is the
    unweighted CE on ``label_set``), ``last.pt`` / ``best.pt`` (resume state) and finally ``model.pt``,
    the weights with the best validation macro F1 (the lowest training loss without validation rows).
    Deterministic on CPU for a given ``params.seed``; the global torch RNG is left untouched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if params.w_kd > 0 and teacher_logits is None:
        raise ConfigError(f"w_kd={params.w_kd} needs teacher_logits (soft targets); pass them or set w_kd=0")

    rows = read_nucleus_rows(nuclei_stores, label_set)
    num_classes, total = len(rows.classes), len(rows.labels)
    soft_all = None if teacher_logits is None else load_teacher_logits(teacher_logits, nuclei_stores)
    targets_all = rows.labels if soft_all is None else soft_all.argmax(axis=1).astype(np.int64)

    explicit_train = None if train_indices is None else _check_indices(train_indices, total, "train_indices")
    explicit_val = None if val_indices is None else _check_indices(val_indices, total, "val_indices")
    candidates = np.flatnonzero(rows.split == SPLITS["train"]) if explicit_train is None else explicit_train
    train_rows = candidates[targets_all[candidates] >= 0]
    if len(train_rows) < len(candidates) and explicit_train is not None:
        logger.warning("dropping %d train_indices without a label", len(candidates) - len(train_rows))
    train_rows = cap_per_class(train_rows, targets_all[train_rows], params.max_per_class, params.seed)
    candidates = np.flatnonzero(rows.split == SPLITS["val"]) if explicit_val is None else explicit_val
    val_rows = candidates[rows.labels[candidates] >= 0]
    if len(train_rows) < 2:
        msg = (
            f"{list(rows.paths)}: {len(train_rows)} labelled training rows in set {label_set!r}; "
            "need at least 2 (check the split ratios and that the label set covers the train split)"
        )
        raise StoreError(msg)
    selection = _selection(use_val=len(val_rows) > 0)
    if len(val_rows) == 0:
        logger.warning("no labelled validation rows in %s; selecting the model by training loss", list(rows.paths))

    input_kind = input_kind_of(params.arch, num_classes)
    counts = np.bincount(targets_all[train_rows], minlength=num_classes)
    logger.info(
        "training %s (%s crops) on %s: %d train rows per class %s, %d val rows",
        params.arch,
        input_kind,
        dev,
        len(train_rows),
        dict(zip(rows.classes, counts.tolist(), strict=True)),
        len(val_rows),
    )
    train_crops = load_crops(rows, train_rows, input_kind).to(dev)
    train_targets = torch.from_numpy(targets_all[train_rows]).to(dev)
    train_soft = None if soft_all is None else torch.from_numpy(soft_all[train_rows]).to(dev)
    val_crops = load_crops(rows, val_rows, input_kind).to(dev)
    val_labels = torch.from_numpy(rows.labels[val_rows]).to(dev)
    weights = (
        torch.from_numpy(class_weights(targets_all[train_rows], num_classes)).to(dev)
        if params.class_weighting
        else None
    )

    data: dict[str, Any] = {
        "stores": data_fingerprint(nuclei_stores),
        "label_set": label_set,
        "teacher_logits": None if teacher_logits is None else file_fingerprint(teacher_logits),
        "init_from": None if init_from is None else file_fingerprint(init_from),
        "train_indices": _digest(explicit_train),
        "val_indices": _digest(explicit_val),
    }
    if val_average_over is not None:  # another selection metric is another run (it keeps other best weights)
        data["val_average_over"] = [int(c) for c in val_average_over]
    eval_batch = max(params.batch_size, 1024)
    with torch.random.fork_rng(devices=rng_devices(dev)):
        torch.manual_seed(params.seed)
        model = use_cpu_layout(create_model(params.arch, num_classes=num_classes, dropout=params.dropout).to(dev))
        optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
        run = ResumableRun(
            out,
            params=asdict(params),
            data=data,
            data_name="nuclei stores / labels",
            resumable=_RESUMABLE_CHANGES,
            epochs=params.epochs,
            columns=HISTORY_COLUMNS,
            selection=selection,
            state={"model": model, "optimizer": optimizer},
            device=dev,
            log=logger,
        )
        if not run.resume() and init_from is not None:
            _init_weights(model, init_from, params, num_classes)

        def save_best(epoch: int, value: float) -> None:
            # score: higher is better, so minus the loss when selecting by training loss
            score = value if len(val_rows) else -value
            checkpoint = classifier_checkpoint(
                model,
                asdict(params),
                rows.classes,
                label_set,
                epoch=epoch,
                criterion=selection.column,
                score=score,
                teacher_logits=teacher_logits,
                init_from=init_from,
            )
            torch_save_atomic(checkpoint, run.best_path)

        for epoch in run.epochs_to_run():
            began = time.perf_counter()
            train_loss = _train_epoch(model, optimizer, train_crops, train_targets, train_soft, weights, params, epoch)
            val_loss, val_accuracy, val_f1 = math.nan, math.nan, math.nan
            if len(val_rows):
                val_loss, confusion = score_crops(model, val_crops, val_labels, num_classes, eval_batch)
                metrics = metrics_from_confusion(confusion, average_over=val_average_over)
                val_accuracy, val_f1 = metrics["accuracy"], metrics["f1"]
            seconds = time.perf_counter() - began
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "val_f1": val_f1,
                "seconds": seconds,
            }
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f, val macro F1 %.4f",
                epoch,
                params.epochs,
                train_loss,
                val_loss,
                val_accuracy,
                val_f1,
            )
            run.end_epoch(row, save_best)
            if selection.epochs_since_best(run.history) >= (params.patience or math.inf):
                logger.info(
                    "stopping early after epoch %d: %d epochs without a better %s",
                    epoch,
                    params.patience,
                    selection.column,
                )
                break

    return run.finish("(NaN training loss in every epoch, see history.csv); lower lr")
