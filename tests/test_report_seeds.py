"""Mean ± 95% CI over training seeds: the shared aggregation, the tables built on it, and the selection by mean Dice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from cellkd.errors import StoreError
from cellkd.report.classification import write_table5
from cellkd.report.seeds import ci95_half_width, format_mean_ci, interval_note, mean_ci95
from cellkd.report.segmentation import select_architecture, selected_model_path, write_table2
from cellkd.report.tables import SeedTablePaths

T_975 = {2: 4.302652729911275, 1: 12.706204736174698}
"""Student t quantiles t(0.975, df) from a printed table, so the test does not recompute them the same way."""


def test_ci95_is_the_t_interval_half_width_of_known_values() -> None:
    # mean 0.9, sample sd 0.1 (ddof=1), n=3: half-width t(0.975, 2) * 0.1 / sqrt(3)
    assert ci95_half_width([0.8, 0.9, 1.0]) == pytest.approx(T_975[2] * 0.1 / math.sqrt(3), rel=1e-9)
    assert ci95_half_width([0.5, 0.7]) == pytest.approx(T_975[1] * math.sqrt(0.02) / math.sqrt(2), rel=1e-9)
    assert ci95_half_width([0.4, 0.4, 0.4]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(ci95_half_width([0.9]))  # one seed: no interval
    assert math.isnan(ci95_half_width([0.9, math.nan]))  # NaN scores do not count as seeds


def test_mean_ci95_groups_the_per_seed_rows_by_their_keys() -> None:
    per_seed = pd.DataFrame(
        {
            "stain": ["raw"] * 3 + ["macenko"],
            "seed": [0, 1, 2, 0],
            "dice": [0.8, 0.9, 1.0, 0.7],
            "patches": [12, 12, 12, 9],
        }
    )
    table = mean_ci95(per_seed, ["stain"], ["dice"], carry=["patches"])
    assert table.columns.tolist() == ["stain", "dice_mean", "dice_ci95", "patches", "seeds"]
    assert table["stain"].tolist() == ["raw", "macenko"]  # first-seen order
    raw, macenko = table.iloc[0], table.iloc[1]
    assert raw["dice_mean"] == pytest.approx(0.9)
    assert raw["dice_ci95"] == pytest.approx(T_975[2] * 0.1 / math.sqrt(3))
    assert (raw["patches"], raw["seeds"]) == (12, 3)
    assert macenko["dice_mean"] == pytest.approx(0.7) and math.isnan(macenko["dice_ci95"])
    assert macenko["seeds"] == 1


def test_markdown_text_says_mean_plus_minus_ci_or_n_1() -> None:
    assert format_mean_ci(0.8921, 0.0104) == "0.892 ± 0.010"
    assert format_mean_ci(0.8921, math.nan) == "0.892"
    assert interval_note([3, 3]) == "mean ± 95% CI, t-interval over 3 seeds"
    assert "n=1" in interval_note([1])


def write_pixel_metrics(path: Path, dice: float) -> Path:
    """A metrics.csv as evaluate_segmentation writes it (reference ssa only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"reference": "ssa", "accuracy": 0.9, "precision": 0.8, "recall": 0.7, "dice": dice, "iou": dice / 2}
    pd.DataFrame([{**row, "patches": 10}]).to_csv(path, index=False)
    return path


def test_table2_csv_carries_mean_and_ci_computed_from_its_per_seed_rows(tmp_path: Path) -> None:
    dice = {("raw", "unet", 0): 0.8, ("raw", "unet", 1): 0.9, ("raw", "unet", 2): 1.0, ("raw", "unetplusplus", 0): 0.6}
    metrics = {key: write_pixel_metrics(tmp_path / f"{'/'.join(map(str, key))}.csv", d) for key, d in dice.items()}
    paths = SeedTablePaths(tmp_path / "t2.csv", tmp_path / "t2_per_seed.csv", tmp_path / "t2.md")
    write_table2(metrics, paths)

    per_seed = pd.read_csv(paths.per_seed)
    assert per_seed[["arch", "seed", "dice"]].values.tolist() == [
        ["unet", 0, 0.8],
        ["unet", 1, 0.9],
        ["unet", 2, 1.0],
        ["unetplusplus", 0, 0.6],
    ]
    table = pd.read_csv(paths.csv).set_index("arch")
    # recomputed here from the per-seed file, not from the inputs
    unet = per_seed[per_seed["arch"] == "unet"]["dice"]
    assert table.loc["unet", "dice_mean"] == pytest.approx(unet.mean())
    assert table.loc["unet", "dice_ci95"] == pytest.approx(T_975[2] * unet.std(ddof=1) / math.sqrt(len(unet)))
    assert table.loc["unet", "seeds"] == 3 and table.loc["unet", "patches"] == 10
    assert math.isnan(table.loc["unetplusplus", "dice_ci95"]) and table.loc["unetplusplus", "seeds"] == 1
    assert table.loc["unet", "accuracy_ci95"] == pytest.approx(0.0)  # the same on every seed
    markdown = paths.md.read_text()
    assert "t-interval over 1/3 seeds" in markdown.splitlines()[0]
    assert "0.900 ± 0.248" in markdown
    assert "| 0.600 " in markdown and "0.6000" not in markdown  # one seed: the mean alone, as written


def test_table5_averages_every_score_column_but_keeps_the_test_set_size(tmp_path: Path) -> None:
    metrics = {}
    for seed, f1 in enumerate((0.6, 0.8)):
        path = tmp_path / f"seed{seed}.csv"
        row = {"evaluation": "test", "f1_macro": f1, "f1_other": f1, "nuclei": 40, "student_crops_per_s": 100 + seed}
        pd.DataFrame([row]).to_csv(path, index=False)
        metrics[("raw", "wsa", seed)] = path
    paths = SeedTablePaths(tmp_path / "t5.csv", tmp_path / "t5_per_seed.csv", tmp_path / "t5.md")
    table = write_table5(metrics, paths)
    assert table.columns.tolist() == [
        "stain",
        "labels",
        "evaluation",
        "f1_macro_mean",
        "f1_macro_ci95",
        "f1_other_mean",
        "f1_other_ci95",
        "student_crops_per_s_mean",
        "student_crops_per_s_ci95",
        "nuclei",
        "seeds",
    ]
    assert table.loc[0, "f1_macro_mean"] == pytest.approx(0.7)
    assert table.loc[0, "f1_macro_ci95"] == pytest.approx(T_975[1] * math.sqrt(0.02) / math.sqrt(2))
    assert (table.loc[0, "nuclei"], table.loc[0, "seeds"]) == (40, 2)


def test_selection_takes_the_best_mean_dice_over_seeds_and_the_first_seed_model(tmp_path: Path) -> None:
    # unet wins seed 0 but loses on the mean: the mean decides
    metrics = {
        "unet": {3: write_pixel_metrics(tmp_path / "u3.csv", 0.90), 5: write_pixel_metrics(tmp_path / "u5.csv", 0.60)},
        "unetplusplus": {
            3: write_pixel_metrics(tmp_path / "p3.csv", 0.85),
            5: write_pixel_metrics(tmp_path / "p5.csv", 0.80),
        },
    }
    selected = tmp_path / "raw/selected.json"
    assert select_architecture(metrics, "ssa", selected) == "unetplusplus"
    payload = json.loads(selected.read_text())
    assert payload["scores"] == pytest.approx({"unet": 0.75, "unetplusplus": 0.825})
    assert payload["seed"] == 3  # the first seed given, not the best one
    assert selected_model_path(selected) == str(tmp_path / "raw/unetplusplus/seed3/model.pt")


def test_a_selection_file_without_a_seed_names_the_rule_to_rerun(tmp_path: Path) -> None:
    selected = tmp_path / "selected.json"
    selected.write_text(json.dumps({"arch": "unet"}))
    with pytest.raises(StoreError, match=r"selected\.json: names no seed.*--forcerun select_segmentation"):
        selected_model_path(selected)
