"""Instance-level agreement of predicted nuclei with true nuclei: one-to-one matches, splits and merges.

Pixel Dice cannot see a nucleus cut in two or two nuclei fused into one; these metrics can. Both sides
are polygons in the same pixel frame (the nuclei store's outlines and the truth GeoJSON, level 0).

Matching follows panoptic quality (Kirillov et al., 2019): a predicted and a true nucleus match when
their IoU exceeds 0.5, which makes the matching one-to-one without any assignment step (two polygons
that each overlap a third by more than half of their union cannot both exist). Then

- ``matched`` = TP / true nuclei (detection recall at IoU 0.5), ``precision`` = TP / predicted nuclei;
- ``pq`` = SQ · RQ with SQ the mean IoU of the matches and RQ = TP / (TP + FP/2 + FN/2);
- ``split``: share of true nuclei that hold two or more predicted instances, counting a predicted
  instance as held when at least half of its area lies inside the true nucleus (over-splitting);
- ``merged``: share of true nuclei whose area lies at least half inside a predicted instance that also
  holds another true nucleus that way (under-splitting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import shapely

INSTANCE_METRICS: tuple[str, ...] = ("matched", "precision", "pq", "sq", "split", "merged")
"""Keys of :meth:`InstanceCounts.metrics`, in table order."""

MATCH_IOU = 0.5
"""IoU above which a predicted and a true nucleus are the same nucleus (unique matching)."""
HELD_FRACTION = 0.5
"""Share of an instance's area inside another for split/merge counting."""


@dataclass(frozen=True)
class InstanceCounts:
    """Counts that add up exactly over fragments and slides; metrics come from the totals."""

    true: int = 0
    predicted: int = 0
    matches: int = 0
    iou_sum: float = 0.0
    split: int = 0
    merged: int = 0

    def __add__(self, other: InstanceCounts) -> InstanceCounts:
        mine, theirs = asdict(self), asdict(other)
        return InstanceCounts(**{key: mine[key] + theirs[key] for key in mine})

    def metrics(self) -> dict[str, float]:
        """The :data:`INSTANCE_METRICS`; a ratio over zero nuclei is NaN (nothing to score)."""
        fp, fn = self.predicted - self.matches, self.true - self.matches
        rq_denominator = self.matches + fp / 2 + fn / 2
        sq = self.iou_sum / self.matches if self.matches else float("nan")
        rq = self.matches / rq_denominator if rq_denominator else float("nan")
        return {
            "matched": _ratio(self.matches, self.true),
            "precision": _ratio(self.matches, self.predicted),
            "pq": sq * rq if self.matches else (0.0 if rq_denominator else float("nan")),
            "sq": sq,
            "split": _ratio(self.split, self.true),
            "merged": _ratio(self.merged, self.true),
        }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def instance_counts(
    predicted: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
    true: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
) -> InstanceCounts:
    """Compare predicted nucleus polygons with true ones (same pixel frame); see the module docstring."""
    pred = np.asarray(predicted, dtype=object)
    truth = np.asarray(true, dtype=object)
    if not len(pred) or not len(truth):
        return InstanceCounts(true=len(truth), predicted=len(pred))
    # Every overlapping (true, predicted) pair, from the true polygons' spatial index.
    pred_index, true_index = shapely.STRtree(truth).query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[pred_index], truth[true_index]))
    pred_area = shapely.area(pred)[pred_index]
    true_area = shapely.area(truth)[true_index]
    iou = inter / np.maximum(pred_area + true_area - inter, np.finfo(float).tiny)

    matched = iou > MATCH_IOU
    # A predicted instance held by a true nucleus (split test) / a true nucleus held by a predicted one (merge test).
    pred_held = inter >= HELD_FRACTION * pred_area
    true_held = inter >= HELD_FRACTION * true_area
    pieces_per_true = np.bincount(true_index[pred_held], minlength=len(truth))
    true_per_pred = np.bincount(pred_index[true_held], minlength=len(pred))
    merged_true = np.zeros(len(truth), dtype=bool)
    merged_true[true_index[true_held & (true_per_pred[pred_index] >= 2)]] = True
    return InstanceCounts(
        true=len(truth),
        predicted=len(pred),
        matches=int(matched.sum()),
        iou_sum=float(iou[matched].sum()),
        split=int((pieces_per_true >= 2).sum()),
        merged=int(merged_true.sum()),
    )
