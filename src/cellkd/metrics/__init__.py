"""Evaluation metrics: pixel-wise segmentation metrics now (:mod:`cellkd.metrics.pixel`); classification later."""

from cellkd.metrics.pixel import PIXEL_METRICS, BoolMask, PixelCounts, pixel_counts, pixel_metrics

__all__ = ["PIXEL_METRICS", "BoolMask", "PixelCounts", "pixel_counts", "pixel_metrics"]
