"""Presets and load-time checks of the workflow config: paper defaults, the demo preset, what a sheet can feed."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_one_slide_sheet

from cellkd.config import (
    Phases,
    apply_preset,
    demo_sheet,
    gpu_jobs,
    has_key,
    leaf_keys,
    load_sheet,
    plan_phases,
    validate_config,
)
from cellkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "config.schema.yaml"
SHEET_SCHEMA = REPO / "schemas" / "sheet.schema.yaml"
PRESETS = REPO / "config"


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def schema_default(dotted: str) -> Any:
    node = yaml.safe_load(SCHEMA.read_text())
    for part in dotted.split("."):
        node = node["properties"][part]
    return node["default"]


def effective(overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config a run gets from the shipped workflow_config.yaml and ``overrides``, as rules/common.smk builds it."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config.update(overrides)
    note = apply_preset(config, PRESETS)
    validate_config(config, SCHEMA, source="test")
    return config, note


def test_paper_preset_is_the_schema_defaults() -> None:
    paper = yaml.safe_load((PRESETS / "paper.yaml").read_text())
    for key in leaf_keys(paper):
        assert lookup(paper, key) == schema_default(key), key
    assert paper["segmentation"]["encoder"] == "resnet34"
    assert paper["patches"]["size"] == 512
    assert paper["teacher"]["archs"] == ["resnet18"]
    assert min(paper["finetune"]["lrs"]) == 5e-5 and max(paper["finetune"]["lrs"]) == 1e-3
    assert min(paper["finetune"]["dropouts"]) == 0.0 and max(paper["finetune"]["dropouts"]) == 0.5


def test_every_demo_setting_has_a_different_paper_value_and_is_not_in_workflow_config() -> None:
    demo = yaml.safe_load((PRESETS / "demo.yaml").read_text())
    paper = yaml.safe_load((PRESETS / "paper.yaml").read_text())
    shipped = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    for key in leaf_keys(demo):
        assert has_key(paper, key), f"{key} is in config/demo.yaml but not in config/paper.yaml"
        assert lookup(demo, key) != lookup(paper, key), key
        # a key in workflow_config.yaml would count as the user's and override both presets
        assert not has_key(shipped, key), f"{key} is set in workflow_config.yaml"


def test_real_sheet_gets_the_paper_training_settings(tmp_path: Path) -> None:
    sheet = write_one_slide_sheet(tmp_path, ("ssa", "wsa", "ea"))
    config, note = effective({"sheet": str(sheet)})
    assert note.startswith("cellkd preset: paper")
    assert "overrides" not in note
    slides = load_sheet(sheet, SHEET_SCHEMA)
    assert plan_phases(config, {}, slides) == Phases(finetune=True, notes=())
    paper = yaml.safe_load((PRESETS / "paper.yaml").read_text())
    for key in leaf_keys(paper):
        if key != "sheet":
            assert lookup(config, key) == lookup(paper, key), key


def test_empty_sheet_gets_the_demo_settings_and_user_keys_win() -> None:
    config, note = effective({})
    assert note.startswith("cellkd preset: demo")
    demo = yaml.safe_load((PRESETS / "demo.yaml").read_text())
    for key in leaf_keys(demo):
        assert lookup(config, key) == lookup(demo, key), key
    config, note = effective({"segmentation": {"encoder": "resnet34"}, "finetune": {"lrs": [1e-4]}})
    assert config["segmentation"]["encoder"] == "resnet34" and config["finetune"]["lrs"] == [1e-4]
    assert config["segmentation"]["epochs"] == demo["segmentation"]["epochs"]  # the rest of the preset stays
    assert "the config overrides segmentation.encoder, finetune.lrs" in note


def test_real_sheet_notes_the_keys_the_user_overrides(tmp_path: Path) -> None:
    config, note = effective({"sheet": str(write_one_slide_sheet(tmp_path, ("ssa",))), "teacher": {"archs": ["vgg4"]}})
    assert config["teacher"]["archs"] == ["vgg4"] and config["teacher"]["epochs"] == 30
    assert note.endswith("the config overrides teacher.archs")


def plan(tmp_path: Path, sets: tuple[str, ...], given: dict[str, Any] | None = None) -> tuple[dict, Phases]:
    sheet = write_one_slide_sheet(tmp_path, sets)
    config, _ = effective({"sheet": str(sheet), **copy.deepcopy(given or {})})
    return config, plan_phases(config, given or {}, load_sheet(sheet, SHEET_SCHEMA))


def test_sheet_without_ssa_moves_every_linked_key_to_wsa(tmp_path: Path) -> None:
    config, phases = plan(tmp_path, ("wsa", "ea"))
    assert config["segmentation"]["mask_set"] == "wsa"
    assert config["teacher"]["labels"] == ["wsa"]
    assert config["student"]["validate_against"] == "wsa"
    assert config["predict"]["labels"] == "wsa"
    assert phases.finetune
    assert phases.notes == (
        "no slide of the sheet has ssa annotations: segmentation.mask_set=wsa, teacher.labels=['wsa'], "
        "student.validate_against=wsa",
    )


def test_sheet_without_wsa_predicts_with_the_ssa_student(tmp_path: Path) -> None:
    config, phases = plan(tmp_path, ("ssa", "ea"))
    assert config["teacher"]["labels"] == ["ssa"] and config["predict"]["labels"] == "ssa"
    assert config["segmentation"]["mask_set"] == "ssa"
    assert "no slide of the sheet has wsa annotations" in phases.notes[0]


def test_linked_keys_the_user_set_to_a_missing_set_are_listed_in_one_error(tmp_path: Path) -> None:
    given = {"segmentation": {"mask_set": "ssa"}, "student": {"validate_against": "ssa"}}
    with pytest.raises(ConfigError) as error:
        plan(tmp_path, ("wsa",), given)
    message = str(error.value)
    assert "segmentation.mask_set: ssa" in message and "student.validate_against: ssa" in message
    assert "teacher.labels" not in message  # left at its default: it follows the sheet


def test_sheet_without_ea_skips_phase_four(tmp_path: Path) -> None:
    _, phases = plan(tmp_path, ("ssa", "wsa"))
    assert not phases.finetune
    assert phases.notes == (
        "no slide has an ea (expert) annotation: Phase IV (fine-tuning) and Table 6 are skipped, "
        "and predict uses the plain distilled student",
    )


def test_sheet_without_ssa_and_wsa_says_what_each_phase_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        plan(tmp_path, ("ea",))
    message = str(error.value)
    for phase in ("Phase I (segmentation)", "Phase II (teachers) and III (student)", "Phase IV (fine-tuning)"):
        assert phase in message
    assert "public_datasets (configured: none)" in message


def test_demo_sheet_feeds_every_phase() -> None:
    config, _ = effective({})
    assert plan_phases(config, {}, demo_sheet(2)) == Phases(finetune=True, notes=())


def test_gpu_jobs_request_no_gpu_on_cpu() -> None:
    import torch

    assert gpu_jobs("cpu") == 0
    assert gpu_jobs("cuda:1") == 1
    assert gpu_jobs("auto") == int(torch.cuda.is_available())


def test_the_paper_preset_as_configfile_of_a_real_sheet_overrides_nothing(tmp_path: Path) -> None:
    paper = yaml.safe_load((PRESETS / "paper.yaml").read_text())
    _, note = effective({**paper, "sheet": str(write_one_slide_sheet(tmp_path, ("ssa",)))})
    assert note.startswith("cellkd preset: paper") and "overrides" not in note


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ([], "seeds: [] should be non-empty"),
        ([0, 0], "seeds: [0, 0] has non-unique elements"),
        ([1.5], "seeds.0: 1.5 is not of type 'integer'"),
        ([-1], "seeds.0: -1 is less than the minimum of 0"),
    ],
)
def test_seeds_must_be_unique_non_negative_integers(seeds: list, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        effective({"seeds": seeds})


def test_both_presets_train_three_seeds_and_one_is_allowed() -> None:
    assert effective({})[0]["seeds"] == [0, 1, 2]  # the demo (empty sheet)
    assert schema_default("seeds") == [0, 1, 2]  # the paper preset is the schema defaults
    assert effective({"seeds": [7]})[0]["seeds"] == [7]
