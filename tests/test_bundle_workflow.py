"""`snakemake export_model` and `snakemake predict` with `predict_model`: plans, and a bundle predicting for real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from test_bundle import export, fragment_store, settings, tables, tiny_models
from test_training_classifier import TINY as TINY_CLASSIFIER
from test_training_classifier import make_store
from test_training_segmentation import TINY as TINY_SEGMENTATION
from test_training_segmentation import write_patch_store
from test_workflow import TINY, planned_jobs, run_snakemake

from cellkd.annotations import read_qupath_geojson
from cellkd.bundle import SEGMENTATION_WEIGHTS, export_bundle, read_bundle
from cellkd.classes import DEFAULT_CLASSES
from cellkd.predict import BACKGROUND_CLASS
from cellkd.store.fragments import FragmentStore
from cellkd.training.classifier import train_classifier
from cellkd.training.segmentation import train_segmentation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREDICTION_JOBS = {"extract_fragments", "segment_slide", "extract_nuclei", "classify_slide", "predict"}
"""Everything `snakemake predict` with a raw-stain bundle may run: preprocessing, segmentation, nuclei, classes."""


def predict_config(workdir: Path, bundle: Path, slide: str = "new.svs", mpp: str = "") -> dict:
    (workdir / "new.tsv").write_text(f"slide\tpath\tmpp\nnewslide\t{slide}\t{mpp}\n")
    return {**TINY, "predict_sheet": str(workdir / "new.tsv"), "predict_model": str(bundle)}


def test_predict_with_a_bundle_plans_no_training(tmp_path: Path) -> None:
    bundle = export(tmp_path)
    (tmp_path / "new.svs").write_bytes(b"")  # only planned, never read, in a dry run
    result = run_snakemake(tmp_path, "predict", "--dry-run", "--cores", "1", config=predict_config(tmp_path, bundle))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = planned_jobs(result.stdout)
    assert planned.pop("total") == sum(planned.values())
    assert set(planned) == PREDICTION_JOBS
    assert not [rule for rule in planned if rule.startswith(("train_", "evaluate_", "finetune", "select_"))]
    assert f"{bundle}/{SEGMENTATION_WEIGHTS}" in result.stdout
    assert "results/predict/newslide.geojson" in result.stdout
    assert "predicting with the bundle tiny; nothing is trained" in result.stdout + result.stderr


def test_predict_with_a_macenko_bundle_normalizes_the_new_slide(tmp_path: Path) -> None:
    bundle = export(tmp_path, "macenko")
    (tmp_path / "new.svs").write_bytes(b"")
    config = predict_config(tmp_path, bundle)
    result = run_snakemake(tmp_path, "predict", "--dry-run", "--cores", "1", config=config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = planned_jobs(result.stdout)
    assert set(planned) - {"total"} == PREDICTION_JOBS | {"normalize_stain"}
    assert "results/nuclei/macenko/newslide.h5" in result.stdout
    assert f"{bundle}/stain_reference.json" in result.stdout  # an input of normalize_stain
    assert "predict.stain 'raw' -> 'macenko'" in result.stdout + result.stderr


def test_predict_model_without_a_predict_sheet_stops(tmp_path: Path) -> None:
    bundle = export(tmp_path)
    result = run_snakemake(
        tmp_path, "predict", "--dry-run", "--cores", "1", config={**TINY, "predict_model": str(bundle)}
    )
    assert result.returncode != 0
    assert "predict_sheet is empty" in result.stdout + result.stderr


def test_predict_model_that_is_not_a_bundle_stops_naming_it(tmp_path: Path) -> None:
    (tmp_path / "new.svs").write_bytes(b"")
    config = predict_config(tmp_path, tmp_path / "nothing")
    result = run_snakemake(tmp_path, "predict", "--dry-run", "--cores", "1", config=config)
    assert result.returncode != 0
    assert f"{tmp_path / 'nothing'}: not a cellkd model bundle" in result.stdout + result.stderr


def test_predict_model_with_other_classes_than_the_config_stops_naming_the_bundle(tmp_path: Path) -> None:
    bundle = export(tmp_path)
    (tmp_path / "new.svs").write_bytes(b"")
    classes = [
        {"name": "tumour", "qupath_name": "Tumor", "color": [200, 0, 0]},
        {"name": "stroma", "qupath_name": "Stroma", "color": [0, 160, 0]},
    ]
    config = {**predict_config(tmp_path, bundle), "classes": classes}
    result = run_snakemake(tmp_path, "predict", "--dry-run", "--cores", "1", config=config)
    assert result.returncode != 0
    assert f"{bundle}: the bundle classifies" in result.stdout + result.stderr
    assert "remove classes: from your config" in result.stdout + result.stderr


def test_export_model_plans_the_bundle_from_the_predicting_models(tmp_path: Path) -> None:
    result = run_snakemake(tmp_path, "export_model", "--dry-run", "--cores", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = planned_jobs(result.stdout)
    assert planned["export_model"] == 1
    assert "results/models/cellkd-raw-wsa" in result.stdout
    assert "results/finetune/raw/wsa/n10/seed0/model.pt" in result.stdout  # TINY's largest count, first seed
    named = run_snakemake(
        tmp_path, "export_model", "--dry-run", "--cores", "1", config={**TINY, "export": {"name": "lab-v1"}}
    )
    assert "results/models/lab-v1" in named.stdout


def test_export_model_rule_writes_a_bundle_from_the_trained_files(tmp_path: Path) -> None:
    """The rule and its adapter on hand-made training outputs (--allowed-rules: nothing upstream is rerun)."""
    results = tmp_path / "results"
    seg, cls = tiny_models(tmp_path)
    for source, target in [
        (seg, "segmentation/raw/unet/seed0/model.pt"),
        (cls, "finetune/raw/wsa/n10/seed0/model.pt"),
        (fragment_store(tmp_path, "demo0", "raw", 0.5), "fragments/raw/demo0.h5"),
        *((path, f"tables/{name}_per_seed.csv") for name, path in tables(tmp_path).items()),
    ]:
        (results / target).parent.mkdir(parents=True, exist_ok=True)
        source.rename(results / target)
    (results / "segmentation/raw/selected.json").write_text(json.dumps({"arch": "unet", "seed": 0}))
    (results / "nuclei/raw").mkdir(parents=True)
    with h5py.File(results / "nuclei/raw/demo0.h5", "w") as h5:  # the minimal nuclei store NucleiStore reads
        h5.attrs.update({"complete": True, "classes": ["other", "immune", "muscle", "background"]})
        h5["crops/level0"] = np.zeros((3, 32, 32, 3), np.uint8)
        h5["split"] = np.zeros(3, np.int8)
        h5["labels/wsa"] = np.array([0, 1, 1], np.int8)
    config = {**TINY, "demo": {**TINY["demo"], "slides": 1}, "stains": ["raw"], "segmentation": {"archs": ["unet"]}}
    result = run_snakemake(tmp_path, "export_model", "--allowed-rules", "export_model", "--cores", "1", config=config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    bundle = read_bundle(tmp_path / "results/models/cellkd-raw-wsa", DEFAULT_CLASSES)
    assert bundle.manifest["classifier"]["count"] == 10
    assert bundle.manifest["training"]["labelled_nuclei"]["wsa"] == {
        "other": 1,
        "immune": 2,
        "muscle": 0,
        "background": 0,
    }
    assert bundle.manifest["metrics"]["table6"] == [
        {"stain": "raw", "labels": "wsa", "count": 10, "seed": 0, "f1_macro": 0.55}
    ]
    assert (bundle.path / "MODEL_CARD.md").is_file()


# ---------------------------------------------------------------------------------------- for real

TISSUE, NUCLEUS = (235, 170, 210), (90, 40, 140)  # eosin-pink tissue, haematoxylin-purple nuclei
PATCH = 64


def draw_nuclei(image: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Paint ``count`` NUCLEUS disks (radius 4-7 px) onto ``image`` in place; return their mask."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(count):
        cy, cx = rng.integers(8, height - 8), rng.integers(8, width - 8)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 8) ** 2
        image[disk] = NUCLEUS
        mask |= disk
    return mask


def trained_segmentation(folder: Path) -> Path:
    """A tiny U-Net trained on 24 patches of purple disks on pink tissue (the look of the slide below)."""
    rng = np.random.default_rng(0)
    images = np.empty((24, PATCH, PATCH, 3), dtype=np.uint8)
    masks = np.zeros((24, PATCH, PATCH, 2), dtype=np.uint8)
    for i in range(24):
        images[i] = TISSUE
        masks[i, ..., 0] = draw_nuclei(images[i], rng, 3)
    split = np.array([0] * 16 + [1] * 4 + [2] * 4)
    store = write_patch_store(folder / "patches.h5", images, {"ssa": masks}, split)
    params = dataclasses.replace(TINY_SEGMENTATION, epochs=8, lr=3e-3)
    return train_segmentation([store], folder / "segmentation", params, device="cpu")


@pytest.mark.slow
def test_export_then_predict_on_a_fresh_folder_trains_nothing_and_reads_back_in_qupath(tmp_path: Path) -> None:
    """Tiny models trained on look-alike data; their classes are not judged (include_background exports all)."""
    models = tmp_path / "models"
    models.mkdir()
    segmentation = trained_segmentation(models)
    nuclei = make_store(models / "s1.h5", 0, 120)  # blob crops labelled ssa, and wsa with every 3rd row unlabelled
    classifier = train_classifier([nuclei], "wsa", models / "student", TINY_CLASSIFIER, device="cpu")
    bundle = export_bundle(
        models / "bundle",
        settings(count=None),
        segmentation_model=segmentation,
        classifier_model=classifier,
        fragment_stores=[fragment_store(models, "s1", "raw", 0.5)],
        nuclei_stores=[nuclei],
        tables={},
    )
    labelled = json.loads((bundle / "model.json").read_text(encoding="utf-8"))["training"]["labelled_nuclei"]
    assert sum(labelled["ssa"].values()) == 120 and sum(labelled["wsa"].values()) == 80

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    slide = np.full((384, 384, 3), 255, dtype=np.uint8)
    slide[32:352, 32:352] = TISSUE
    truth = draw_nuclei(slide[32:352, 32:352], np.random.default_rng(1), 40)
    tifffile.imwrite(fresh / "new.tif", slide, photometric="rgb")
    # scanned at 1 µm/px, twice the bundle's 0.5: resampled to the bundle's working resolution, so no warning
    config = predict_config(fresh, bundle, "new.tif", mpp="1.0")
    result = run_snakemake(fresh, "predict", "--cores", "2", config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ran = {p.parent.name for p in (fresh / "logs").glob("*/*.log")} | {p.name for p in (fresh / "logs").iterdir()}
    assert not [name for name in ran if name.startswith(("train_", "evaluate_", "finetune", "select_", "cache_"))]
    assert sorted(p.name for p in (fresh / "results").iterdir()) == ["fragments", "nuclei", "predict", "segmentation"]
    assert sorted(p.name for p in (fresh / "results/segmentation/raw").iterdir()) == ["masks"]
    with h5py.File(fresh / "results/segmentation/raw/masks/newslide.h5") as h5:
        assert h5.attrs["model"] == str(bundle / SEGMENTATION_WEIGHTS)

    geojson = fresh / "results/predict/newslide.geojson"
    annotations = read_qupath_geojson(geojson, (*DEFAULT_CLASSES, BACKGROUND_CLASS))
    assert 10 <= len(annotations) <= 80  # ~40 painted nuclei, some touching
    features = json.loads(geojson.read_text(encoding="utf-8"))["features"]
    first = features[0]["properties"]["measurements"]
    assert first["Nucleus: Area µm^2"] == pytest.approx(first["Area px"] * 1.0)
    assert "trained at" not in (fresh / "logs/classify_slide/newslide.log").read_text(encoding="utf-8")
    with FragmentStore(fresh / "results/fragments/raw/newslide.h5") as store:
        geometry = store.geometry
    assert (geometry.working_mpp, geometry.slide_mpp, geometry.scale) == (0.5, 1.0, 0.5)  # upsampled 2x
    # the bundle's trained segmentation finds the painted nuclei: nearly every detection sits on one
    inside = [truth[int(p.y) - 32, int(p.x) - 32] for p in annotations.geometry.representative_point()]
    assert np.mean(inside) >= 0.9
