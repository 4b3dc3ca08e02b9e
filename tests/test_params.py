"""The shared settings checks: first failed check named with its value, error type, unknown keys, helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from cellkd.errors import ConfigError
from cellkd.params import check_parameters, is_int, is_split_fractions, params_from_dict


@dataclass(frozen=True)
class Knobs:
    size: int = 8
    rate: float = 0.5


def test_check_parameters_names_the_first_failed_check_with_its_value_and_where() -> None:
    knobs = Knobs(size=2, rate=2.0)
    checks = [(True, "size", ">= 1"), (knobs.rate < 1, "rate", "in [0, 1)"), (knobs.size >= 4, "size", ">= 4")]
    with pytest.raises(ConfigError, match=r"^knob parameter rate=2\.0 must be in \[0, 1\) \(see knobs:\)$"):
        check_parameters(knobs, checks, "knob", " (see knobs:)")
    check_parameters(knobs, [(True, "size", ">= 1")], "knob")  # all passed: no error


def test_check_parameters_raises_the_requested_error_type() -> None:
    with pytest.raises(ValueError, match="knob parameter size=8 must be odd") as info:
        check_parameters(Knobs(), [(False, "size", "odd")], "knob", error=ValueError)
    assert not isinstance(info.value, ConfigError)


def test_params_from_dict_builds_the_dataclass_and_names_unknown_keys() -> None:
    assert params_from_dict(Knobs, {"size": 3}, "knob") == Knobs(size=3)
    with pytest.raises(ConfigError, match=r"unknown knob parameter\(s\) \['colour', 'sise'\]; expected some of"):
        params_from_dict(Knobs, {"sise": 3, "colour": 1}, "knob")


def test_is_int_rejects_bools_and_floats() -> None:
    assert is_int(3) and is_int(0)
    assert not is_int(True) and not is_int(3.0) and not is_int("3")


@pytest.mark.parametrize(
    ("fractions", "ok"),
    [
        ((0.7, 0.15, 0.15), True),
        ((1.0, 0.0, 0.0), True),
        ((0.7, 0.3), False),
        ((0.7, 0.2, 0.2), False),
        ((1.2, -0.1, -0.1), False),
        ((math.nan, 0.5, 0.5), False),
    ],
)
def test_is_split_fractions(fractions: tuple[float, ...], ok: bool) -> None:
    assert is_split_fractions(fractions) is ok
