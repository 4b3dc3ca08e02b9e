"""Knowledge distillation: the loss, class weights, and the teacher-logit cache students train on.

A teacher is never run during student training: :func:`cache_teacher_logits` runs it once over
every row of the nuclei stores and :func:`load_teacher_logits` hands the logits to the trainer,
checked against the stores they were computed on. In the workflow the teacher's evaluation job writes
the cache (``results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/logits.h5``) and scores those same logits
(``cellkd.report.classification.evaluate_classifier_stores``), so that the teacher passes over the nuclei once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from cellkd.errors import StoreError
from cellkd.store.atomic import atomic_h5
from cellkd.training.classifier.data import read_nucleus_rows
from cellkd.training.classifier.evaluate import predict_logits
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

LOGITS_FORMAT = "cellkd.teacher_logits/1"


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


def class_weights(targets: npt.NDArray[np.int64], num_classes: int) -> npt.NDArray[np.float32]:
    """float32 (K,) inverse class frequency of ``targets``, ``w_c = n / (K_present * n_c)`` (0 for an absent class)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def cache_teacher_logits(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    out_path: PathLike,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> npt.NDArray[np.float32]:
    """Run the teacher once over every row of ``nuclei_stores``, store its logits in ``out_path`` (HDF5, atomic)
    and return them (float32 (N_total, K)), for a caller that scores them too.

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
    return logits


def load_teacher_logits(path: PathLike, nuclei_stores: Sequence[PathLike]) -> npt.NDArray[np.float32]:
    """float32 (N_total, K) logits from :func:`cache_teacher_logits`, checked against ``nuclei_stores``."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(
            f"{path}: cannot open teacher logits ({err}); rerun evaluate_teacher, which writes them"
        ) from err
    with h5:
        if not bool(h5.attrs.get("complete", False)) or h5.attrs.get("format") != LOGITS_FORMAT:
            raise StoreError(f"{path}: not a complete {LOGITS_FORMAT} file; delete it and rerun evaluate_teacher")
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
            "rerun evaluate_teacher on these stores"
        )
        raise StoreError(msg)
    rows_total = sum(rows.sizes)
    if logits.shape != (rows_total, len(rows.classes)):
        raise StoreError(f"{path}: logits shape {logits.shape} does not match {rows_total} rows x {len(rows.classes)}")
    return logits
