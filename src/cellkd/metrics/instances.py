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

:func:`instance_counts_by_class` gives the same counts per class of the true nuclei (elongated muscle
nuclei are the ones a watershed over-splits, so a slide total can hide them).
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
    """True nuclei (truth polygons)."""
    predicted: int = 0
    """Predicted instances (the nuclei store's outlines)."""
    matches: int = 0
    """One-to-one pairs with IoU > :data:`MATCH_IOU` (TP)."""
    iou_sum: float = 0.0
    """Sum of the matched pairs' IoU (SQ = iou_sum / matches)."""
    split: int = 0
    """True nuclei holding two or more predicted instances."""
    merged: int = 0
    """True nuclei sharing one predicted instance with another true nucleus."""

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
    outcomes = _outcomes(predicted, true)
    return outcomes.counts(np.ones(outcomes.matched.size, dtype=bool), np.ones(outcomes.owner.size, dtype=bool))


def instance_counts_by_class(
    predicted: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
    true: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
    true_class: Sequence[int] | npt.NDArray[np.integer],
    n_classes: int,
) -> list[InstanceCounts]:
    """:func:`instance_counts` per class of the true nuclei (``true_class``: (n,) index in ``0..n_classes-1``).

    A true nucleus counts for its own class. A predicted instance counts for the class of the true
    nucleus it overlaps most (so the pieces of a cut nucleus lower its class's precision); one that
    overlaps no true nucleus counts in no class, only in :func:`instance_counts`. Splits and merges
    are judged against all true nuclei, so a nucleus fused with one of another class is merged.
    """
    classes = np.asarray(true_class, dtype=np.int64)
    if classes.shape != (len(true),):
        raise ValueError(f"true_class has shape {classes.shape}; expected one class per true nucleus ({len(true)},)")
    outcomes = _outcomes(predicted, true)
    owner_class = np.where(outcomes.owner >= 0, classes[np.maximum(outcomes.owner, 0)], -1)
    return [outcomes.counts(classes == k, owner_class == k) for k in range(n_classes)]


@dataclass(frozen=True)
class _Outcomes:
    """What happened to each true nucleus and where each predicted instance lies."""

    matched: npt.NDArray[np.bool_]  # (n_true,) matched one-to-one at IoU > MATCH_IOU
    iou: npt.NDArray[np.float64]  # (n_true,) IoU of that match, 0 when unmatched
    split: npt.NDArray[np.bool_]  # (n_true,) holds two or more predicted instances
    merged: npt.NDArray[np.bool_]  # (n_true,) held by an instance that holds another true nucleus
    owner: npt.NDArray[np.int64]  # (n_pred,) the true nucleus overlapping it most, -1 for none

    def counts(self, true_rows: npt.NDArray[np.bool_], predicted_rows: npt.NDArray[np.bool_]) -> InstanceCounts:
        """The counts over the selected true nuclei and predicted instances."""
        return InstanceCounts(
            true=int(true_rows.sum()),
            predicted=int(predicted_rows.sum()),
            matches=int(self.matched[true_rows].sum()),
            iou_sum=float(self.iou[true_rows].sum()),
            split=int(self.split[true_rows].sum()),
            merged=int(self.merged[true_rows].sum()),
        )


def _outcomes(
    predicted: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
    true: Sequence[shapely.Geometry] | npt.NDArray[np.object_],
) -> _Outcomes:
    pred = np.asarray(predicted, dtype=object)
    truth = np.asarray(true, dtype=object)
    n_true, n_pred = len(truth), len(pred)
    matched, iou_of_true = np.zeros(n_true, dtype=bool), np.zeros(n_true)
    owner = np.full(n_pred, -1, dtype=np.int64)
    if not n_pred or not n_true:
        return _Outcomes(matched, iou_of_true, np.zeros(n_true, dtype=bool), np.zeros(n_true, dtype=bool), owner)
    # Every overlapping (true, predicted) pair, from the true polygons' spatial index.
    pred_index, true_index = shapely.STRtree(truth).query(pred, predicate="intersects")
    inter = shapely.area(shapely.intersection(pred[pred_index], truth[true_index]))
    pred_area = shapely.area(pred)[pred_index]
    true_area = shapely.area(truth)[true_index]
    iou = inter / np.maximum(pred_area + true_area - inter, np.finfo(float).tiny)

    match = iou > MATCH_IOU
    matched[true_index[match]] = True
    iou_of_true[true_index[match]] = iou[match]
    # A predicted instance held by a true nucleus (split test) / a true nucleus held by a predicted one (merge test).
    pred_held = inter >= HELD_FRACTION * pred_area
    true_held = inter >= HELD_FRACTION * true_area
    pieces_per_true = np.bincount(true_index[pred_held], minlength=n_true)
    true_per_pred = np.bincount(pred_index[true_held], minlength=n_pred)
    merged = np.zeros(n_true, dtype=bool)
    merged[true_index[true_held & (true_per_pred[pred_index] >= 2)]] = True
    # Largest overlap last within each predicted instance, so the assignment keeps it.
    order = np.lexsort((inter, pred_index))
    owner[pred_index[order]] = true_index[order]
    return _Outcomes(matched, iou_of_true, pieces_per_true >= 2, merged, owner)
