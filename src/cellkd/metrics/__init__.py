"""Evaluation metrics: pixel-wise segmentation metrics (:mod:`cellkd.metrics.pixel`) and nucleus
classification metrics (:mod:`cellkd.metrics.classification`)."""

from cellkd.metrics.classification import (
    CLASSIFICATION_METRICS,
    PER_CLASS_METRICS,
    classification_metrics,
    confusion_matrix,
    metrics_from_confusion,
)
from cellkd.metrics.pixel import PIXEL_METRICS, BoolMask, PixelCounts, pixel_counts, pixel_metrics

__all__ = [
    "CLASSIFICATION_METRICS",
    "PER_CLASS_METRICS",
    "PIXEL_METRICS",
    "BoolMask",
    "PixelCounts",
    "classification_metrics",
    "confusion_matrix",
    "metrics_from_confusion",
    "pixel_counts",
    "pixel_metrics",
]
