"""Model bundles: export, safe loading (no pickle ever runs), checks, and the settings a bundle imposes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellkd.bundle import (
    BUNDLE_FORMAT_VERSION,
    CLASSIFIER_WEIGHTS,
    MANIFEST,
    MODEL_CARD,
    SEGMENTATION_WEIGHTS,
    STAIN_REFERENCE,
    ExportSettings,
    bundle_config,
    export_bundle,
    read_bundle,
)
from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.errors import ConfigError, StoreError
from cellkd.models import create_model
from cellkd.models.checkpoint import (
    classifier_checkpoint,
    load_classifier,
    load_segmentation_model,
    save_segmentation_model,
    torch_save_atomic,
)
from cellkd.models.segmentation import create_segmentation_model
from cellkd.stain import load_reference
from cellkd.store.fragments import Fragment, FragmentStoreWriter
from cellkd.training.segmentation import SegmentationTrainParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SEGMENTATION = SegmentationTrainParams(
    arch="unet", encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(16, 8, 8), dropout=0.1, mask_set="ssa"
)
CONFIG_CLASSES = [
    {"name": s.name, "qupath_name": s.qupath_name, "color": list(s.color), "aliases": list(s.aliases)}
    for s in DEFAULT_CLASSES
]
REFERENCE = {"stain_matrix": [[0.6, 0.1], [0.7, 0.8], [0.3, 0.5]], "max_concentrations": [1.9, 1.1]}


def tiny_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny U-Net model.pt and an RCCNet classifier model.pt (random weights: loading, not quality, is tested)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        segmentation = create_segmentation_model(
            "unet", encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(16, 8, 8), dropout=0.1
        )
        classifier = create_model("rccnet", num_classes=len(DEFAULT_CLASSES) + 1, dropout=0.2)
    seg_path = save_segmentation_model(folder / "seg.pt", segmentation, SEGMENTATION, epoch=3, val_loss=0.25)
    checkpoint = classifier_checkpoint(
        classifier,
        {"arch": "rccnet", "dropout": 0.2},
        [s.name for s in DEFAULT_CLASSES] + ["background"],
        "wsa",
        epoch=4,
        criterion="val_f1",
        score=0.6,
        teacher_logits=None,
        init_from=None,
    )
    return seg_path, torch_save_atomic(checkpoint, folder / "cls.pt")


def fragment_store(folder: Path, slide: str, stain: str, mpp: float) -> Path:
    path = folder / f"{stain}-{slide}.h5"
    with FragmentStoreWriter(path, slide=slide, source=f"{slide}.tiff", stain=stain, mpp=mpp) as writer:
        writer.create_level(Fragment("f000", 0, 0, 16, 16), 0)[:] = 200
        if stain == "macenko":
            writer.attrs["reference_stain_matrix"] = np.asarray(REFERENCE["stain_matrix"])
            writer.attrs["reference_max_concentrations"] = np.asarray(REFERENCE["max_concentrations"])
    return path


def tables(folder: Path) -> dict[str, Path]:
    """Per-seed Tables 2, 5 and 6 with rows of the bundled (seed 0) models and of others, which must be left out."""
    rows = {
        "table2": [
            {"stain": "raw", "arch": "unet", "seed": 0, "reference": "ssa", "dice": 0.8},
            {"stain": "raw", "arch": "unet", "seed": 1, "reference": "ssa", "dice": 0.9},
            {"stain": "raw", "arch": "unetplusplus", "seed": 0, "reference": "ssa", "dice": 0.7},
            {"stain": "macenko", "arch": "unet", "seed": 0, "reference": "ssa", "dice": 0.6},
        ],
        "table5": [
            {"stain": "raw", "labels": "wsa", "seed": 0, "f1_macro": 0.5},
            {"stain": "raw", "labels": "wsa", "seed": 1, "f1_macro": 0.6},
            {"stain": "raw", "labels": "ssa", "seed": 0, "f1_macro": 0.4},
        ],
        "table6": [
            {"stain": "raw", "labels": "wsa", "count": 10, "seed": 0, "f1_macro": 0.55},
            {"stain": "raw", "labels": "wsa", "count": 10, "seed": 1, "f1_macro": 0.65},
            {"stain": "raw", "labels": "wsa", "count": 5, "seed": 0, "f1_macro": 0.45},
        ],
    }
    paths = {}
    for name, table in rows.items():
        paths[name] = folder / f"{name}.csv"
        pd.DataFrame(table).to_csv(paths[name], index=False)
    return paths


def settings(stain: str = "raw", **overrides: object) -> ExportSettings:
    values = {
        "name": "tiny",
        "classes": CONFIG_CLASSES,
        "stain": stain,
        "macenko": {"io": 240.0, "alpha": 1.0, "beta": 0.15, "max_samples": 200000, "reference": None},
        "patch_size": 128,
        "nuclei": {"crop_size": 32, "multiscale_size": 16, "min_area": 8, "split_touching": True, "match": "iou"},
        "inference": {"level": 0, "tile": 128, "overlap": 32, "threshold": 0.5, "batch_size": 4},
        "count": 10,
        "annotation_sets": {"s1": ["ssa", "wsa", "ea"], "s2": ["ssa", "wsa"]},
        "public_datasets": [],
        "mpp_fallback": 0.5,
        "seed": 0,
    }
    return ExportSettings(**{**values, **overrides})


def export(folder: Path, stain: str = "raw", **overrides: object) -> Path:
    seg, cls = tiny_models(folder)
    stores = [fragment_store(folder, "s1", stain, 0.5), fragment_store(folder, "s2", stain, 0.5)]
    return export_bundle(
        folder / "models" / "tiny",
        settings(stain, **overrides),
        segmentation_model=seg,
        classifier_model=cls,
        fragment_stores=stores,
        nuclei_stores=[],
        tables=tables(folder),
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("bundle"))


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))


def test_export_writes_weights_manifest_and_card_and_nothing_else(bundle: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [MANIFEST, MODEL_CARD, SEGMENTATION_WEIGHTS, CLASSIFIER_WEIGHTS]
    )
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_manifest_describes_models_classes_resolution_sizes_and_training(bundle: Path) -> None:
    data = manifest(bundle)
    assert data["format"] == "cellkd.bundle"
    assert data["format_version"] == BUNDLE_FORMAT_VERSION
    assert data["cellkd_version"]
    assert [(c["name"], c["qupath_name"], tuple(c["color"])) for c in data["classes"]] == [
        (s.name, s.qupath_name, s.color) for s in DEFAULT_CLASSES
    ]
    assert data["resolution"]["mpp"] == 0.5
    assert data["resolution"]["slides"] == {"s1": 0.5, "s2": 0.5}
    assert data["resolution"]["assumed_mpp"] == 0.5
    assert data["stain"] == {"normalization": "raw", "macenko": None, "reference": None}
    assert data["sizes"] == {"patch": 128, "crop": 32, "multiscale": 16, "tile": 128, "overlap": 32, "level": 0}
    seg = data["segmentation"]
    assert (seg["arch"], seg["encoder"], seg["encoder_depth"], seg["decoder_channels"]) == (
        "unet",
        "mobilenet_v2",
        3,
        [16, 8, 8],
    )
    assert seg["sha256"] == hashlib.sha256((bundle / SEGMENTATION_WEIGHTS).read_bytes()).hexdigest()
    cls = data["classifier"]
    assert (cls["arch"], cls["num_classes"], cls["label_set"], cls["stage"], cls["count"]) == (
        "rccnet",
        4,
        "wsa",
        "finetuned",
        10,
    )
    assert data["nuclei"] == {"crop_size": 32, "multiscale_size": 16, "min_area": 8, "split_touching": True}
    assert data["training"]["annotation_sets"] == {"ea": ["s1"], "ssa": ["s1", "s2"], "wsa": ["s1", "s2"]}


def test_manifest_keeps_only_the_metrics_of_the_bundled_models(bundle: Path) -> None:
    metrics = manifest(bundle)["metrics"]
    assert metrics["table2"] == [{"stain": "raw", "arch": "unet", "seed": 0, "reference": "ssa", "dice": 0.8}]
    assert metrics["table5"] == [{"stain": "raw", "labels": "wsa", "seed": 0, "f1_macro": 0.5}]
    assert metrics["table6"] == [{"stain": "raw", "labels": "wsa", "count": 10, "seed": 0, "f1_macro": 0.55}]


def test_model_card_says_what_the_manifest_says(bundle: Path) -> None:
    card = (bundle / MODEL_CARD).read_text(encoding="utf-8")
    assert card.startswith("# Model card: tiny")
    for text in ("Immune cells", "0.5 µm/px", "unet with a mobilenet_v2 encoder", "10 expert (ea) labels", "0.550"):
        assert text in card


def test_bundle_weights_load_as_the_exported_models(bundle: Path, tmp_path: Path) -> None:
    seg_pt, cls_pt = tiny_models(tmp_path)  # same seed: the models that were exported
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(
            load_segmentation_model(bundle / SEGMENTATION_WEIGHTS, "cpu")(x), load_segmentation_model(seg_pt, "cpu")(x)
        )
        crops = torch.rand(2, 3, 32, 32)  # a level-0 RCCNet input
        original, bundled = load_classifier(cls_pt, "cpu"), load_classifier(bundle / CLASSIFIER_WEIGHTS, "cpu")
        assert bundled.input_kind == original.input_kind
        assert torch.equal(bundled(crops), original(crops))


class PickleBomb:
    """Creates ``marker`` when unpickled: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tampered_copy(bundle: Path, folder: Path, *, update_hash: bool) -> tuple[Path, Path]:
    """A copy of ``bundle`` whose classifier weights are a torch.save'd pickle holding a PickleBomb."""
    import shutil

    copy_dir = folder / "tampered"
    shutil.copytree(bundle, copy_dir)
    marker = folder / "pickle-ran"
    weights = copy_dir / CLASSIFIER_WEIGHTS
    torch.save({"state_dict": {}, "payload": PickleBomb(marker)}, weights)
    if update_hash:  # a careful attacker also fixes the recorded checksum
        data = manifest(copy_dir)
        data["classifier"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (copy_dir / MANIFEST).write_text(json.dumps(data))
    return copy_dir, marker


def test_pickled_weights_are_refused_without_running_them(bundle: Path, tmp_path: Path) -> None:
    copy_dir, marker = tampered_copy(bundle, tmp_path, update_hash=True)
    with pytest.raises(StoreError, match=r"not a safetensors file.*pickled files are refused"):
        load_classifier(copy_dir / CLASSIFIER_WEIGHTS, "cpu")
    assert not marker.exists()


def test_weights_that_differ_from_the_recorded_checksum_are_refused(bundle: Path, tmp_path: Path) -> None:
    copy_dir, marker = tampered_copy(bundle, tmp_path, update_hash=False)
    with pytest.raises(StoreError, match=r"SHA-256 mismatch.*export it again"):
        load_classifier(copy_dir / CLASSIFIER_WEIGHTS, "cpu")
    assert not marker.exists()


def test_other_format_version_is_refused_with_the_fix(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy_dir = tmp_path / "old"
    shutil.copytree(bundle, copy_dir)
    data = manifest(copy_dir)
    data["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (copy_dir / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(StoreError, match=rf"{copy_dir}.*format version {BUNDLE_FORMAT_VERSION + 1}.*export the bundle"):
        read_bundle(copy_dir)


def test_other_classes_than_the_configs_are_refused_with_the_fix(bundle: Path) -> None:
    other = (*DEFAULT_CLASSES[:2], ClassSpec("tumour", "Tumor", (200, 0, 0)))
    with pytest.raises(ConfigError, match=rf"{bundle}.*remove classes: from your config"):
        read_bundle(bundle, other)
    assert read_bundle(bundle, DEFAULT_CLASSES).classes == DEFAULT_CLASSES


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a cellkd model bundle.*export_model"):
        read_bundle(tmp_path)


def default_config() -> dict:
    from cellkd.config import validate_config

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    validate_config(config, REPO / "schemas" / "config.schema.yaml", source="test")
    return config


def test_macenko_bundle_carries_the_training_reference_and_imposes_it(tmp_path: Path) -> None:
    bundle = export(tmp_path, "macenko", nuclei={"crop_size": 48, "multiscale_size": 24, "min_area": 5})
    data = manifest(bundle)
    assert data["stain"]["normalization"] == "macenko"
    assert data["stain"]["reference"] == STAIN_REFERENCE
    reference = load_reference(bundle / STAIN_REFERENCE)
    np.testing.assert_allclose(reference.stain_matrix, REFERENCE["stain_matrix"])

    config = default_config()
    before = copy.deepcopy(config)
    notes = bundle_config(config, read_bundle(bundle, DEFAULT_CLASSES))
    assert config["predict"]["stain"] == "macenko"
    assert config["macenko"]["reference"] == str(bundle / STAIN_REFERENCE)
    assert (config["nuclei"]["crop_size"], config["nuclei"]["multiscale_size"], config["nuclei"]["min_area"]) == (
        48,
        24,
        5,
    )
    assert config["segmentation"]["inference"]["tile"] == 128
    assert config["segmentation"]["inference"]["batch_size"] == before["segmentation"]["inference"]["batch_size"]
    assert "nuclei.crop_size 32 -> 48" in notes[-1]


def test_reexport_replaces_the_bundle_in_place(tmp_path: Path) -> None:
    first = export(tmp_path)
    created = manifest(first)["segmentation"]["sha256"]
    seg, cls = tiny_models(tmp_path, seed=1)
    export_bundle(
        first,
        settings(),
        segmentation_model=seg,
        classifier_model=cls,
        fragment_stores=[fragment_store(tmp_path, "s1", "raw", 0.5)],
        nuclei_stores=[],
        tables={},
    )
    assert manifest(first)["segmentation"]["sha256"] != created
    assert manifest(first)["metrics"] == {"table2": [], "table5": [], "table6": []}
    assert sorted(p.name for p in first.parent.iterdir()) == ["tiny"]
