"""Rows of the classification tables (3, 4, 5, fine-tuning metrics): macro and weighted averages, named so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_training_classifier import CLASSES as STORE_CLASSES
from test_training_classifier import write_nuclei_store

from cellkd.report.classification import SUMMARY_METRICS, evaluate_predictions, label_agreement, summary_row

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


def test_table3_averages_over_nucleus_classes_against_the_expert_but_over_all_against_the_truth(
    tmp_path: Path,
) -> None:
    # 8 nuclei. The expert labels 6 (never background); the weak set calls one of them background (it missed that
    # nucleus) and gets the other 5 right. Against the expert the averages run over the nucleus classes, so the miss
    # is a recall error of its true class; against the truth (which holds background) over every class that occurs.
    background = len(STORE_CLASSES) - 1
    ea = np.array([0, 0, 1, 1, 2, 2, -1, -1])
    weak = np.array([0, 0, 1, 1, 2, background, 0, background])
    truth = np.array([0, 0, 1, 1, 2, 2, 0, background])
    crops = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    store = write_nuclei_store(tmp_path / "s.h5", crops, {"ea": ea, "wsa": weak, "truth": truth}, np.zeros(8))
    table = label_agreement({"raw": [store]}, candidates=("wsa",), references=("ea", "truth")).set_index("reference")

    f1_muscle = 2 * 1.0 * 0.5 / 1.5  # class 2: precision 1/1, recall 1/2
    assert table.loc["ea", "nuclei"] == 6
    assert table.loc["ea", "f1_macro"] == pytest.approx((1.0 + 1.0 + f1_muscle) / 3)  # background left out
    assert table.loc["ea", "recall_weighted"] == pytest.approx(table.loc["ea", "accuracy"]) == pytest.approx(5 / 6)
    # Against the truth, background occurs (1 true, 2 predicted, 1 right): it is one of the four classes averaged.
    f1_background = 2 * 0.5 * 1.0 / 1.5
    assert table.loc["truth", "f1_macro"] == pytest.approx((1.0 + 1.0 + f1_muscle + f1_background) / 4)


def test_doctor_rows_of_tables_4_and_5_average_over_the_nucleus_classes() -> None:
    # A classifier calls one of 4 expert nuclei background and gets the rest right. The doctor row averages over the
    # nucleus classes (background is no class of the expert's); the test row, against labels that hold background,
    # averages over every class that occurs.
    background = len(STORE_CLASSES) - 1
    predictions = np.array([0, 1, 2, background, background])
    labels = {"ea": np.array([0, 1, 2, 2, -1]), "ssa": np.array([0, 1, 2, 2, background])}
    split = np.full(5, 2)
    table, confusions = evaluate_predictions(predictions, labels, split, STORE_CLASSES, "ssa")
    rows = table.set_index("evaluation")
    f1_muscle = 2 * 1.0 * 0.5 / 1.5
    assert rows.loc["doctor", "f1_macro"] == pytest.approx((1.0 + 1.0 + f1_muscle) / 3)
    assert rows.loc["doctor", "accuracy"] == pytest.approx(3 / 4)
    f1_background = 2 * 0.5 * 1.0 / 1.5  # 2 predicted, 1 of them right
    assert rows.loc["test", "f1_macro"] == pytest.approx((1.0 + 1.0 + f1_muscle + f1_background) / 4)
    assert confusions["doctor"][2, background] == 1  # the miss is still in the confusion matrix
