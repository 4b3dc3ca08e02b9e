"""Classification metrics: hand-computed confusion matrices and scores, zero-division conventions, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkd.metrics import CLASSIFICATION_METRICS, classification_metrics, confusion_matrix, metrics_from_confusion

NAMES = ["other", "immune", "muscle", "background"]


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray]:
    """8 rows over 3 classes (background never occurs).

    truth: 0 0 0 1 1 2 2 2; pred: 0 0 1 1 2 2 2 0, so the confusion matrix (rows = truth) is
    [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]].
    """
    return np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 0, 1, 1, 2, 2, 2, 0])


def test_confusion_matrix_counts_truth_rows_against_predicted_columns(labels: tuple[np.ndarray, np.ndarray]) -> None:
    cm = confusion_matrix(*labels, num_classes=4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])


def test_classification_metrics_match_hand_computation(labels: tuple[np.ndarray, np.ndarray]) -> None:
    m = classification_metrics(*labels, num_classes=4, class_names=NAMES)
    precision = {"other": 2 / 3, "immune": 1 / 2, "muscle": 2 / 3}
    recall = {"other": 2 / 3, "immune": 1 / 2, "muscle": 2 / 3}
    f1 = {"other": 2 / 3, "immune": 1 / 2, "muscle": 2 / 3}
    assert list(m) == [*CLASSIFICATION_METRICS, "precision_weighted", "recall_weighted", "f1_weighted", "per_class"]
    assert list(m["per_class"]) == NAMES
    assert m["accuracy"] == pytest.approx(5 / 8)
    for name in precision:
        assert m["per_class"][name]["precision"] == pytest.approx(precision[name])
        assert m["per_class"][name]["recall"] == pytest.approx(recall[name])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[name])
    assert [m["per_class"][n]["support"] for n in NAMES] == [3, 2, 3, 0]
    # background occurs in neither truth nor prediction: 0.0, and left out of the macro mean
    assert m["per_class"]["background"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_weighted_averages_weight_classes_by_support_and_weighted_recall_is_accuracy() -> None:
    # class 0: 4 rows, P 1, R 3/4, F1 6/7; class 1: 1 row, P 1/2, R 1, F1 2/3
    m = classification_metrics([0, 0, 0, 0, 1], [0, 0, 0, 1, 1], num_classes=2)
    assert m["f1_weighted"] == pytest.approx((4 * 6 / 7 + 1 * 2 / 3) / 5)
    assert m["precision_weighted"] == pytest.approx((4 * 1 + 1 * 1 / 2) / 5)
    assert m["recall_weighted"] == pytest.approx(m["accuracy"]) == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx((6 / 7 + 2 / 3) / 2)  # the macro mean differs


def test_unequal_precision_and_recall_give_their_harmonic_mean() -> None:
    """truth 0 0 0 0 1 1; pred 0 1 1 1 1 1: class 0 P=1 R=1/4; class 1 P=2/5 R=1."""
    m = classification_metrics([0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1], num_classes=2)
    zero, one = m["per_class"]["0"], m["per_class"]["1"]
    assert zero["precision"] == 1.0 and zero["recall"] == pytest.approx(0.25)
    assert zero["f1"] == pytest.approx(2 * 0.25 / 1.25)
    assert one["precision"] == pytest.approx(0.4) and one["recall"] == 1.0
    assert one["f1"] == pytest.approx(2 * 0.4 / 1.4)
    assert m["recall"] == pytest.approx((0.25 + 1.0) / 2)


def test_class_predicted_but_absent_from_truth_counts_as_zero_in_the_macro_mean() -> None:
    """truth 0 0; pred 0 1: class 1 has no support (recall 0/0 -> 0.0) but was predicted (precision 0)."""
    m = classification_metrics([0, 0], [0, 1], num_classes=3)
    assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["0"]["precision"] == 1.0 and m["per_class"]["0"]["recall"] == 0.5
    assert m["f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # class 2 neither occurs nor is predicted


def test_class_never_predicted_has_zero_precision_not_nan() -> None:
    m = classification_metrics([0, 1, 1], [0, 0, 0], num_classes=2)
    assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    values = [m[k] for k in CLASSIFICATION_METRICS] + [v for c in m["per_class"].values() for v in c.values()]
    assert all(np.isfinite(v) for v in values)


def test_no_rows_gives_zeros() -> None:
    m = classification_metrics(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), num_classes=4)
    assert all(m[k] == 0.0 for k in CLASSIFICATION_METRICS)
    assert all(v == 0 for c in m["per_class"].values() for v in c.values())


def test_perfect_predictions_score_one() -> None:
    y = np.array([3, 2, 1, 0, 3])
    m = classification_metrics(y, y, 4, NAMES)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 1.0


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=40))
def test_metrics_lie_in_unit_interval_and_confusion_sums_to_rows(pairs: list[tuple[int, int]]) -> None:
    truth = np.array([t for t, _ in pairs], dtype=np.int64)
    pred = np.array([p for _, p in pairs], dtype=np.int64)
    cm = confusion_matrix(truth, pred, 4)
    assert cm.sum() == len(pairs) and np.trace(cm) == np.sum(truth == pred)
    m = metrics_from_confusion(cm)
    assert all(0.0 <= m[k] <= 1.0 for k in CLASSIFICATION_METRICS)
    assert all(0.0 <= c[k] <= 1.0 for c in m["per_class"].values() for k in ("precision", "recall", "f1"))
    assert [c["support"] for c in m["per_class"].values()] == np.bincount(truth, minlength=4).tolist()
    assert m["accuracy"] == pytest.approx(np.mean(truth == pred) if pairs else 0.0)


def test_unlabelled_rows_must_be_dropped_first() -> None:
    with pytest.raises(ValueError, match=r"class index -1, outside \[0, 4\); drop unlabelled rows"):
        confusion_matrix([0, -1], [0, 1], 4)


def test_mismatched_lengths_and_names_raise() -> None:
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 3"):
        confusion_matrix([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match="3 class names"):
        classification_metrics([0], [0], 2, ["a", "b", "c"])
    with pytest.raises(TypeError, match="integer class indices"):
        confusion_matrix(np.array([0.5]), np.array([0]), 2)


def test_average_over_leaves_out_a_class_the_reference_never_holds() -> None:
    # Expert labels (classes 0, 1) never hold background (2); one nucleus of class 0 is predicted as background.
    truth, pred = [0, 0, 1, 1], [0, 2, 1, 1]
    everything = classification_metrics(truth, pred, 3)
    nuclei = classification_metrics(truth, pred, 3, average_over=[0, 1])
    # Unrestricted: background enters the mean with F1 0 (predicted once, never true): (2/3 + 1 + 0) / 3.
    assert everything["f1"] == pytest.approx(5 / 9)
    assert nuclei["f1"] == pytest.approx((2 / 3 + 1) / 2)
    # The background prediction is still an error: in class 0's recall, and in accuracy.
    assert nuclei["recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert nuclei["accuracy"] == everything["accuracy"] == pytest.approx(0.75)
    assert nuclei["per_class"] == everything["per_class"]  # per-class values are not averages: unchanged
    assert nuclei["f1_weighted"] == everything["f1_weighted"]  # background has no support to weigh


def test_average_over_restricts_the_weighted_mean_and_skips_classes_absent_from_both() -> None:
    truth, pred = [0, 1, 2], [0, 1, 1]
    # Class 2 (support 1, F1 0) is left out of the weights: (1 * 1 + 2/3 * 1) / 2 rather than / 3.
    assert classification_metrics(truth, pred, 4)["f1_weighted"] == pytest.approx((1 + 2 / 3) / 3)
    assert classification_metrics(truth, pred, 4, average_over=[0, 1])["f1_weighted"] == pytest.approx((1 + 2 / 3) / 2)
    # Class 3 occurs nowhere: listing it does not drag the macro mean down (the module's convention).
    assert classification_metrics(truth, pred, 4, average_over=[0, 1, 3])["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics_from_confusion(confusion_matrix(truth, pred, 4), average_over=range(3))["f1"] == pytest.approx(
        classification_metrics(truth, pred, 4)["f1"]
    )


@pytest.mark.parametrize("average_over", [[], [0, 4], [-1], [0.5]])
def test_average_over_must_name_classes(average_over: list) -> None:
    with pytest.raises(ValueError, match=r"average_over=.* must be class indices in \[0, 4\)"):
        classification_metrics([0, 1], [0, 1], 4, average_over=average_over)
