"""Evaluation metrics: pixel-wise segmentation metrics (:mod:`cellkd.metrics.pixel`), instance-level
nucleus matching (:mod:`cellkd.metrics.instances`) and nucleus classification metrics
(:mod:`cellkd.metrics.classification`)."""

from cellkd.metrics.classification import (
    CLASSIFICATION_METRICS,
    PER_CLASS_METRICS,
    classification_metrics,
    confusion_matrix,
    metrics_from_confusion,
)
from cellkd.metrics.instances import INSTANCE_METRICS, InstanceCounts, instance_counts, instance_counts_by_class
from cellkd.metrics.pixel import PIXEL_METRICS, BoolMask, PixelCounts, pixel_counts, pixel_metrics

__all__ = [
    "CLASSIFICATION_METRICS",
    "INSTANCE_METRICS",
    "PER_CLASS_METRICS",
    "PIXEL_METRICS",
    "BoolMask",
    "InstanceCounts",
    "PixelCounts",
    "classification_metrics",
    "confusion_matrix",
    "instance_counts",
    "instance_counts_by_class",
    "metrics_from_confusion",
    "pixel_counts",
    "pixel_metrics",
]
