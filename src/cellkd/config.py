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
from cellkd.types import PathLike

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


# --- presets --------------------------------------------------------------------------------------

PAPER_PRESET = "paper.yaml"
"""The paper's settings: equal to the schema defaults, listed for users to start from (``config/paper.yaml``)."""
DEMO_PRESET = "demo.yaml"
"""Demo-scale settings (``config/demo.yaml``), applied under the user's config when ``sheet`` is empty."""


def merge_under(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``overrides`` (mappings merge key by key; any other value replaces)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_under(merged[key], value)
        else:
            merged[key] = value
    return merged


def leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the non-mapping values of ``tree`` (``segmentation.inference.tile``)."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys += leaf_keys(value, f"{path}.") if isinstance(value, Mapping) and value else [path]
    return keys


_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    """Whether the dotted key is set in ``tree`` (before the schema fills its defaults)."""
    return _lookup(tree, dotted) is not _MISSING


def _overridden(config: Mapping[str, Any], preset: Mapping[str, Any]) -> str:
    """``"; the config overrides a.b, c"``: the preset's keys that ``config`` sets to another value ('' if none)."""
    keys = [k for k in leaf_keys(preset) if k != "sheet" and _lookup(config, k) not in (_MISSING, _lookup(preset, k))]
    return f"; the config overrides {', '.join(keys)}" if keys else ""


def apply_preset(config: dict[str, Any], preset_dir: PathLike) -> str:
    """Merge the demo preset under ``config`` (in place) when ``sheet`` is empty; return a log line naming the preset.

    Call before ``validate_config``: keys the user set (workflow_config.yaml, ``--configfile``,
    ``--config``) always win, the preset fills only the keys left out, and the schema's (paper)
    defaults fill the rest. A real sheet gets no preset: the schema defaults are the paper's.
    """
    preset_dir = Path(preset_dir)
    paper = preset_dir / PAPER_PRESET
    if config.get("sheet"):
        note = _overridden(config, yaml.safe_load(paper.read_text()))
        return f"cellkd preset: paper (the schema defaults, see {paper}){note}"
    demo = preset_dir / DEMO_PRESET
    preset = yaml.safe_load(demo.read_text())
    note = _overridden(config, preset)
    merged = merge_under(preset, config)
    config.clear()
    config.update(merged)
    return f"cellkd preset: demo (sheet is empty: demo-scale settings from {demo}){note}"


# --- what the sheet can feed ----------------------------------------------------------------------

WEAK_SETS: tuple[str, ...] = ("ssa", "wsa")
"""Annotation sets a teacher can learn from."""


@dataclass(frozen=True)
class Phases:
    """What the slide sheet can feed, worked out at load time (see :func:`plan_phases`)."""

    finetune: bool
    """Phase IV (fine-tuning on expert labels, Table 6): some slide has an ``ea`` annotation."""
    notes: tuple[str, ...]
    """Log lines saying what was skipped or defaulted, and why."""


def _linked_keys(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Config keys that name annotation sets -> the sets they name."""
    return {
        "segmentation.mask_set": [config["segmentation"]["mask_set"]],
        "teacher.labels": list(config["teacher"]["labels"]),
        "student.validate_against": [config["student"]["validate_against"]],
        "predict.labels": [config["predict"]["labels"]],
    }


def plan_phases(config: dict[str, Any], given: Mapping[str, Any], slides: Mapping[str, SlideEntry]) -> Phases:
    """Check that the sheet can feed the configured phases; default the linked keys the user did not set (in place).

    ``config``: validated (defaults filled); ``given``: the config as the user wrote it, before the
    defaults, to tell keys the user chose from defaults. A sheet without ``ssa`` (or ``wsa``) moves
    every linked key left at its default to the other set; linked keys the user set to a set no slide
    has stop the run, listed in one ``ConfigError``. Without ``ssa`` and ``wsa`` nothing can train:
    the error says what each phase needs. Without ``ea`` Phase IV is skipped (``Phases.finetune``).
    """
    present = {s for entry in slides.values() for s in entry.annotations}
    weak = [s for s in WEAK_SETS if s in present]
    if not weak:
        datasets = [d["name"] for d in config["public_datasets"]]
        msg = (
            f"no slide of the sheet {config['sheet'] or '(demo)'} has an ssa or wsa annotation, so nothing can train. "
            "What each phase needs:\n"
            "  Phase I (segmentation): nucleus outlines, from an ssa or wsa column (segmentation.mask_set) "
            f"or public_datasets (configured: {datasets or 'none'});\n"
            "  Phase II (teachers) and III (student): nucleus classes from an ssa or wsa column (teacher.labels);\n"
            "  Phase IV (fine-tuning): expert labels in an ea column (optional).\n"
            "Add ssa and/or wsa GeoJSON paths to the sheet (see schemas/sheet.schema.yaml)"
        )
        raise ConfigError(msg)

    notes = []
    defaults = {
        "segmentation.mask_set": weak[0],
        "teacher.labels": weak,
        "student.validate_against": weak[0],
        "predict.labels": "wsa" if "wsa" in weak else "ssa",
    }
    moved = []
    for key, value in defaults.items():
        section, name = key.split(".")
        if not has_key(given, key) and config[section][name] != value:
            config[section][name] = value
            moved.append(f"{key}={value}")
    if moved:
        missing = " or ".join(s for s in WEAK_SETS if s not in weak)
        notes.append(f"no slide of the sheet has {missing} annotations: {', '.join(moved)}")

    datasets = bool(config["public_datasets"])
    problems = []
    for key, sets in _linked_keys(config).items():
        absent = [s for s in sets if s not in present]
        if key == "segmentation.mask_set" and datasets:
            continue  # the public datasets alone can train the segmentation (an existing, checked setup)
        if absent:
            problems.append(f"{key}: {', '.join(absent)} (the sheet has {', '.join(sorted(present))})")
    if problems:
        listed = "\n  ".join(problems)
        msg = (
            f"{config['sheet']}: these config keys name annotation sets that no slide of the sheet has:\n  {listed}\n"
            "Remove them from your config to use the defaults, or add those columns to the sheet"
        )
        raise ConfigError(msg)

    finetune = "ea" in present
    if not finetune:
        notes.append(
            "no slide has an ea (expert) annotation: Phase IV (fine-tuning) and Table 6 are skipped, "
            "and predict uses the plain distilled student"
        )
    return Phases(finetune=finetune, notes=tuple(notes))


def gpu_jobs(device: str) -> int:
    """The ``gpu`` resource a training or inference job requests: 0 on CPU, so CPU runs are not serialized."""
    if device == "cpu":
        return 0
    if device == "auto":
        import torch  # only here: the other Snakemake startup paths should not pay for importing torch

        return int(torch.cuda.is_available())
    return 1
