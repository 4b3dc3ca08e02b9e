"""Model bundles: a trained segmentation model and nucleus classifier that predict without the training run.

``snakemake export_model`` writes ``results/models/{name}/``; ``snakemake predict --config
predict_model=results/models/{name}`` (with a ``predict_sheet``) classifies new slides with it. Bundles
are shared between labs, so reading one never unpickles anything: weights are safetensors files (a
plain header and raw tensor bytes), every other fact is JSON, and each weights file is checked against
the SHA-256 that ``model.json`` records before it is read.

Layout of a bundle folder::

    model.json                  manifest (below), written last: a folder without it is not a bundle
    MODEL_CARD.md               the same facts for people (generated from model.json)
    segmentation.safetensors    state dict of the segmentation model
    classifier.safetensors      state dict of the nucleus classifier (fine-tuned student, or plain student)
    stain_reference.json        Macenko target of the training slides (only when the models saw macenko images)

``model.json`` (``format`` ``"cellkd.bundle"``, ``format_version`` :data:`BUNDLE_FORMAT_VERSION`)
    name, cellkd_version, created (UTC, ISO 8601);
    classes: [{name, qupath_name, color, aliases}], background is the extra last class;
    resolution: {mpp, assumed_mpp, slides: {slide: mpp}, note}: the working µm/px of the training fragment
    stores (median; assumed_mpp: the mpp_fallback of slides that record none); the models work at that
    resolution, and ``bundle_config`` sets the config's ``mpp`` to it so new slides are resampled alike;
    stain: {normalization: raw|macenko, macenko: {io, alpha, beta, max_samples} | null,
    reference: stain_reference.json | null};
    sizes: {patch, crop, multiscale, tile, overlap, level};
    segmentation: {weights, sha256, arch, encoder, encoder_depth, decoder_channels, dropout, mask_set,
    threshold, epoch, val_loss};
    nuclei: the instance settings used to extract nuclei (min_area, split_touching, ...);
    classifier: {weights, sha256, arch, num_classes, dropout, input_kind, label_set, stage
    (finetuned|student), count (expert labels per class, fine-tuned only), epoch, criterion, score};
    training: {slides, annotation_sets: {set: [slides]}, public_datasets, labelled_nuclei: {set: {class: n}}};
    metrics: {table2, table5, table6}: the rows of those tables for the bundled models.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellkd.classes import ClassSpec, classes_from_config
from cellkd.errors import ConfigError, StoreError
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "cellkd.bundle"
BUNDLE_FORMAT_VERSION = 1
"""Raised whenever model.json changes incompatibly; readers refuse other versions."""
MANIFEST = "model.json"
MODEL_CARD = "MODEL_CARD.md"
SEGMENTATION_WEIGHTS = "segmentation.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
STAIN_REFERENCE = "stain_reference.json"
RESOLUTION_TOLERANCE = 0.1
"""Relative mpp difference between a new slide and the training slides above which a warning is logged."""

_NUCLEI_KEYS = ("crop_size", "multiscale_size", "min_area", "split_touching", "split_depth")
"""``nuclei:`` settings that shape what the classifier sees; the rest (matching, splits) is training only."""
_INFERENCE_KEYS = ("level", "tile", "overlap", "threshold")
"""``segmentation.inference:`` settings that change the masks; batch_size is speed only."""


def cellkd_version() -> str:
    from cellkd import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Plain JSON values (NaN -> None, numpy -> Python) for model.json."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class ExportSettings:
    """What the workflow config says about the bundled models (built by the export_model rule)."""

    name: str
    classes: Sequence[Mapping[str, Any]]
    stain: str
    macenko: Mapping[str, Any]
    patch_size: int
    nuclei: Mapping[str, Any]
    inference: Mapping[str, Any]
    count: int | None
    """Expert labels per class of the fine-tuned classifier; None for the plain student."""
    annotation_sets: Mapping[str, Sequence[str]]
    """Training slide -> the annotation sets it carries."""
    public_datasets: Sequence[str] = ()
    mpp_fallback: float | None = None
    """µm/px the training assumed for slides that record none (``mpp_fallback``)."""
    seed: int | None = None
    """Training seed of the bundled models: their rows are picked from per-seed tables (None: every row)."""


def _training_resolution(
    fragment_stores: Sequence[PathLike], mpp_fallback: float | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The training slides' mpp, and the Macenko reference they were normalized to (None for raw stores)."""
    from cellkd.store.fragments import FragmentStore

    slides_mpp: dict[str, float | None] = {}
    references = []
    for path in fragment_stores:
        with FragmentStore(path) as store:
            slides_mpp[store.slide] = store.mpp if math.isfinite(store.mpp) else None
            reference = store.macenko_reference()
            if reference is not None:
                stain_matrix, max_concentrations = reference
                references.append(
                    {"stain_matrix": stain_matrix.tolist(), "max_concentrations": max_concentrations.tolist()}
                )
    known = [m for m in slides_mpp.values() if m is not None]
    mpp = float(np.median(known)) if known else None
    if known and (max(known) - min(known)) > RESOLUTION_TOLERANCE * min(known):
        logger.warning("training slides differ in resolution (%s µm/px); recording the median %s", known, mpp)
    resolution = {
        "mpp": mpp,
        "assumed_mpp": mpp_fallback,
        "slides": slides_mpp,
        "note": (
            "microns per pixel the models were trained at: the working resolution (config mpp) of the training "
            "fragment stores (median; assumed_mpp for slides that record none). Predicting with the bundle "
            "resamples every slide to it."
        ),
    }
    if references and any(r != references[0] for r in references):
        raise StoreError(
            f"{fragment_stores[0]}: the training slides were normalized to different Macenko references; "
            "rerun normalize_stain with one macenko: reference for every slide"
        )
    return resolution, (references[0] if references else None)


def _labelled_nuclei(nuclei_stores: Sequence[PathLike]) -> dict[str, dict[str, int]]:
    """Annotation set -> class -> labelled nuclei over the training slides' nuclei stores."""
    from cellkd.store.nuclei import NucleiStore

    counts: dict[str, dict[str, int]] = {}
    for path in nuclei_stores:
        with NucleiStore(path) as store:
            for label_set in store.label_sets:
                labels = store.labels(label_set)
                per_set = counts.setdefault(label_set, dict.fromkeys(store.classes, 0))
                for index, name in enumerate(store.classes):
                    per_set[name] += int(np.count_nonzero(labels == index))
    return counts


def headline_rows(table_csv: PathLike, **keys: Any) -> list[dict[str, Any]]:
    """Rows of a results table whose key columns (those of ``keys`` the table has) equal ``keys``."""
    table = pd.read_csv(table_csv)
    keep = np.ones(len(table), dtype=bool)
    for column, value in keys.items():
        if column in table.columns and value is not None:
            keep &= table[column].astype(str).to_numpy() == str(value)
    return _jsonable(table[keep].to_dict("records"))


def _save_weights(state_dict: Mapping[str, Any], path: Path) -> str:
    from safetensors.torch import save_file  # torch: not imported when Snakemake merely reads a bundle's manifest

    # contiguous copies: safetensors refuses views, and tensors sharing storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(path))
    return _sha256(path)


def export_bundle(
    out_dir: PathLike,
    settings: ExportSettings,
    *,
    segmentation_model: PathLike,
    classifier_model: PathLike,
    fragment_stores: Sequence[PathLike],
    nuclei_stores: Sequence[PathLike],
    tables: Mapping[str, PathLike],
) -> Path:
    """Write the bundle folder ``out_dir`` (layout: module docstring) from trained ``model.pt`` checkpoints.

    ``fragment_stores``: the training slides' stores of ``settings.stain`` (resolution, Macenko reference);
    ``nuclei_stores``: their nuclei stores (labelled counts); ``tables``: ``{"table2": csv, ...}``.
    The folder is built under a temporary sibling name and renamed into place, so ``out_dir`` is either
    the previous bundle or the complete new one. Returns ``out_dir``.
    """
    from cellkd.models.checkpoint import read_classifier_checkpoint, read_segmentation_checkpoint

    out_dir = Path(out_dir)
    classes = classes_from_config(settings.classes, "export_model classes")
    segmentation = read_segmentation_checkpoint(segmentation_model)
    classifier = read_classifier_checkpoint(classifier_model)
    expected = [spec.name for spec in classes] + ["background"]
    if list(classifier["classes"]) != expected:
        raise ConfigError(
            f"{classifier_model}: the classifier was trained on classes {classifier['classes']}, but the config "
            f"lists {expected}; export with the classes it was trained on"
        )
    resolution, reference = _training_resolution(fragment_stores, settings.mpp_fallback)
    if settings.stain == "macenko" and reference is None:
        raise StoreError(f"{fragment_stores[0]}: expected Macenko-normalized fragment stores for a macenko bundle")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        seg_sha = _save_weights(segmentation["state_dict"], tmp / SEGMENTATION_WEIGHTS)
        cls_sha = _save_weights(classifier["state_dict"], tmp / CLASSIFIER_WEIGHTS)
        if reference is not None:
            (tmp / STAIN_REFERENCE).write_text(json.dumps(reference, indent=2), encoding="utf-8")
        seg_arch = segmentation["arch"]
        labels = classifier["label_set"]
        inference = {k: settings.inference[k] for k in _INFERENCE_KEYS}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "name": settings.name,
            "cellkd_version": cellkd_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "classes": [
                {"name": s.name, "qupath_name": s.qupath_name, "color": list(s.color), "aliases": list(s.aliases)}
                for s in classes
            ],
            "resolution": resolution,
            "stain": {
                "normalization": settings.stain,
                "macenko": (
                    {k: settings.macenko[k] for k in ("io", "alpha", "beta", "max_samples")}
                    if settings.stain == "macenko"
                    else None
                ),
                "reference": STAIN_REFERENCE if reference is not None else None,
            },
            "sizes": {
                "patch": settings.patch_size,
                "crop": settings.nuclei["crop_size"],
                "multiscale": settings.nuclei["multiscale_size"],
                "tile": inference["tile"],
                "overlap": inference["overlap"],
                "level": inference["level"],
            },
            "segmentation": {
                "weights": SEGMENTATION_WEIGHTS,
                "sha256": seg_sha,
                **{k: segmentation[k] for k in ("arch", "encoder", "encoder_depth", "decoder_channels", "dropout")},
                "mask_set": segmentation["mask_set"],
                "threshold": inference["threshold"],
                "epoch": segmentation.get("epoch"),
                "val_loss": segmentation.get("val_loss"),
            },
            "nuclei": {k: settings.nuclei[k] for k in _NUCLEI_KEYS if k in settings.nuclei},
            "classifier": {
                "weights": CLASSIFIER_WEIGHTS,
                "sha256": cls_sha,
                **{k: classifier[k] for k in ("arch", "num_classes", "dropout", "input_kind", "label_set")},
                "stage": "finetuned" if settings.count is not None else "student",
                "count": settings.count,
                **{k: classifier.get(k) for k in ("epoch", "criterion", "score")},
            },
            "training": {
                "slides": sorted(settings.annotation_sets),
                "annotation_sets": {
                    s: sorted(slide for slide, sets in settings.annotation_sets.items() if s in sets)
                    for s in sorted({s for sets in settings.annotation_sets.values() for s in sets})
                },
                "public_datasets": list(settings.public_datasets),
                "labelled_nuclei": _labelled_nuclei(nuclei_stores),
            },
            "metrics": {
                "table2": headline_rows(tables["table2"], stain=settings.stain, arch=seg_arch, seed=settings.seed)
                if "table2" in tables
                else [],
                "table5": headline_rows(tables["table5"], stain=settings.stain, labels=labels, seed=settings.seed)
                if "table5" in tables
                else [],
                "table6": (
                    headline_rows(
                        tables["table6"], stain=settings.stain, labels=labels, count=settings.count, seed=settings.seed
                    )
                    if "table6" in tables and settings.count is not None
                    else []
                ),
            },
        }
        manifest = _jsonable(manifest)
        (tmp / MODEL_CARD).write_text(model_card(manifest), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # mkdtemp and safetensors make private files; a bundle is meant to be shared
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported bundle %s (%s + %s)", out_dir, seg_arch, manifest["classifier"]["arch"])
    return out_dir


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(not available)\n"
    frame = pd.DataFrame(list(rows))
    return frame.to_markdown(index=False, floatfmt=".3f") + "\n"


def model_card(manifest: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md`` text: the facts of ``model.json`` for a reader deciding whether the model fits."""
    seg, cls, stain = manifest["segmentation"], manifest["classifier"], manifest["stain"]
    res, sizes, training = manifest["resolution"], manifest["sizes"], manifest["training"]
    classes = "\n".join(
        f"| {i} | {c['name']} | {c['qupath_name']} | {tuple(c['color'])} |" for i, c in enumerate(manifest["classes"])
    )
    stage = (
        f"fine-tuned on {cls['count']} expert (ea) labels per class"
        if cls["stage"] == "finetuned"
        else "distilled student (no expert fine-tuning)"
    )
    labelled = "\n".join(
        f"- {label_set}: " + ", ".join(f"{name} {n}" for name, n in per_class.items())
        for label_set, per_class in training["labelled_nuclei"].items()
    )
    sets = "\n".join(f"- {s}: {', '.join(slides)}" for s, slides in training["annotation_sets"].items())
    if res["mpp"] is not None:
        mpp = f"{res['mpp']:.4g} µm/px"
    else:
        mpp = f"not recorded by the training slides; {res.get('assumed_mpp')} µm/px assumed (mpp_fallback)"
    normalization = stain["normalization"]
    if stain["reference"]:
        normalization += f" (target reference: `{stain['reference']}`)"
    return f"""# Model card: {manifest["name"]}

Written by cellkd {manifest["cellkd_version"]} on {manifest["created"]} (bundle format
{manifest["format"]}/{manifest["format_version"]}); every fact below is also in `model.json`.

## Use

    snakemake predict --config predict_sheet=new_slides.tsv predict_model=<this folder>

This segments the nuclei of each new slide and classifies them; nothing is trained. The bundle's
resolution, stain normalization, sizes and classes are used, not the config's.

## Models

- Segmentation: {seg["arch"]} with a {seg["encoder"]} encoder (depth {seg["encoder_depth"]}, decoder
  {seg["decoder_channels"]}), trained on {seg["mask_set"]} outlines; threshold {seg["threshold"]}.
- Classifier: {cls["arch"]} ({cls["input_kind"]} crops), learnt from {cls["label_set"]} teacher labels, {stage}.

## Classes (background is the extra last class)

| index | name | QuPath name | colour |
|---|---|---|---|
{classes}

## Input expected

- Resolution: {mpp} at level 0. {res["note"]}
- Stain: {normalization}.
- Sizes: segmentation tiles {sizes["tile"]} px (overlap {sizes["overlap"]}) at level {sizes["level"]};
  nucleus crops {sizes["crop"]} px (multiscale {sizes["multiscale"]} px); training patches {sizes["patch"]} px.

## Training data

Slides: {", ".join(training["slides"]) or "none"}; public datasets: {", ".join(training["public_datasets"]) or "none"}.

Annotation sets:
{sets or "- none"}

Labelled nuclei:
{labelled or "- none"}

## Metrics (test split)

Table 2 (segmentation):

{_markdown_table(manifest["metrics"]["table2"])}
Table 5 (student):

{_markdown_table(manifest["metrics"]["table5"])}
Table 6 (fine-tuned):

{_markdown_table(manifest["metrics"]["table6"])}"""


# ------------------------------------------------------------------------------------------------ read


@dataclass(frozen=True)
class Bundle:
    """A checked bundle folder: its manifest and classes (weights are read on demand)."""

    path: Path
    manifest: Mapping[str, Any]

    @property
    def classes(self) -> tuple[ClassSpec, ...]:
        return classes_from_config(self.manifest["classes"], str(self.path / MANIFEST))

    @property
    def stain(self) -> str:
        return str(self.manifest["stain"]["normalization"])

    @property
    def mpp(self) -> float | None:
        return self.manifest["resolution"]["mpp"]

    def weights(self, component: str) -> dict[str, Any]:
        """State dict of ``component`` (``"segmentation"`` or ``"classifier"``), checked against its SHA-256.

        Read with safetensors, which parses a JSON header and raw bytes: no pickle, so no code, can run.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self.manifest[component]
        path = self.path / entry["weights"]
        if not path.is_file():
            raise StoreError(f"{self.path}: bundle lacks {entry['weights']}; export it again (snakemake export_model)")
        if _sha256(path) != entry["sha256"]:
            raise StoreError(
                f"{path}: the weights differ from those model.json records (SHA-256 mismatch): the bundle was "
                "altered or damaged; get an intact copy or export it again (snakemake export_model)"
            )
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(
                f"{path}: not a safetensors file ({err}); bundles hold only safetensors weights and nothing "
                "else is loaded (pickled files are refused): export the bundle again"
            ) from err

    def checkpoint(self, component: str) -> dict[str, Any]:
        """The ``component``'s model as a ``model.pt``-style dict (cellkd.models.checkpoint), weights included."""
        from cellkd.models.checkpoint import CLASSIFIER_FORMAT, SEGMENTATION_FORMAT

        entry = dict(self.manifest[component])
        fmt = CLASSIFIER_FORMAT if component == "classifier" else SEGMENTATION_FORMAT
        extra = {"classes": [c["name"] for c in self.manifest["classes"]] + ["background"]}
        return {**entry, **extra, "format": fmt, "state_dict": self.weights(component)}


def read_bundle(path: PathLike, classes: Sequence[ClassSpec] | None = None) -> Bundle:
    """Open and check the bundle folder ``path``: format, version and, when given, the expected ``classes``.

    Raises ``StoreError`` for a folder that is not a readable bundle of this format version and
    ``ConfigError`` when ``classes`` (names and QuPath names, in order) differ from the bundle's.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(
            f"{folder}: not a cellkd model bundle (no {MANIFEST}); point predict_model at a folder written "
            "by `snakemake export_model` (results/models/<name>)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{manifest_path}: cannot read the bundle manifest ({err}); export the bundle again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise StoreError(f"{manifest_path}: not a cellkd model bundle manifest (format != {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise StoreError(
            f"{manifest_path}: bundle format version {version!r}, but this cellkd ({cellkd_version()}) reads "
            f"version {BUNDLE_FORMAT_VERSION}; export the bundle again with this cellkd, or use the cellkd "
            f"version that wrote it ({manifest.get('cellkd_version')})"
        )
    bundle = Bundle(folder, manifest)
    if classes is not None:
        ours = [(s.name, s.qupath_name) for s in bundle.classes]
        given = [(s.name, s.qupath_name) for s in classes]
        if ours != given:
            raise ConfigError(
                f"{folder}: the bundle classifies {ours} (name, QuPath name), but the config lists {given}; "
                "remove classes: from your config (or set them to the bundle's), or use a bundle trained on "
                "your classes"
            )
    return bundle


def read_bundle_checkpoint(weights_path: PathLike, expected_format: str) -> dict[str, Any]:
    """The ``model.pt``-style dict of the bundle component stored in ``weights_path`` (a bundle's .safetensors)."""
    from cellkd.models.checkpoint import CLASSIFIER_FORMAT

    weights_path = Path(weights_path)
    bundle = read_bundle(weights_path.parent)
    component = "classifier" if expected_format == CLASSIFIER_FORMAT else "segmentation"
    if bundle.manifest[component]["weights"] != weights_path.name:
        raise StoreError(
            f"{weights_path}: this bundle's {component} weights are {bundle.manifest[component]['weights']}; "
            "point at that file"
        )
    return bundle.checkpoint(component)


def bundle_config(config: dict[str, Any], bundle: Bundle) -> list[str]:
    """Replace the config's prediction settings with ``bundle``'s (in place); return the log lines.

    Set: ``predict.stain``, ``macenko`` (fitting params and the bundle's reference), ``mpp`` (the working
    resolution the models were trained at), ``mpp_fallback`` (the same, for slides that do not record theirs:
    they are then read as they are), the nuclei crop / instance keys
    and ``segmentation.inference`` (all but batch_size). The classes must already match (:func:`read_bundle`).
    """
    manifest = bundle.manifest
    changed = []

    def put(section: dict[str, Any], key: str, value: Any, dotted: str) -> None:
        if section.get(key) != value:
            changed.append(f"{dotted} {section.get(key)!r} -> {value!r}")
        section[key] = value

    put(config["predict"], "stain", bundle.stain, "predict.stain")
    if manifest["stain"]["macenko"]:
        for key, value in manifest["stain"]["macenko"].items():
            put(config["macenko"], key, value, f"macenko.{key}")
    if manifest["stain"]["reference"]:
        put(config["macenko"], "reference", str(bundle.path / manifest["stain"]["reference"]), "macenko.reference")
    assumed = bundle.mpp if bundle.mpp is not None else bundle.manifest["resolution"].get("assumed_mpp")
    if assumed is not None:
        put(config, "mpp_fallback", assumed, "mpp_fallback")
    if bundle.mpp is not None:
        put(config, "mpp", bundle.mpp, "mpp")
    for key, value in manifest["nuclei"].items():
        put(config["nuclei"], key, value, f"nuclei.{key}")
    put(config["nuclei"], "crop_size", manifest["sizes"]["crop"], "nuclei.crop_size")
    put(config["nuclei"], "multiscale_size", manifest["sizes"]["multiscale"], "nuclei.multiscale_size")
    inference = config["segmentation"]["inference"]
    for key in ("level", "tile", "overlap"):
        put(inference, key, manifest["sizes"][key], f"segmentation.inference.{key}")
    put(inference, "threshold", manifest["segmentation"]["threshold"], "segmentation.inference.threshold")
    notes = [f"predict_model {bundle.path}: predicting with the bundle {manifest['name']}; nothing is trained"]
    if changed:
        notes.append(f"predict_model {bundle.path}: the bundle's settings replace the config's: {'; '.join(changed)}")
    return notes


def check_resolution(bundle: Bundle, mpp: float | None, slide: str) -> None:
    """Log a warning when ``slide``'s working mpp differs from the bundle's training resolution."""
    if bundle.mpp is None or mpp is None or not math.isfinite(mpp):
        return
    if abs(mpp - bundle.mpp) > RESOLUTION_TOLERANCE * bundle.mpp:
        logger.warning(
            "%s: %.4g µm/px, but the bundle %s was trained at %.4g µm/px; set mpp: to the bundle's or "
            "expect worse segmentation and classification",
            slide,
            mpp,
            bundle.path,
            bundle.mpp,
        )


def is_bundle_weights(path: PathLike) -> bool:
    """Whether ``path`` names a bundle's weights file (rather than a training ``model.pt``)."""
    return os.fspath(path).endswith(".safetensors")


__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "CLASSIFIER_WEIGHTS",
    "MANIFEST",
    "MODEL_CARD",
    "SEGMENTATION_WEIGHTS",
    "STAIN_REFERENCE",
    "Bundle",
    "ExportSettings",
    "bundle_config",
    "check_resolution",
    "export_bundle",
    "headline_rows",
    "is_bundle_weights",
    "model_card",
    "read_bundle",
    "read_bundle_checkpoint",
]
