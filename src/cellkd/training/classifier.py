"""Phases II-IV: train nucleus classifiers (teachers), distil them into students, fine-tune on expert labels.

Data: nuclei stores ``results/nuclei/{stain}/{slide}.h5`` (one row per nucleus), read with h5py:
attrs ``complete``, ``classes`` (background last); ``crops/level0`` uint8 (N, 32, 32, 3);
``crops/level1``, ``crops/level2`` uint8 (N, 16, 16, 3); ``labels/{set}`` int8 (N,) class index or
-1 (unlabelled); ``split`` int8 (N,) 0 train / 1 val / 2 test. Several stores are concatenated in
the order given; a "row" is an index into that concatenation.

Training rows: the train split (or ``train_indices``) with label >= 0 in ``label_set``. With
``teacher_logits`` (a file from :func:`cache_teacher_logits`), the target of a row is the teacher's
argmax and the soft targets are its logits, so every train-split row is used: the teacher labels the
nuclei no annotation covers too. Validation rows: the val split (or ``val_indices``) with label >= 0
in ``label_set``, always scored against ``label_set`` (a student distilled from an SSA teacher is
validated on SSA labels). The model with the best validation macro F1 becomes ``model.pt``.

Memory: the crops of the selected rows are loaded once as uint8 tensors on the training device
(100k level-0 crops = 100k x 32 x 32 x 3 B = 300 MB worst case) and augmented per batch on the
device with a random element of the 8 flips/rotations, drawn from ``(seed, epoch)``. No
DataLoader is needed, so ``num_workers`` has no effect (it is kept so that the config mirrors the
segmentation trainer's). A teacher is never run during student training: its logits are cached.

Resume: as in ``cellkd.training.segmentation`` (see ``cellkd.training.common``): ``last.pt`` after
every epoch, ``best.pt`` on improvement, ``model.pt`` only at the very end.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from cellkd.errors import ConfigError, StoreError
from cellkd.metrics.classification import confusion_matrix, metrics_from_confusion
from cellkd.models import INPUT_SHAPES, MODEL_REGISTRY, SEGMENTATION_ARCHS, classifier_input, create_model
from cellkd.store.atomic import atomic_h5, atomic_write_text
from cellkd.training.common import (
    check_parameters,
    data_fingerprint,
    epoch_seed,
    file_fingerprint,
    history_csv,
    load_resume_state,
    params_from_dict,
    publish_model,
    resolve_device,
    restore_rng_state,
    rng_devices,
    rng_state,
    torch_load,
    torch_save_atomic,
)
from cellkd.types import SPLITS, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)


CHECKPOINT_FORMAT = "cellkd.classifier/1"
LOGITS_FORMAT = "cellkd.teacher_logits/1"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "seconds")

# More epochs extends a run; workers are unused (see the module doc). Everything else restarts it.
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers"})
_READ_CHUNK = 4096  # rows read from HDF5 at a time: bounded memory however large the store


def _classifier_archs() -> list[str]:
    return sorted(name for name in MODEL_REGISTRY if name not in SEGMENTATION_ARCHS)


@dataclass(frozen=True)
class ClassifierTrainParams:
    """Hyperparameters of one classifier run (``teacher:`` / ``student:`` / ``finetune:`` in workflow_config.yaml).

    ``class_weighting``: weight the cross-entropy by inverse class frequency of the training targets,
    ``w_c = n / (K_present * n_c)`` (0 for a class without rows). ``temperature``, ``w_task``, ``w_kd``:
    see :func:`distillation_loss`; ``w_kd`` > 0 needs teacher logits. ``max_per_class``: keep at most
    this many training rows per target class, drawn with ``seed``; None = all. ``num_workers``: no
    effect (crops are held in memory).
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
        ]
        check_parameters(self, checks, "classifier training")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierTrainParams:
        """Build from a config mapping; unknown keys raise ``ConfigError`` naming them."""
        return params_from_dict(cls, values, "classifier training")


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    w_task: float,
    w_kd: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015), a scalar averaged over the batch.

    ``loss = w_task * CE(y, s) + w_kd * T^2 * KL(softmax(t/T) || softmax(s/T))``

    student_logits s: float (B, K); targets y: int64 (B,) class indices; teacher_logits t: float (B, K),
    or None when ``w_kd`` = 0; T = ``temperature``. CE is at temperature 1, weighted by
    ``class_weights`` (K,) when given (then the weighted mean, as ``F.cross_entropy``). The KL
    term's gradient shrinks as 1/T^2; the T^2 factor keeps its scale independent of T.
    Hard-label distillation (the paper's student) is ``w_task=1, w_kd=0`` with y = argmax(t).
    """
    loss = student_logits.new_zeros(())
    if w_task:
        loss = loss + w_task * F.cross_entropy(student_logits, targets, weight=class_weights)
    if w_kd:
        if teacher_logits is None:
            raise ValueError(f"w_kd={w_kd} needs teacher_logits; pass them or set w_kd=0")
        log_p_student = F.log_softmax(student_logits / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        loss = loss + w_kd * temperature**2 * kl
    return loss


# ----------------------------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class NucleusRows:
    """Concatenated stores: rows per store, stains, class names, split (N,) and labels (N,) of one set (-1 = none)."""

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    stains: tuple[str, ...]
    classes: tuple[str, ...]
    split: npt.NDArray[np.int8]
    labels: npt.NDArray[np.int64]

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)


def _open_nuclei_store(path: PathLike) -> h5py.File:
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path}: cannot open nuclei store ({err}); rerun the rule that extracts nuclei") from err
    try:
        if not bool(h5.attrs.get("complete", False)):
            raise StoreError(
                f"{path}: nuclei store is incomplete (a job was interrupted); delete it and rerun snakemake"
            )
        missing = [key for key in ("crops/level0", "split", "labels") if key not in h5]
        if missing:
            raise StoreError(f"{path}: nuclei store lacks {missing}; it is not a cellkd nuclei store")
    except BaseException:
        h5.close()
        raise
    return h5


def read_nucleus_rows(nuclei_stores: Sequence[PathLike], label_set: str | None) -> NucleusRows:
    """Metadata of the concatenated stores; ``label_set`` None reads no labels (all -1)."""
    if not nuclei_stores:
        raise StoreError("no nuclei stores given; pass at least one results/nuclei/{stain}/{slide}.h5")
    sizes, stains, classes, splits, labels = [], [], None, [], []
    for path in nuclei_stores:
        with _open_nuclei_store(path) as h5:
            names = tuple(str(c) for c in h5.attrs.get("classes", ()))
            if classes is None:
                classes = names
            elif names != classes:
                msg = f"{path}: classes {list(names)} differ from {list(classes)} of {nuclei_stores[0]}; rebuild stores"
                raise StoreError(msg)
            n = int(h5["split"].shape[0])
            if label_set is not None:
                key = f"labels/{label_set}"
                if key not in h5:
                    msg = (
                        f"{path}: no label set {label_set!r} in the nuclei store (it has {sorted(h5['labels'])}); "
                        "use one of them"
                    )
                    raise StoreError(msg)
                labels.append(h5[key][:].astype(np.int64))
            else:
                labels.append(np.full(n, -1, dtype=np.int64))
            sizes.append(n)
            stains.append(str(h5.attrs.get("stain", "")))
            splits.append(h5["split"][:].astype(np.int8))
    if not classes:
        raise StoreError(f"{nuclei_stores[0]}: nuclei store has no 'classes' attribute; rebuild it")
    all_labels = np.concatenate(labels)
    if all_labels.size and all_labels.max() >= len(classes):
        raise StoreError(
            f"{list(map(str, nuclei_stores))}: label {all_labels.max()} in set {label_set!r} is outside the "
            f"{len(classes)} classes {list(classes)}; rebuild the stores"
        )
    paths = tuple(str(p) for p in nuclei_stores)
    return NucleusRows(paths, tuple(sizes), tuple(stains), classes, np.concatenate(splits), all_labels)


def _crop_chunk(h5: h5py.File, input_kind: str, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """uint8 (n, S, S, C) network crops of rows [start, stop) of one store (see ``cellkd.models.classifiers``)."""
    if input_kind == "level0":
        return h5["crops/level0"][start:stop]
    if input_kind == "multiscale":
        missing = [k for k in ("crops/level1", "crops/level2") if k not in h5]
        if missing:
            raise StoreError(f"{h5.filename}: nuclei store lacks {missing}, needed by multiscale classifiers")
        return np.concatenate([h5["crops/level1"][start:stop], h5["crops/level2"][start:stop]], axis=-1)
    raise ValueError(f"input_kind {input_kind!r} is unknown; expected 'level0' or 'multiscale'")


def _iter_store_chunks(rows: NucleusRows, input_kind: str, chunk: int) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
    """(first global row, crops uint8 (n, S, S, C)) for consecutive chunks of every store, in order."""
    for path, offset in zip(rows.paths, rows.offsets[:-1], strict=True):
        with _open_nuclei_store(path) as h5:
            n = int(h5["split"].shape[0])
            for start in range(0, n, chunk):
                yield int(offset) + start, _crop_chunk(h5, input_kind, start, min(start + chunk, n))


def _load_crops(rows: NucleusRows, selected: npt.NDArray[np.int64], input_kind: str) -> torch.Tensor:
    """uint8 (len(selected), S, S, C) crops of the global rows ``selected`` (any order), read chunk by chunk."""
    order = np.argsort(selected, kind="stable")
    ordered = selected[order]
    parts: list[np.ndarray] = []
    for path, lo, hi in zip(rows.paths, rows.offsets[:-1], rows.offsets[1:], strict=True):
        mine = ordered[(ordered >= lo) & (ordered < hi)] - lo
        if not mine.size:
            continue
        with _open_nuclei_store(path) as h5:
            for start in range(0, int(mine.max()) + 1, _READ_CHUNK):
                wanted = mine[(mine >= start) & (mine < start + _READ_CHUNK)]
                if wanted.size:
                    block = _crop_chunk(h5, input_kind, start, int(wanted.max()) + 1)
                    parts.append(block[wanted - start])
    channels, height, width = INPUT_SHAPES[input_kind]
    crops = np.concatenate(parts) if parts else np.zeros((0, height, width, channels), dtype=np.uint8)
    out = np.empty_like(crops)
    out[order] = crops  # back to the caller's order
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------ teacher logits


def cache_teacher_logits(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    out_path: PathLike,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> None:
    """Run the teacher once over every row of ``nuclei_stores`` and store its logits in ``out_path`` (HDF5, atomic).

    Layout: ``logits`` float32 (N_total, K), rows in store order; attrs ``format``, ``model``,
    ``classes``, ``stores`` (paths as given), ``store_names`` (file names), ``store_stains`` (their
    ``stain`` attrs) and ``store_rows`` (rows per store), which :func:`load_teacher_logits` checks so
    that logits never meet the wrong rows (e.g. raw-stain logits with the macenko stores of the same slides).
    """
    logits = predict_logits(model_path, nuclei_stores, batch_size=batch_size, device=device)
    rows = read_nucleus_rows(nuclei_stores, None)
    with atomic_h5(out_path) as h5:
        h5.attrs.update(
            {
                "format": LOGITS_FORMAT,
                "model": str(model_path),
                "classes": list(rows.classes),
                "stores": list(rows.paths),
                "store_names": [Path(p).name for p in rows.paths],
                "store_stains": list(rows.stains),
                "store_rows": list(rows.sizes),
            }
        )
        h5.create_dataset("logits", data=logits)
    logger.info("cached %s logits of %s for %d nuclei in %s", logits.shape, model_path, len(logits), out_path)


def load_teacher_logits(path: PathLike, nuclei_stores: Sequence[PathLike]) -> npt.NDArray[np.float32]:
    """float32 (N_total, K) logits from :func:`cache_teacher_logits`, checked against ``nuclei_stores``."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path}: cannot open teacher logits ({err}); rerun the rule that caches them") from err
    with h5:
        if not bool(h5.attrs.get("complete", False)) or h5.attrs.get("format") != LOGITS_FORMAT:
            raise StoreError(f"{path}: not a complete {LOGITS_FORMAT} file; delete it and rerun the caching rule")
        cached = list(
            zip(
                [str(n) for n in h5.attrs["store_names"]],
                [str(n) for n in h5.attrs["store_stains"]],
                [int(n) for n in h5.attrs["store_rows"]],
                strict=True,
            )
        )
        logits = h5["logits"][:].astype(np.float32, copy=False)
    rows = read_nucleus_rows(nuclei_stores, None)
    expected = list(zip([Path(p).name for p in rows.paths], rows.stains, rows.sizes, strict=True))
    if cached != expected:
        msg = (
            f"{path}: teacher logits were cached for stores {cached} (name, stain, rows), not {expected}; "
            "rerun the caching rule on these stores"
        )
        raise StoreError(msg)
    rows_total = sum(rows.sizes)
    if logits.shape != (rows_total, len(rows.classes)):
        raise StoreError(f"{path}: logits shape {logits.shape} does not match {rows_total} rows x {len(rows.classes)}")
    return logits


# ---------------------------------------------------------------------------------------- checkpoints


def _checkpoint(
    model: nn.Module,
    params: ClassifierTrainParams,
    rows: NucleusRows,
    label_set: str,
    *,
    epoch: int,
    criterion: str,
    score: float,
    teacher_logits: PathLike | None,
    init_from: PathLike | None,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": params.arch,
        "num_classes": len(rows.classes),
        "dropout": params.dropout,
        "input_kind": str(model.input_kind),
        "classes": list(rows.classes),
        "label_set": label_set,
        "params": asdict(params),
        "epoch": epoch,
        "criterion": criterion,
        "score": score,
        "teacher_logits": None if teacher_logits is None else str(teacher_logits),
        "init_from": None if init_from is None else str(init_from),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def read_classifier_checkpoint(model_path: PathLike) -> dict[str, Any]:
    """The checkpoint dict of a classifier ``model.pt`` (arch, state dict, classes, ...); checks its format."""
    checkpoint = torch_load(model_path, rule="the classifier training rule")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        msg = (
            f"{model_path}: checkpoint format {checkpoint.get('format')!r} is not {CHECKPOINT_FORMAT!r}; "
            "it was not written by cellkd.training.classifier - retrain it"
        )
        raise StoreError(msg)
    return checkpoint


def load_classifier(model_path: PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the classifier saved in ``model_path`` (arch, classes, weights) on ``device``, in eval mode.

    The model maps ``classifier_input(crops)`` to logits (B, K) and has ``input_kind``.
    """
    return _model_from_checkpoint(read_classifier_checkpoint(model_path), device)


def _model_from_checkpoint(checkpoint: dict[str, Any], device: str | torch.device | None) -> nn.Module:
    model = create_model(checkpoint["arch"], num_classes=checkpoint["num_classes"], dropout=checkpoint["dropout"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(resolve_device(device)).eval()


# --------------------------------------------------------------------------------------- training


def augment_dihedral(crops: torch.Tensor, rot: npt.NDArray[np.int64], flip: npt.NDArray[np.int64]) -> torch.Tensor:
    """Rotate crop i (B, S, S, C) by ``rot[i]`` x 90 degrees, then mirror it when ``flip[i]``: the dihedral group."""
    out = torch.empty_like(crops)
    for k in range(4):
        for f in range(2):
            chosen = np.flatnonzero((rot == k) & (flip == f))
            if not chosen.size:
                continue
            index = torch.from_numpy(chosen).to(crops.device)
            part = torch.rot90(crops[index], k, dims=(1, 2))
            out[index] = part.flip(2) if f else part
    return out


def cap_per_class(
    selected: npt.NDArray[np.int64], targets: npt.NDArray[np.int64], cap: int | None, seed: int
) -> npt.NDArray[np.int64]:
    """At most ``cap`` of ``selected`` per target class, drawn without replacement with ``seed``; order kept."""
    if cap is None:
        return selected
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6361]))  # own stream: independent of shuffling
    keep = np.zeros(len(selected), dtype=bool)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        keep[members if len(members) <= cap else rng.choice(members, size=cap, replace=False)] = True
    return selected[keep]


def _input_kind(arch: str, num_classes: int) -> str:
    """``input_kind`` of ``arch``, read off a throwaway instance built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return str(create_model(arch, num_classes=num_classes).input_kind)


def _check_indices(indices: npt.ArrayLike, total: int, name: str) -> npt.NDArray[np.int64]:
    array = np.unique(np.asarray(indices, dtype=np.int64))
    if array.size and (array[0] < 0 or array[-1] >= total):
        bad = array[0] if array[0] < 0 else array[-1]
        raise ConfigError(f"{name} holds row {bad}, outside the {total} rows of the nuclei stores")
    return array


def _digest(indices: npt.NDArray[np.int64] | None) -> str | None:
    return None if indices is None else hashlib.sha1(indices.tobytes()).hexdigest()


def _class_weights(targets: npt.NDArray[np.int64], num_classes: int) -> npt.NDArray[np.float32]:
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _evaluate(
    model: nn.Module, crops: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int
) -> tuple[float, npt.NDArray[np.int64]]:
    """Mean CE (unweighted, at T=1) and the (K, K) confusion matrix of argmax predictions on in-memory crops."""
    model.eval()
    total, preds = 0.0, []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            logits = model(classifier_input(crops[start : start + batch_size])).float()
            y = labels[start : start + batch_size]
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(dim=1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return total / max(len(crops), 1), confusion_matrix(labels.cpu().numpy(), pred, num_classes)


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
    # Nearly equal batches of <= batch_size: never a 1-sample batch, which BatchNorm cannot train on.
    batches = np.array_split(order, math.ceil(n / params.batch_size))
    total = 0.0
    for batch in progress(batches, desc=f"epoch {epoch}/{params.epochs}", total=len(batches)):
        index = torch.from_numpy(batch).to(crops.device)
        x = classifier_input(augment_dihedral(crops[index], rot[batch], flip[batch]))
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
    device: str | torch.device | None = None,
) -> Path:
    """Train a nucleus classifier on ``nuclei_stores``; return ``out_dir/model.pt`` (see the module doc for rows).

    label_set: the ``labels/{set}`` used for training targets (without teacher) and always for validation.
    teacher_logits: an HDF5 file from :func:`cache_teacher_logits` for these stores: targets become
        argmax(teacher), soft targets its logits (``params.w_kd``). init_from: a classifier model.pt of
        the same arch to start from (fine-tuning; ignored when resuming). train_indices / val_indices:
        global rows replacing the train / val split (rows without a target are dropped).
    Writes ``history.csv`` (epoch, train_loss, val_loss, val_accuracy, val_f1, seconds; val_loss is the
    unweighted CE on ``label_set``), ``last.pt`` / ``best.pt`` (resume state) and finally ``model.pt``,
    the weights with the best validation macro F1 (the lowest training loss without validation rows).
    Deterministic on CPU for a given ``params.seed``; the global torch RNG is left untouched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, last_path, best_path = out / "model.pt", out / "last.pt", out / "best.pt"
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
    criterion = "val_f1"
    if len(val_rows) == 0:
        criterion = "train_loss"
        logger.warning("no labelled validation rows in %s; selecting the model by training loss", list(rows.paths))

    input_kind = _input_kind(params.arch, num_classes)
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
    train_crops = _load_crops(rows, train_rows, input_kind).to(dev)
    train_targets = torch.from_numpy(targets_all[train_rows]).to(dev)
    train_soft = None if soft_all is None else torch.from_numpy(soft_all[train_rows]).to(dev)
    val_crops = _load_crops(rows, val_rows, input_kind).to(dev)
    val_labels = torch.from_numpy(rows.labels[val_rows]).to(dev)
    weights = (
        torch.from_numpy(_class_weights(targets_all[train_rows], num_classes)).to(dev)
        if params.class_weighting
        else None
    )

    data = {
        "stores": data_fingerprint(nuclei_stores),
        "label_set": label_set,
        "teacher_logits": None if teacher_logits is None else file_fingerprint(teacher_logits),
        "init_from": None if init_from is None else file_fingerprint(init_from),
        "train_indices": _digest(explicit_train),
        "val_indices": _digest(explicit_val),
    }
    eval_batch = max(params.batch_size, 1024)
    with torch.random.fork_rng(devices=rng_devices(dev)):
        torch.manual_seed(params.seed)
        model = create_model(params.arch, num_classes=num_classes, dropout=params.dropout).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
        start, best_score, history = 0, -math.inf, []
        state = load_resume_state(
            last_path,
            best_path,
            asdict(params),
            data,
            epochs=params.epochs,
            resumable=_RESUMABLE_CHANGES,
            data_name="nuclei stores / labels",
        )
        if state is None:
            best_path.unlink(missing_ok=True)  # a stale best.pt from another run must never become model.pt
            if init_from is not None:
                _init_weights(model, init_from, params, num_classes)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            restore_rng_state(state, dev)
            start, best_score, history = state["epoch"], state["best_score"], list(state["history"])
            logger.info("resuming from %s after epoch %d (best %s %.4f)", last_path, start, criterion, best_score)

        for epoch in range(start + 1, params.epochs + 1):
            began = time.perf_counter()
            train_loss = _train_epoch(model, optimizer, train_crops, train_targets, train_soft, weights, params, epoch)
            val_loss, val_accuracy, val_f1 = math.nan, math.nan, math.nan
            if len(val_rows):
                val_loss, confusion = _evaluate(model, val_crops, val_labels, num_classes, eval_batch)
                metrics = metrics_from_confusion(confusion)
                val_accuracy, val_f1 = metrics["accuracy"], metrics["f1"]
            seconds = time.perf_counter() - began
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                    "val_f1": val_f1,
                    "seconds": seconds,
                }
            )
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f, val macro F1 %.4f",
                epoch,
                params.epochs,
                train_loss,
                val_loss,
                val_accuracy,
                val_f1,
            )
            score = val_f1 if len(val_rows) else -train_loss
            # A diverged epoch (NaN loss) is never selected; best.pt before last.pt, as in segmentation.
            if math.isfinite(train_loss) and score > best_score:
                best_score = score
                checkpoint = _checkpoint(
                    model,
                    params,
                    rows,
                    label_set,
                    epoch=epoch,
                    criterion=criterion,
                    score=score,
                    teacher_logits=teacher_logits,
                    init_from=init_from,
                )
                torch_save_atomic(checkpoint, best_path)
            resume_state = {
                "params": asdict(params),
                "data": data,
                "epoch": epoch,
                "best_score": best_score,
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                **rng_state(dev),
            }
            torch_save_atomic(resume_state, last_path)
            atomic_write_text(out / "history.csv", history_csv(history, HISTORY_COLUMNS))

    atomic_write_text(out / "history.csv", history_csv(history, HISTORY_COLUMNS))
    if not best_path.exists():
        msg = f"{out}: training diverged (NaN training loss in every epoch, see history.csv); lower lr"
        raise ConfigError(msg)
    publish_model(best_path, model_path)
    logger.info("wrote %s (best %s %.4f)", model_path, criterion, best_score)
    return model_path


# ------------------------------------------------------------------------------ inference, evaluation


def predict_logits(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> npt.NDArray[np.float32]:
    """float32 (N_total, K) logits of every row of ``nuclei_stores`` (store order), crops streamed from disk."""
    dev = resolve_device(device)
    checkpoint = read_classifier_checkpoint(model_path)
    model = _model_from_checkpoint(checkpoint, dev)
    rows = read_nucleus_rows(nuclei_stores, None)
    num_classes = int(checkpoint["num_classes"])
    if num_classes != len(rows.classes):
        raise StoreError(
            f"{model_path}: model has {num_classes} classes but the stores have {len(rows.classes)} "
            f"{list(rows.classes)}; use a model trained on these classes"
        )
    out = np.zeros((len(rows.labels), num_classes), dtype=np.float32)
    with torch.inference_mode():
        for first, crops in _iter_store_chunks(rows, str(model.input_kind), batch_size):
            x = classifier_input(torch.from_numpy(crops).to(dev))
            out[first : first + len(crops)] = model(x).float().cpu().numpy()
    return out


def evaluate_classifier(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    label_set: str,
    split: str = "test",
    *,
    logits: npt.NDArray[np.floating] | None = None,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """``classification_metrics`` of argmax(logits) on the rows of ``split`` labelled in ``label_set``.

    logits: float (N_total, K) from :func:`predict_logits` to reuse (``model_path`` is then not read);
    computed from ``model_path`` when None.
    Returns the dict of ``cellkd.metrics.classification_metrics`` (accuracy, macro precision, recall,
    f1, ``per_class`` keyed by the stores' class names), plus ``rows`` (int, rows scored) and
    ``confusion`` (int64 (K, K), rows = truth).
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; expected one of {list(SPLITS)}")
    rows = read_nucleus_rows(nuclei_stores, label_set)
    if logits is None:
        logits = predict_logits(model_path, nuclei_stores, batch_size=batch_size, device=device)
    logits = np.asarray(logits)
    if logits.shape != (len(rows.labels), len(rows.classes)):
        raise ValueError(f"logits shape {logits.shape} != ({len(rows.labels)} rows, {len(rows.classes)} classes)")
    chosen = (rows.split == SPLITS[split]) & (rows.labels >= 0)
    if not chosen.any():
        raise StoreError(f"{list(rows.paths)}: no {split!r} rows labelled in set {label_set!r} to evaluate")
    confusion = confusion_matrix(rows.labels[chosen], logits[chosen].argmax(axis=1), len(rows.classes))
    metrics = metrics_from_confusion(confusion, rows.classes)
    metrics["rows"] = int(chosen.sum())
    metrics["confusion"] = confusion
    return metrics
