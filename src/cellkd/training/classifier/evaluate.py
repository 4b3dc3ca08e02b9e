"""Running a trained classifier over nuclei stores: logits of every row, and scores on a labelled split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from cellkd.device import resolve_device
from cellkd.errors import ConfigError, StoreError
from cellkd.metrics.classification import confusion_matrix, metrics_from_confusion
from cellkd.models import classifier_input
from cellkd.models.checkpoint import classifier_from_checkpoint, read_classifier_checkpoint
from cellkd.training.classifier.data import iter_store_chunks, read_nucleus_rows
from cellkd.types import SPLITS, PathLike


def score_crops(
    model: nn.Module, crops: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int
) -> tuple[float, npt.NDArray[np.int64]]:
    """Mean CE (unweighted, at T=1) and the (K, K) confusion matrix of argmax predictions on in-memory crops."""
    model.eval()
    total, preds = 0.0, []
    with torch.inference_mode():
        for start in range(0, len(crops), batch_size):
            logits = infer_logits(model, crops[start : start + batch_size])
            y = labels[start : start + batch_size]
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(dim=1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return total / max(len(crops), 1), confusion_matrix(labels.cpu().numpy(), pred, num_classes)


CPU_FORWARD_BATCH = 128
"""Crops per forward pass on CPU, whatever the reading chunk. At 64-128 crops the activations stay in the CPU
caches; at 1024 RCCNet's first feature maps alone are 128 MiB and its crops/s fall by 1.6-2x (VGG-4 likewise;
``benchmarks/student_speed.py``)."""


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """``model`` in eval mode and, on CPU, in channels_last layout (in place; returned for chaining).

    oneDNN runs CPU convolutions in NHWC; an NCHW model pays a layout reorder around every convolution.
    channels_last makes RCCNet and VGG-4 1.3-1.5x faster on 32x32 crops (``benchmarks/student_speed.py``) and
    changes logits only by float rounding (~1e-8, as much as a change of batch size does). Left as is on GPUs,
    where it was not measured.
    """
    model.eval()
    return use_cpu_layout(model)


def use_cpu_layout(model: nn.Module) -> nn.Module:
    """``model`` in channels_last layout when it lives on the CPU (in place; returned for chaining).

    The layout of :func:`prepare_for_inference`; training on CPU uses it too (with :func:`cpu_layout_input`), where
    it makes a VGG-4 step 1.3x and an RCCNet step 1.4x cheaper (batch 128 of 32x32 crops, one thread).
    """
    if next(model.parameters()).device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def cpu_layout_input(crops: torch.Tensor) -> torch.Tensor:
    """``classifier_input(crops)`` in the layout of a :func:`use_cpu_layout` model on the crops' device."""
    x = classifier_input(crops)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def infer_logits(model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """float32 logits (B, K) of uint8 crops (B, S, S, C) on the model's device, in forward batches that keep a CPU's
    caches warm (``CPU_FORWARD_BATCH``; one batch on other devices). Call inside ``torch.inference_mode()``.

    On CPU each forward batch is converted to float on its own: float32 input is 4x the uint8 crops, twice over
    with the channels_last copy, so converting a whole reading chunk first would hold 8x its crops at once.
    """
    if crops.device.type == "cpu":
        return torch.cat([model(cpu_layout_input(part)).float() for part in crops.split(CPU_FORWARD_BATCH)])
    return model(cpu_layout_input(crops)).float()


def crop_logits(model: nn.Module, crops: torch.Tensor, batch_size: int = 1024) -> npt.NDArray[np.float32]:
    """float32 (N, K) logits of in-memory uint8 crops (N, S, S, C) by a :func:`prepare_for_inference` model.

    For crops already held in memory, instead of :func:`predict_logits` reading every row of the stores again:
    ``batch_size`` of them at a time go to the model's device (forward passes as in :func:`infer_logits`).
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        parts = [infer_logits(model, part.to(device)).cpu() for part in crops.split(batch_size)]
    return torch.cat(parts).numpy()


def predict_logits(
    model_path: PathLike,
    nuclei_stores: Sequence[PathLike],
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> npt.NDArray[np.float32]:
    """float32 (N_total, K) logits of every row of ``nuclei_stores`` (store order), crops streamed from disk.

    batch_size: crops read from disk at a time; forward passes on CPU take ``CPU_FORWARD_BATCH`` of them at once.
    """
    dev = resolve_device(device)
    checkpoint = read_classifier_checkpoint(model_path)
    model = prepare_for_inference(classifier_from_checkpoint(checkpoint, dev))
    rows = read_nucleus_rows(nuclei_stores, None)
    num_classes = int(checkpoint["num_classes"])
    if num_classes != len(rows.classes):
        raise StoreError(
            f"{model_path}: model has {num_classes} classes but the stores have {len(rows.classes)} "
            f"{list(rows.classes)}; use a model trained on these classes"
        )
    out = np.zeros((len(rows.labels), num_classes), dtype=np.float32)
    with torch.inference_mode():
        for first, crops in iter_store_chunks(rows, str(model.input_kind), batch_size):
            out[first : first + len(crops)] = infer_logits(model, torch.from_numpy(crops).to(dev)).cpu().numpy()
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
