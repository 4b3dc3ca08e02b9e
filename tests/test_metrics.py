"""Pixel metrics: hand-computed counts and scores, empty-mask conventions, invariants, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellkd.metrics import PIXEL_METRICS, PixelCounts, pixel_counts, pixel_metrics


@pytest.fixture
def masks() -> tuple[np.ndarray, np.ndarray]:
    """A 2x4 prediction and truth: tp=2 (col 0), fp=1 (0,1), fn=2 (row 1 cols 2,3), tn=3."""
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    truth = np.array([[1, 0, 0, 0], [1, 0, 1, 1]], dtype=bool)
    return pred, truth


def test_pixel_counts_match_hand_count(masks: tuple[np.ndarray, np.ndarray]) -> None:
    assert pixel_counts(*masks) == PixelCounts(tp=2, fp=1, fn=2, tn=3)


def test_torch_and_numpy_masks_give_the_same_counts(masks: tuple[np.ndarray, np.ndarray]) -> None:
    pred, truth = masks
    assert pixel_counts(torch.from_numpy(pred), torch.from_numpy(truth)) == pixel_counts(pred, truth)


def test_pixel_metrics_match_hand_computation(masks: tuple[np.ndarray, np.ndarray]) -> None:
    scores = pixel_metrics(pixel_counts(*masks))
    assert tuple(scores) == PIXEL_METRICS
    assert scores == pytest.approx(
        {"accuracy": 5 / 8, "precision": 2 / 3, "recall": 2 / 4, "dice": 4 / 7, "iou": 2 / 5}
    )


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        pytest.param(
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0},
            id="both-empty",
        ),
        pytest.param(
            [0, 0, 0, 0],
            [1, 1, 0, 0],
            {"accuracy": 0.5, "precision": 1.0, "recall": 0.0, "dice": 0.0, "iou": 0.0},
            id="pred-empty",
        ),
        pytest.param(
            [1, 0, 0, 0],
            [0, 0, 0, 0],
            {"accuracy": 0.75, "precision": 0.0, "recall": 1.0, "dice": 0.0, "iou": 0.0},
            id="truth-empty",
        ),
        pytest.param(
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0},
            id="both-full",
        ),
    ],
)
def test_empty_mask_conventions_never_give_nan(pred: list[int], truth: list[int], expected: dict) -> None:
    scores = pixel_metrics(pixel_counts(np.array(pred, dtype=bool), np.array(truth, dtype=bool)))
    assert scores == expected


def test_counts_of_nothing_score_as_perfect_agreement() -> None:
    assert pixel_metrics(PixelCounts()) == dict.fromkeys(PIXEL_METRICS, 1.0)


def test_counts_add_fieldwise() -> None:
    assert PixelCounts(1, 2, 3, 4) + PixelCounts(10, 20, 30, 40) == PixelCounts(11, 22, 33, 44)
    assert sum([PixelCounts(1, 0, 0, 1)] * 3, PixelCounts()) == PixelCounts(3, 0, 0, 3)


mask_pairs = st.integers(1, 12).flatmap(
    lambda n: st.tuples(arrays(np.bool_, (n, 5)), arrays(np.bool_, (n, 5)), st.integers(0, n))
)


@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_metrics_lie_in_unit_interval_and_dice_follows_from_iou(pair: tuple[np.ndarray, np.ndarray, int]) -> None:
    pred, truth, _ = pair
    scores = pixel_metrics(pixel_counts(pred, truth))
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in scores.values())
    assert scores["dice"] == pytest.approx(2 * scores["iou"] / (1 + scores["iou"]))


@settings(max_examples=200, deadline=None)
@given(mask_pairs)
def test_counts_accumulated_over_chunks_equal_counts_of_the_whole(pair: tuple[np.ndarray, np.ndarray, int]) -> None:
    pred, truth, cut = pair
    chunks = pixel_counts(pred[:cut], truth[:cut]) + pixel_counts(pred[cut:], truth[cut:])
    whole = pixel_counts(pred, truth)
    assert chunks == whole
    assert whole.total == pred.size


@pytest.mark.parametrize(
    ("pred", "truth", "error", "message"),
    [
        (np.zeros((2, 2), bool), np.zeros((2, 3), bool), ValueError, r"pred shape \(2, 2\) differs from truth shape"),
        (np.zeros(3, np.uint8), np.zeros(3, bool), TypeError, "needs bool masks, got uint8"),
        (torch.zeros(3), torch.zeros(3, dtype=torch.bool), TypeError, "needs bool masks, got torch.float32"),
        (np.zeros(3, bool), torch.zeros(3, dtype=torch.bool), TypeError, "both be numpy arrays or both torch"),
    ],
)
def test_pixel_counts_rejects_mismatched_or_non_bool_masks(pred, truth, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        pixel_counts(pred, truth)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_pixel_counts_reject_negative_or_fractional_values(bad: object) -> None:
    with pytest.raises(ValueError, match=r"tp=.* must be a non-negative integer"):
        PixelCounts(tp=bad)
