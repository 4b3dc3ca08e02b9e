"""Nucleus class specs: the defaults, and building them from the config's classes: list."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellkd.classes import DEFAULT_CLASSES, ClassSpec, classes_from_config
from cellkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

CONFIG_CLASSES = [
    {"name": "other", "qupath_name": "Other", "color": [0, 160, 0]},
    {"name": "immune", "qupath_name": "Immune cells", "color": [160, 90, 160], "aliases": ["Lymphocytes"]},
    {"name": "muscle", "qupath_name": "Muscle", "color": [200, 0, 0]},
]
"""The classes: list of the default workflow_config.yaml, plus one alias."""


def test_default_classes_are_what_the_default_config_builds() -> None:
    # DEFAULT_CLASSES stands in for the configured classes in the demo generator and the tests: it must not drift.
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text(encoding="utf-8"))
    assert classes_from_config(config["classes"]) == DEFAULT_CLASSES


def test_from_config_turns_lists_into_hashable_tuples() -> None:
    specs = classes_from_config(CONFIG_CLASSES)
    assert specs[1] == ClassSpec("immune", "Immune cells", (160, 90, 160), aliases=("Lymphocytes",))
    assert len(set(specs)) == 3


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "classes: is empty"),
        ([{"name": "x", "color": [0, 0, 0]}], r"classes\[0\].*qupath_name"),
        ([{"name": "x", "qupath_name": "X", "color": [0, 0, 300]}], r"classes\[0\].*color must be three ints"),
        ([{"name": "", "qupath_name": "X", "color": [0, 0, 0]}], r"classes\[0\].*non-empty"),
        ([CONFIG_CLASSES[0], {**CONFIG_CLASSES[1], "name": "other"}], "name must be unique; repeated: \\['other'\\]"),
        (
            [CONFIG_CLASSES[0], {**CONFIG_CLASSES[1], "qupath_name": "Other"}],
            r"qupath_name/aliases must be unique.*'other'",
        ),
        (
            [CONFIG_CLASSES[0], {**CONFIG_CLASSES[1], "aliases": ["OTHER"]}],
            r"qupath_name/aliases must be unique.*'other'",
        ),
        (
            [CONFIG_CLASSES[0], {**CONFIG_CLASSES[1], "name": "weighted"}],
            r"classes\[\]\.name \['weighted'\] is reserved.*f1_weighted; rename the class",
        ),
    ],
)
def test_from_config_names_the_bad_entry(entries: list[dict], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        classes_from_config(entries, source="config.yaml")
