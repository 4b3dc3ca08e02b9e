"""Nucleus class specs: defaults, QuPath name lookup, building from the config's classes: list."""

from __future__ import annotations

import pytest

from cellkd.classes import DEFAULT_CLASSES, ClassSpec, classes_from_config, qupath_name_lookup
from cellkd.errors import ConfigError

CONFIG_CLASSES = [
    {"name": "other", "qupath_name": "Other", "color": [0, 160, 0]},
    {"name": "immune", "qupath_name": "Immune cells", "color": [160, 90, 160], "aliases": ["Lymphocytes"]},
    {"name": "muscle", "qupath_name": "Muscle", "color": [200, 0, 0]},
]
"""The classes: list of the default workflow_config.yaml, plus one alias."""


def test_default_classes_are_other_immune_muscle_in_that_order() -> None:
    assert [c.name for c in DEFAULT_CLASSES] == ["other", "immune", "muscle"]
    assert [c.qupath_name for c in DEFAULT_CLASSES] == ["Other", "Immune cells", "Muscle"]


def test_lookup_maps_names_and_aliases_to_indices() -> None:
    lookup = qupath_name_lookup(classes_from_config(CONFIG_CLASSES))
    assert lookup["Other"] == 0
    assert lookup["Immune cells"] == lookup["Lymphocytes"] == 1
    assert lookup["Muscle"] == 2


def test_lookup_rejects_a_name_shared_by_two_classes() -> None:
    clash = (ClassSpec("a", "A", (0, 0, 0)), ClassSpec("b", "B", (0, 0, 0), aliases=("A",)))
    with pytest.raises(ValueError, match="'A' is used by classes 'a' and 'b'"):
        qupath_name_lookup(clash)


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
        ([CONFIG_CLASSES[0], {**CONFIG_CLASSES[1], "qupath_name": "Other"}], "'Other' is used by classes"),
    ],
)
def test_from_config_names_the_bad_entry(entries: list[dict], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        classes_from_config(entries, source="config.yaml")
