"""Nucleus classes: the names the package uses and how QuPath spells and colours them.

Class index ``i`` is the position in the configured tuple (mask channel ``i``); index
``len(classes)`` is background, which is not a ``ClassSpec``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cellkd.errors import ConfigError


@dataclass(frozen=True)
class ClassSpec:
    """One nucleus class.

    ``name`` is the package-internal name (config, HDF5 attrs); ``qupath_name`` is written to
    GeoJSON ``classification.name``; ``aliases`` are further QuPath names accepted on reading.
    ``color`` is the QuPath display colour, RGB 0-255.
    """

    name: str
    qupath_name: str
    color: tuple[int, int, int]
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError(f"ClassSpec.name must be a non-empty string, got {self.name!r}")
        if not self.qupath_name or not self.qupath_name.strip():
            raise ValueError(f"ClassSpec {self.name!r}: qupath_name must be a non-empty string")
        if len(self.color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.color):
            raise ValueError(f"ClassSpec {self.name!r}: color must be three ints in 0..255, got {self.color!r}")
        # Normalise lists from YAML/JSON into tuples so the spec stays hashable.
        object.__setattr__(self, "color", tuple(self.color))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def qupath_names(self) -> tuple[str, ...]:
        """Every QuPath name that maps to this class: ``qupath_name`` first, then ``aliases``."""
        return (self.qupath_name, *self.aliases)


DEFAULT_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("other", "Other", (0, 160, 0)),
    ClassSpec("immune", "Immune cells", (160, 90, 160)),
    ClassSpec("muscle", "Muscle", (200, 0, 0)),
)
"""other, immune, muscle (indices 0, 1, 2): the classes of the default workflow_config.yaml (demo and tests)."""
RESERVED_NAMES: tuple[str, ...] = ("macro", "weighted")
"""Names no class may take: the tables' per-class F1 column ``f1_<class>`` would collide with ``f1_macro``."""


def classes_from_config(
    entries: Sequence[Mapping[str, Any]], source: str = "workflow_config.yaml"
) -> tuple[ClassSpec, ...]:
    """Build the class tuple from the config's ``classes:`` list.

    Each entry is a mapping with ``name``, ``qupath_name``, ``color`` ([r, g, b]) and optional ``aliases``.
    Names must be unique, and so must QuPath names and aliases ignoring case (the GeoJSON reader matches
    them case-insensitively). Raises ``ConfigError`` naming ``source`` and the bad entry.
    """
    if not entries:
        raise ConfigError(f"{source}: classes: is empty; list at least one nucleus class")
    specs = []
    for position, entry in enumerate(entries):
        try:
            specs.append(
                ClassSpec(
                    name=str(entry["name"]),
                    qupath_name=str(entry["qupath_name"]),
                    color=tuple(entry["color"]),
                    aliases=tuple(str(a) for a in entry.get("aliases", ())),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            msg = (
                f"{source}: classes[{position}] = {dict(entry)!r} is invalid ({err}); "
                "expected keys name, qupath_name, color [r, g, b] and optional aliases"
            )
            raise ConfigError(msg) from err
    names = [s.name for s in specs]
    reserved = sorted(set(names) & set(RESERVED_NAMES))
    if reserved:
        msg = (
            f"{source}: classes[].name {reserved} is reserved: the tables name per-class F1 f1_<class> next to "
            "f1_macro and f1_weighted; rename the class"
        )
        raise ConfigError(msg)
    qupath_names = [n.casefold() for s in specs for n in s.qupath_names]
    for label, values in (("name", names), ("qupath_name/aliases", qupath_names)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"{source}: classes[].{label} must be unique; repeated: {repeated}")
    return tuple(specs)
