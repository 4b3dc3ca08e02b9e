"""Load and check the workflow config and the slide sheet, with messages that name the bad value.

Snakemake's ``validate`` fills in the schema defaults; before it, every schema violation is
reported as one short line (``demo.slides: 'x' is not of type 'integer'``) instead of a dump of
the whole schema.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml
from snakemake.utils import validate as snakemake_validate

from cellkd.classes import classes_from_config
from cellkd.errors import ConfigError

ANNOTATION_SETS: tuple[str, ...] = ("ssa", "wsa", "ea", "truth")
"""Annotation sets a slide may carry: strong / weak synthetic, expert, and (synthetic only) truth."""

DEMO_SLIDE_DIR = "results/demo/slides"


def _schema_errors(instance: Any, schema_path: str | os.PathLike[str]) -> list[str]:
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    lines = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in error.path) or "(top level)"
        lines.append(f"{where}: {error.message}")
    return lines


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike[str], source: str) -> None:
    """Check ``config`` against the schema, fill its defaults in place, then check cross-field rules.

    Raises ``ConfigError`` naming ``source`` (the config file) and every bad key.
    """
    problems = _schema_errors(config, schema_path)
    if problems:
        listed = "\n  ".join(problems)
        msg = f"{source}: invalid config (keys and types are documented in {schema_path}):\n  {listed}"
        raise ConfigError(msg)
    snakemake_validate(config, str(schema_path), set_default=True)

    classes_from_config(config["classes"], source)  # unique names, and QuPath names/aliases ignoring case
    for section in ("patches", "nuclei"):
        split = config[section]["split"]
        if not math.isclose(sum(split), 1.0, abs_tol=1e-6):
            raise ConfigError(f"{source}: {section}.split {split} must sum to 1 (train, validation, test fractions)")
    dataset_names = [d["name"] for d in config["public_datasets"]]
    if len(set(dataset_names)) != len(dataset_names):
        raise ConfigError(f"{source}: public_datasets names must be unique; got {dataset_names}")
    for dataset in config["public_datasets"]:
        if not Path(dataset["path"]).is_dir():
            msg = f"{source}: public dataset {dataset['name']!r}: folder {dataset['path']} does not exist"
            raise ConfigError(msg)
    low, high = config["demo"]["fragments"]
    if low > high:
        raise ConfigError(f"{source}: demo.fragments [{low}, {high}] must be [minimum, maximum]")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of the sheet, with absolute paths; ``annotations`` maps set name -> GeoJSON path."""

    slide: str
    path: str
    annotations: Mapping[str, str]
    mpp: float | None


def demo_sheet(n_slides: int) -> dict[str, SlideEntry]:
    """The synthetic demo's slides, whose files the ``generate_demo_slide`` rule writes."""
    entries = {}
    for i in range(n_slides):
        slide = f"demo{i}"
        annotations = {s: f"{DEMO_SLIDE_DIR}/{slide}.{s}.geojson" for s in ANNOTATION_SETS}
        entries[slide] = SlideEntry(slide, f"{DEMO_SLIDE_DIR}/{slide}.tiff", annotations, None)
    return entries


def load_sheet(sheet_path: str | os.PathLike[str], schema_path: str | os.PathLike[str]) -> dict[str, SlideEntry]:
    """Read and check the slide sheet (TSV). Relative paths are resolved against the sheet's folder.

    Raises ``ConfigError`` for a missing sheet, schema violations, duplicate slide ids, missing files
    and unparsable mpp, each naming the sheet, the row and the fix.
    """
    sheet_path = Path(sheet_path)
    if not sheet_path.is_file():
        raise ConfigError(f"{sheet_path}: slide sheet not found; set sheet: in workflow_config.yaml to a TSV file")
    table = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    # A row with fewer fields than the header (trailing empty cells dropped by an editor) reads as NaN.
    table = table.fillna("")
    table.columns = [c.strip() for c in table.columns]
    if table.empty:
        raise ConfigError(f"{sheet_path}: the slide sheet lists no slides")
    rows = table.to_dict("records")
    for row_number, row in enumerate(rows, start=2):  # line 1 is the header
        problems = _schema_errors(row, schema_path)
        if problems:
            raise ConfigError(f"{sheet_path}, line {row_number}: {'; '.join(problems)} (see {schema_path})")
    duplicates = sorted(set(table["slide"][table["slide"].duplicated()]))
    if duplicates:
        raise ConfigError(f"{sheet_path}: duplicate slide ids {duplicates}; every slide needs its own id")

    base = sheet_path.resolve().parent
    entries = {}
    for row_number, row in enumerate(rows, start=2):

        def resolve(value: str, column: str, row_number: int = row_number) -> str:
            resolved = (base / value).resolve()
            if not resolved.exists():
                msg = (
                    f"{sheet_path}, line {row_number}, column {column}: {value} does not exist "
                    f"(looked for {resolved}; relative paths are resolved against the sheet's folder)"
                )
                raise ConfigError(msg)
            return str(resolved)

        annotations = {s: resolve(row[s], s) for s in ANNOTATION_SETS if row.get(s, "").strip()}
        mpp_text = str(row.get("mpp", "")).strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise ConfigError(f"{sheet_path}, line {row_number}: mpp {mpp_text!r} is not a number") from None
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"{sheet_path}, line {row_number}: mpp {mpp} must be positive (microns per pixel)")
        entries[row["slide"]] = SlideEntry(row["slide"], resolve(row["path"], "path"), annotations, mpp)
    return entries
