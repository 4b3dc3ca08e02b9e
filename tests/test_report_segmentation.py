"""Figure 4's table: every architecture's agreement with QuPath, and the annotation-only rows once per stain."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cellkd.report.segmentation import ANNOTATIONS_ONLY, write_qupath_comparison


def comparison_rows(model_vs_ssa: float, model_vs_truth: float, ssa_vs_truth: float) -> pd.DataFrame:
    """The rows compare_segmentations returns for one slide (only dice and iou matter here)."""
    dice = [model_vs_ssa, model_vs_truth, ssa_vs_truth]
    return pd.DataFrame(
        {"comparison": ["model vs ssa", "model vs truth", "ssa vs truth"], "dice": dice, "iou": [d / 2 for d in dice]}
    )


def test_figure4_has_one_row_per_stain_arch_comparison_and_the_annotation_rows_once(tmp_path: Path) -> None:
    comparisons = {
        ("raw", "unet", "a"): comparison_rows(0.80, 0.90, 0.70),
        ("raw", "unet", "b"): comparison_rows(0.60, 0.70, 0.50),
        ("raw", "unetplusplus", "a"): comparison_rows(0.85, 0.95, 0.70),
        ("raw", "unetplusplus", "b"): comparison_rows(0.65, 0.75, 0.50),
        ("macenko", "unet", "a"): comparison_rows(0.70, 0.80, 0.70),
        ("macenko", "unetplusplus", "a"): comparison_rows(0.75, 0.85, 0.70),
    }
    csv, md, png = tmp_path / "figure4.csv", tmp_path / "figure4.md", tmp_path / "figure4.png"
    table = write_qupath_comparison(comparisons, csv, md, png)
    keys = list(table[["stain", "arch", "comparison"]].itertuples(index=False, name=None))
    assert keys == [
        ("raw", "unet", "model vs ssa"),
        ("raw", "unet", "model vs truth"),
        ("raw", "unetplusplus", "model vs ssa"),
        ("raw", "unetplusplus", "model vs truth"),
        ("macenko", "unet", "model vs ssa"),
        ("macenko", "unet", "model vs truth"),
        ("macenko", "unetplusplus", "model vs ssa"),
        ("macenko", "unetplusplus", "model vs truth"),
        ("raw", ANNOTATIONS_ONLY, "ssa vs truth"),
        ("macenko", ANNOTATIONS_ONLY, "ssa vs truth"),
    ]
    indexed = table.set_index(["stain", "arch", "comparison"])
    assert indexed.loc[("raw", "unetplusplus", "model vs ssa"), "dice"] == pytest.approx(0.75)  # mean of 2 slides
    assert indexed.loc[("raw", ANNOTATIONS_ONLY, "ssa vs truth"), "dice"] == pytest.approx(0.60)  # not 4 rows
    assert indexed.loc[("raw", ANNOTATIONS_ONLY, "ssa vs truth"), "slides"] == 2
    assert indexed.loc[("macenko", "unet", "model vs truth"), "iou"] == pytest.approx(0.40)
    assert (table.loc[table["stain"] == "raw", "slides"] == 2).all()
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    assert md.read_text().startswith("# Figure 4: each segmentation architecture")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
