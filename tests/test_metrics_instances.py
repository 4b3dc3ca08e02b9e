"""Instance metrics: one-to-one matches at IoU 0.5, splits, merges, panoptic quality."""

from __future__ import annotations

import math

import pytest
import shapely

from cellkd.metrics.instances import INSTANCE_METRICS, InstanceCounts, instance_counts, instance_counts_by_class


def _box(x: float, y: float, w: float = 10, h: float = 10) -> shapely.Polygon:
    return shapely.box(x, y, x + w, y + h)


def test_identical_nuclei_all_match_with_pq_one() -> None:
    truth = [_box(0, 0), _box(20, 0), _box(40, 0, 20, 6)]
    counts = instance_counts(truth, truth)
    assert counts == InstanceCounts(true=3, predicted=3, matches=3, iou_sum=pytest.approx(3.0), split=0, merged=0)
    metrics = counts.metrics()
    assert list(metrics) == list(INSTANCE_METRICS)
    assert metrics["matched"] == metrics["precision"] == metrics["pq"] == pytest.approx(1.0)


def test_split_merge_shift_and_false_positive_are_each_counted() -> None:
    truth = [_box(0, 0), _box(100, 0, 40, 10), _box(200, 0), _box(212, 0), _box(300, 0)]
    predicted = [
        _box(1, 0),  # shifted by 1 px: IoU 9/11, a match
        _box(100, 0, 20, 10),  # an elongated nucleus cut in two halves: two pieces held, no match
        _box(120, 0, 20, 10),
        _box(200, 0, 22, 10),  # two touching nuclei fused into one: both merged, no match
        _box(500, 500),  # nothing there: a false positive
    ]  # truth[4] is missed
    counts = instance_counts(predicted, truth)
    assert counts.true == 5 and counts.predicted == 5
    assert counts.matches == 1
    assert counts.iou_sum == pytest.approx(90 / 110)
    assert counts.split == 1
    assert counts.merged == 2
    metrics = counts.metrics()
    assert metrics["matched"] == pytest.approx(1 / 5)
    assert metrics["precision"] == pytest.approx(1 / 5)
    # RQ = 1 / (1 + 4/2 + 4/2), SQ = 9/11
    assert metrics["pq"] == pytest.approx((90 / 110) * (1 / 5))
    assert metrics["split"] == pytest.approx(1 / 5) and metrics["merged"] == pytest.approx(2 / 5)


def test_a_large_piece_and_a_sliver_is_a_match_and_still_a_split() -> None:
    truth = [_box(0, 0, 20, 10)]
    counts = instance_counts([_box(0, 0, 16, 10), _box(16, 0, 4, 10)], truth)
    assert counts.matches == 1  # IoU 0.8
    assert counts.split == 1  # the sliver lies wholly inside the same nucleus


def test_counts_add_up_over_fragments_and_empty_sides_are_safe() -> None:
    a = instance_counts([_box(0, 0)], [_box(0, 0)])
    b = instance_counts([], [_box(0, 0), _box(20, 0)])
    c = instance_counts([_box(0, 0)], [])
    total = a + b + c
    assert total == InstanceCounts(true=3, predicted=2, matches=1, iou_sum=1.0)
    assert total.metrics()["matched"] == pytest.approx(1 / 3)
    assert math.isnan(InstanceCounts().metrics()["matched"])
    assert b.metrics()["pq"] == 0.0


def test_by_class_counts_follow_the_true_class_and_sum_to_the_total() -> None:
    truth = [_box(0, 0), _box(100, 0, 40, 10), _box(200, 0), _box(212, 0)]
    true_class = [0, 2, 0, 1]  # other, muscle, other, immune
    predicted = [
        _box(1, 0),  # matches the first "other"
        _box(100, 0, 20, 10),  # the muscle nucleus cut in two
        _box(120, 0, 20, 10),
        _box(200, 0, 20, 10),  # an "other" and an "immune" nucleus fused (overlaps the "other" most)
        _box(500, 500),  # on no true nucleus: in the total only
    ]
    other, immune, muscle = instance_counts_by_class(predicted, truth, true_class, 3)
    assert other == InstanceCounts(true=2, predicted=2, matches=1, iou_sum=pytest.approx(90 / 110), split=0, merged=1)
    assert immune == InstanceCounts(true=1, predicted=0, matches=0, iou_sum=0.0, split=0, merged=1)
    assert muscle == InstanceCounts(true=1, predicted=2, matches=0, iou_sum=0.0, split=1, merged=0)
    total = instance_counts(predicted, truth)
    summed = other + immune + muscle
    assert (summed.true, summed.matches, summed.split, summed.merged) == (
        total.true,
        total.matches,
        total.split,
        total.merged,
    )
    assert summed.predicted == total.predicted - 1


def test_by_class_needs_one_class_per_true_nucleus() -> None:
    with pytest.raises(ValueError, match="one class per true nucleus"):
        instance_counts_by_class([_box(0, 0)], [_box(0, 0), _box(20, 0)], [0], 3)
