"""Validation shared by the settings dataclasses (tissue, stain, patches, nuclei, trainers, demo generator).

Torch-free on purpose: the light stages import it without pulling in torch. A dataclass lists its
checks as ``(ok, name, allowed)`` in ``__post_init__`` and calls :func:`check_parameters`, so every
settings error reads the same: "<what> parameter <name>=<value> must be <allowed><where>".
:func:`is_int` and :func:`is_split_fractions` are the value tests several of them share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from cellkd.errors import ConfigError

ParamsT = TypeVar("ParamsT")

SPLIT_FRACTIONS = "three fractions >= 0 (train, val, test) summing to 1"
"""What :func:`is_split_fractions` accepts, worded for an error message."""


def is_int(value: object) -> bool:
    """An integer, and not a bool (YAML's ``true`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_split_fractions(fractions: Sequence[float]) -> bool:
    """Three finite fractions >= 0 (train, val, test) summing to 1 (within ``math.isclose``)."""
    return (
        len(fractions) == 3
        and all(math.isfinite(v) and v >= 0 for v in fractions)
        and math.isclose(sum(fractions), 1.0)
    )


def check_parameters(
    params: object,
    checks: Iterable[tuple[bool, str, str]],
    what: str,
    where: str = "",
    *,
    error: type[Exception] = ConfigError,
) -> None:
    """Raise ``error`` for the first failed ``(ok, name, allowed)`` check, naming the value and the rule.

    where: appended to the message, e.g. " (see nuclei: in workflow_config.yaml)". error: ``ConfigError``
    for workflow settings; library-level settings (the demo generator) raise ``ValueError``.
    """
    for ok, name, allowed in checks:
        if not ok:
            raise error(f"{what} parameter {name}={getattr(params, name)!r} must be {allowed}{where}")


def params_from_dict(cls: type[ParamsT], values: Mapping[str, Any], what: str) -> ParamsT:
    """Build the parameter dataclass ``cls`` from a config mapping; unknown keys raise ``ConfigError`` naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} parameter(s) {unknown}; expected some of {sorted(known)}")
    return cls(**values)
