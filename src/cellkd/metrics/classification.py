"""Classification metrics of nucleus labels: confusion matrix, accuracy, macro and per-class precision/recall/F1.

Labels are class indices in ``[0, num_classes)`` (config order, background last); unlabelled
rows (-1 in the nuclei store) must be removed by the caller.

Conventions (never NaN):

- A per-class ratio whose denominator is 0 is 0.0: precision of a class never predicted,
  recall of a class absent from ``y_true``, F1 when precision + recall = 0.
- The macro averages run over the classes that occur in ``y_true`` or ``y_pred``; a class absent
  from both has nothing to score (its per-class values are reported as 0.0 but do not drag the
  mean down). This is what scikit-learn does when it infers the labels from the data.
- ``average_over`` (like scikit-learn's ``labels``) restricts the macro and weighted averages to the
  given classes (those of them that occur in ``y_true`` or ``y_pred``): for reference labels that can
  never hold some class, e.g. the expert's labels, which are matched nuclei and never background. Rows
  predicted as an excluded class still count as errors, in the recall of their true class; accuracy
  and the per-class values are unaffected.
- The weighted averages (``*_weighted``) weight each class by its support in ``y_true``
  (scikit-learn's ``average="weighted"``); weighted recall equals accuracy.
- With no rows at all, every metric is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1")
"""Summary keys of :func:`classification_metrics` (precision, recall, f1 are macro averages), in table order."""

PER_CLASS_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "support")
"""Keys of each class's entry in ``metrics["per_class"]``."""


def _labels(values: npt.ArrayLike, num_classes: int, name: str) -> npt.NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = array[(array < 0) | (array >= num_classes)][0]
        raise ValueError(f"{name} holds class index {bad}, outside [0, {num_classes}); drop unlabelled rows (-1) first")
    return array


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """int64 (K, K) counts: entry [i, j] = rows with true class i predicted as j. Inputs: int (N,) in [0, K)."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    truth = _labels(y_true, num_classes, "y_true")
    pred = _labels(y_pred, num_classes, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {pred.size}")
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


def _safe_ratio(numerator: npt.NDArray[np.float64], denominator: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _average_mask(average_over: Sequence[int] | None, k: int) -> npt.NDArray[np.bool_]:
    """bool (K,): the classes the averages may run over (every class when ``average_over`` is None)."""
    if average_over is None:
        return np.ones(k, dtype=bool)
    chosen = np.asarray(list(average_over))
    if chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer) or chosen.min() < 0 or chosen.max() >= k:
        raise ValueError(f"average_over={list(average_over)!r} must be class indices in [0, {k}), at least one")
    mask = np.zeros(k, dtype=bool)
    mask[chosen] = True
    return mask


def metrics_from_confusion(
    confusion: npt.NDArray[np.integer],
    class_names: Sequence[str] | None = None,
    *,
    average_over: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Metrics of :func:`classification_metrics` from a (K, K) confusion matrix (e.g. summed over batches)."""
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got shape {cm.shape}")
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names {names} for {k} classes; give one name per class")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_ratio(tp, predicted)
    recall = _safe_ratio(tp, support)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    averaged = _average_mask(average_over, k)
    active = averaged & ((support > 0) | (predicted > 0))
    weights = np.where(averaged, support, 0.0)
    total = float(cm.sum())

    def macro(values: npt.NDArray[np.float64]) -> float:
        return float(values[active].mean()) if active.any() else 0.0

    def weighted(values: npt.NDArray[np.float64]) -> float:
        # Support-weighted mean: weighted recall equals accuracy, as in the paper's Table 3 (when every class with
        # support is averaged over).
        return float((values * weights).sum() / weights.sum()) if weights.sum() else 0.0

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": macro(precision),
        "recall": macro(recall),
        "f1": macro(f1),
        "precision_weighted": weighted(precision),
        "recall_weighted": weighted(recall),
        "f1_weighted": weighted(f1),
        "per_class": per_class,
    }


def classification_metrics(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    *,
    average_over: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class precision/recall/F1/support of int (N,) labels.

    Returns ``{"accuracy", "precision", "recall", "f1"}`` floats (macro averages, see the module doc),
    their support-weighted counterparts ``{"precision_weighted", "recall_weighted", "f1_weighted"}``,
    and ``"per_class"``: ``{name: {"precision", "recall", "f1" (floats), "support" (int, rows of that
    true class)}}`` in class order. ``class_names`` defaults to "0", "1", ...; every float lies in [0, 1].
    ``average_over``: class indices the macro and weighted averages run over (None: every class; see the
    module doc); a ValueError names any index outside ``[0, num_classes)``.
    """
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes), class_names, average_over=average_over)
