"""Pixel-wise agreement of binary masks: confusion counts and Dice, IoU, precision, recall, accuracy.

Counts are plain integers so that they accumulate exactly over patches and batches
(``total = sum(counts, PixelCounts())``); metrics are computed once from the totals (micro average).

Empty-mask convention: a ratio whose denominator is 0 means neither mask has any pixel in the
relevant set, so the masks agree perfectly there and the ratio is 1.0. In particular, pred and
truth both empty give dice = iou = precision = recall = 1.0; a metric is never NaN. When only one
side is empty the usual formulas already give 0.0 for dice and iou (e.g. pred empty, truth not:
precision = 1.0 by the convention, recall = 0.0).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

# torch is not imported here: the table and figure rules count numpy masks, and importing torch would
# add seconds to each of those short jobs. A tensor can only reach us once its caller has imported torch.
BoolMask: TypeAlias = "npt.NDArray[np.bool_] | torch.Tensor"
"""bool masks of any shape (numpy array or torch tensor on any device); True = foreground."""

PIXEL_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "dice", "iou")
"""Keys of :func:`pixel_metrics`, in table order."""


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of foreground pixels: true/false positives, false negatives, true negatives."""

    tp: int = 0
    """Foreground in both masks."""
    fp: int = 0
    """Foreground in the prediction only."""
    fn: int = 0
    """Foreground in the truth only."""
    tn: int = 0
    """Background in both."""

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "fn", "tn"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"PixelCounts {name}={value!r} must be a non-negative integer")
            object.__setattr__(self, name, int(value))

    def __add__(self, other: PixelCounts) -> PixelCounts:
        if not isinstance(other, PixelCounts):
            return NotImplemented
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        """Number of pixels counted."""
        return self.tp + self.fp + self.fn + self.tn


def pixel_counts(pred: BoolMask, truth: BoolMask) -> PixelCounts:
    """Count pixel agreement of two bool masks of the same shape (e.g. (B, 1, H, W) or (H, W)).

    Both must be numpy or both torch (counted on their device; only four integers leave it).
    Threshold logits first, e.g. ``pred = logits > 0``.
    """
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(pred, torch.Tensor) and isinstance(truth, torch.Tensor):
        if pred.dtype != torch.bool or truth.dtype != torch.bool:
            raise TypeError(f"pixel_counts needs bool masks, got {pred.dtype} and {truth.dtype}; threshold first")
        tp = int((pred & truth).sum())
        n_pred, n_truth = int(pred.sum()), int(truth.sum())
    elif isinstance(pred, np.ndarray) and isinstance(truth, np.ndarray):
        if pred.dtype != np.bool_ or truth.dtype != np.bool_:
            raise TypeError(f"pixel_counts needs bool masks, got {pred.dtype} and {truth.dtype}; threshold first")
        tp = int(np.count_nonzero(pred & truth))
        n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    else:
        raise TypeError(
            f"pred and truth must both be numpy arrays or both torch tensors, got {type(pred)}, {type(truth)}"
        )
    size = int(np.prod(tuple(pred.shape), dtype=np.int64))
    fp, fn = n_pred - tp, n_truth - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=size - tp - fp - fn)


def _ratio(numerator: int, denominator: int) -> float:
    # denominator 0: the masks hold no pixel of this kind on either side, i.e. perfect agreement.
    return 1.0 if denominator == 0 else numerator / denominator


def pixel_metrics(counts: PixelCounts) -> dict[str, float]:
    """accuracy, precision, recall, dice, iou in [0, 1] from (accumulated) counts; see the module doc for 0/0."""
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    return {
        "accuracy": _ratio(tp + tn, counts.total),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
    }
