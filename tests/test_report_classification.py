"""Rows of the classification tables (3, 4, 5, fine-tuning metrics): macro and weighted averages, named so."""

from __future__ import annotations

import numpy as np
import pytest

from cellkd.report.classification import SUMMARY_METRICS, summary_row

CLASSES = ("a", "b", "background")


def test_summary_row_names_macro_and_weighted_averages_and_skips_unlabelled_rows() -> None:
    # 6 known rows: class a (support 4) is 3/4 right, class b (support 2) 2/2 right; background never occurs.
    # Two more rows carry -1 (not labelled) on one side and must not count.
    y_true = np.array([0, 0, 0, 0, 1, 1, -1, 0])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 0, -1])
    row = summary_row(y_true, y_pred, CLASSES)
    assert list(row) == [*SUMMARY_METRICS, "f1_a", "f1_b", "f1_background", "nuclei"]
    assert row["nuclei"] == 6
    f1_a, f1_b = 2 * 1.0 * 0.75 / 1.75, 2 * (2 / 3) * 1.0 / (5 / 3)
    assert row["f1_a"] == pytest.approx(f1_a) and row["f1_b"] == pytest.approx(f1_b)
    assert row["f1_macro"] == pytest.approx((f1_a + f1_b) / 2)  # background: neither true nor predicted
    assert row["f1_weighted"] == pytest.approx((4 * f1_a + 2 * f1_b) / 6)
    assert row["precision_macro"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert row["precision_weighted"] == pytest.approx((4 * 1.0 + 2 * 2 / 3) / 6)
    assert row["recall_macro"] == pytest.approx((0.75 + 1.0) / 2)
    assert row["recall_weighted"] == pytest.approx(row["accuracy"]) == pytest.approx(5 / 6)
