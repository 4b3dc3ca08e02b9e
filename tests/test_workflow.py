"""End-to-end: run the real Snakemake workflow on a tiny synthetic config in a temporary folder."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from conftest import write_one_slide_sheet

from cellkd.annotations import read_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES
from cellkd.predict import BACKGROUND_CLASS
from cellkd.store.fragments import FragmentStore
from cellkd.store.patches import PatchStore

REPO = Path(__file__).resolve().parents[1]
STAIN_LABELS = [(stain, labels) for stain in ("raw", "macenko") for labels in ("ssa", "wsa")]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]

TINY = {
    "demo": {"slides": 2, "width": 1024, "height": 768, "fragments": [2, 3], "ea_count": 40},
    "tissue": {"min_area_um2": 5000.0},
    "patches": {"size": 128},
    "segmentation": {
        "archs": ["unet", "unetplusplus"],
        "encoder": "mobilenet_v2",
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 8],
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-3,
        # constant, not the demo preset's cosine: 2 epochs of 2 steps annealed from 1e-3 leave masks with no nucleus
        "lr_schedule": "constant",
        "max_patches_per_epoch": 8,
        "inference": {"tile": 128, "overlap": 32, "batch_size": 4},
    },
    "teacher": {"archs": ["vgg4"], "labels": ["ssa", "wsa"], "epochs": 2, "batch_size": 64},
    "student": {"epochs": 2, "batch_size": 64},
    "finetune": {"counts": [5, 10], "lrs": [1e-3], "epochs": 2, "batch_size": 16},
    # the tiny models may call everything background: export those too, so every nucleus is checked
    "predict": {"include_background": True},
    "seeds": [0],
}


def run_snakemake(workdir: Path, *args: str, config: dict | None = None) -> subprocess.CompletedProcess[str]:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config or TINY))
    command = [*SNAKEMAKE, *args, "--directory", str(workdir), "--configfile", str(configfile)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo (2 slides of 1024x768) run through table 2 and figure 4 with 2 cores."""
    workdir = tmp_path_factory.mktemp("workflow")
    shutil.copy(REPO / "workflow_config.yaml", workdir / "workflow_config.yaml")
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_workflow_writes_patch_stores_for_every_stain_and_slide(demo_run: Path) -> None:
    for stain in ("raw", "macenko"):
        for slide in ("demo0", "demo1"):
            with PatchStore(demo_run / f"results/patches/{stain}/{slide}.h5") as store:
                images = store.images
                assert images.shape[1:] == (128, 128, 3)
                assert set(store.annotation_sets) == {"ssa", "wsa", "ea", "truth"}
                assert store.masks("truth").shape[:3] == images.shape[:3]
                assert store.masks("truth").shape[3] == 3
                # the demo's nuclei must land in the truth masks
                assert int(np.asarray(store.masks("truth")).sum()) > 0
                assert set(np.unique(store.provenance.split)) <= {0, 1, 2}
                # the patch store reads its pixels from this workflow's fragment store
                assert (
                    store.fragment_stores[0].resolve() == (demo_run / f"results/fragments/{stain}/{slide}.h5").resolve()
                )


@pytest.mark.slow
def test_workflow_macenko_store_differs_from_raw_but_keeps_geometry(demo_run: Path) -> None:
    with (
        FragmentStore(demo_run / "results/fragments/raw/demo0.h5") as raw,
        FragmentStore(demo_run / "results/fragments/macenko/demo0.h5") as normalized,
    ):
        assert [f.name for f in raw.fragments] == [f.name for f in normalized.fragments]
        assert 2 <= len(raw.fragments) <= 3
        first = raw.fragments[0]
        a, b = raw.level(first, 0)[:], normalized.level(first, 0)[:]
        assert a.shape == b.shape
        assert not np.array_equal(a, b)


@pytest.mark.slow
def test_workflow_writes_table2_with_every_stain_arch_and_reference(demo_run: Path) -> None:
    table = pd.read_csv(demo_run / "results/tables/table2.csv")
    assert set(zip(table["stain"], table["arch"], table["reference"], strict=True)) == {
        (stain, arch, reference)
        for stain in ("raw", "macenko")
        for arch in ("unet", "unetplusplus")
        for reference in ("ssa", "truth")
    }
    metrics = table[[f"{m}_mean" for m in ("accuracy", "precision", "recall", "dice", "iou")]].to_numpy()
    assert ((metrics >= 0) & (metrics <= 1)).all()
    assert (table["seeds"] == 1).all() and table["dice_ci95"].isna().all()  # TINY trains one seed
    per_seed = pd.read_csv(demo_run / "results/tables/table2_per_seed.csv")
    assert per_seed["dice"].tolist() == table["dice_mean"].tolist() and set(per_seed["seed"]) == {0}
    assert "| stain" in (demo_run / "results/tables/table2.md").read_text()
    for stain in ("raw", "macenko"):
        selected = json.loads((demo_run / f"results/segmentation/{stain}/selected.json").read_text())
        rows = table[(table["stain"] == stain) & (table["reference"] == "ssa")].set_index("arch")
        assert selected["arch"] == rows["dice_mean"].idxmax()
        assert selected["seed"] == 0
        history = pd.read_csv(demo_run / f"results/segmentation/{stain}/unet/seed0/history.csv")
        assert list(history["epoch"]) == [1, 2]


@pytest.mark.slow
def test_workflow_segments_every_fragment_and_compares_with_qupath(demo_run: Path) -> None:
    with (
        FragmentStore(demo_run / "results/fragments/raw/demo1.h5") as fragments,
        h5py.File(demo_run / "results/segmentation/raw/masks/demo1.h5") as predicted,
    ):
        assert predicted.attrs["complete"]
        for fragment in fragments.fragments:
            mask = predicted[f"fragments/{fragment.name}/level0"]
            assert mask.shape == fragments.level(fragment, 0).shape[:2]
            assert set(np.unique(mask[:])) <= {0, 1}
    figure = pd.read_csv(demo_run / "results/tables/figure4.csv")
    model_rows = {(arch, f"model vs {s}") for arch in TINY["segmentation"]["archs"] for s in ("ssa", "truth")}
    assert set(zip(figure["arch"], figure["comparison"], strict=True)) == model_rows | {("none", "ssa vs truth")}
    assert set(figure["stain"]) == {"raw", "macenko"}
    assert (figure["slides"] == 2).all()
    # SSA is the truth with jittered borders and 5% missed nuclei: it must agree well with it.
    assert (figure.loc[figure["comparison"] == "ssa vs truth", "dice"] > 0.7).all()
    assert (demo_run / "results/report/figure4.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_workflow_writes_nuclei_stores_with_labels_from_every_set(demo_run: Path) -> None:
    with h5py.File(demo_run / "results/nuclei/raw/demo0.h5") as h5:
        assert h5.attrs["complete"]
        n = len(h5["split"])
        assert n > 50  # the demo slide has hundreds of nuclei; the tiny model finds many of them
        assert h5["crops/level0"].shape == (n, 32, 32, 3)
        assert h5["crops/level1"].shape == (n, 16, 16, 3)
        assert set(h5["labels"]) == {"ssa", "wsa", "ea", "truth"}
        for name in ("ssa", "wsa", "truth"):
            assert set(np.unique(h5[f"labels/{name}"][:])) <= {0, 1, 2, 3}
        assert set(np.unique(h5["labels/ea"][:])) <= {-1, 0, 1, 2, 3}


@pytest.mark.slow
def test_workflow_writes_table3_and_table4(demo_run: Path) -> None:
    table3 = pd.read_csv(demo_run / "results/tables/table3.csv")
    assert set(zip(table3["labels"], table3["reference"], strict=True)) == {
        (labels, reference) for labels in ("ssa", "wsa") for reference in ("ea", "truth")
    }
    assert table3[["f1_macro", "f1_weighted", "precision_macro", "recall_weighted"]].stack().between(0, 1).all()
    assert table3["recall_weighted"].to_numpy() == pytest.approx(table3["accuracy"].to_numpy())
    truth = table3[(table3["reference"] == "truth") & (table3["stain"] == "raw")].set_index("labels")
    # WSA's rules are set worse than SSA's, so it must agree less with the truth.
    assert truth.loc["wsa", "accuracy"] < truth.loc["ssa", "accuracy"]
    table4 = pd.read_csv(demo_run / "results/tables/table4.csv")
    assert set(zip(table4["stain"], table4["labels"], table4["evaluation"], strict=True)) == {
        (stain, labels, evaluation)
        for stain in ("raw", "macenko")
        for labels in ("ssa", "wsa")
        for evaluation in ("test", "doctor", "truth")
    }
    assert (demo_run / "results/teacher/raw/wsa/vgg4/seed0/confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_workflow_writes_table5_with_student_and_teacher_speeds(demo_run: Path) -> None:
    table5 = pd.read_csv(demo_run / "results/tables/table5.csv")
    assert set(zip(table5["stain"], table5["labels"], table5["evaluation"], strict=True)) == {
        (stain, labels, evaluation)
        for stain in ("raw", "macenko")
        for labels in ("ssa", "wsa")
        for evaluation in ("test", "doctor", "truth")
    }
    assert (table5["student_crops_per_s_mean"] > 0).all()
    assert (table5["teacher_crops_per_s_mean"] > 0).all()
    with h5py.File(demo_run / "results/teacher/raw/wsa/vgg4/seed0/logits.h5") as h5:  # evaluate_teacher's
        assert h5["logits"].shape[1] == 4


@pytest.mark.slow
def test_workflow_writes_table6_and_the_finetune_curve(demo_run: Path) -> None:
    table6 = pd.read_csv(demo_run / "results/tables/table6.csv")
    assert len(table6) == 2 * 2 * 2  # stains x labels x counts
    assert set(table6["count"]) == {5, 10}
    assert (table6["effective_count"] <= table6["count"]).all()
    for column in ("f1_macro_before", "f1_macro_after", "f1_weighted_before", "f1_weighted_after", "accuracy_after"):
        assert table6[f"{column}_mean"].between(0, 1).all()
    per_seed = pd.read_csv(demo_run / "results/tables/table6_per_seed.csv")
    assert per_seed["f1_macro_gain"].tolist() == pytest.approx(table6["f1_macro_gain_mean"].tolist())
    assert (demo_run / "results/report/finetune_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_workflow_exports_predictions_that_read_back_as_qupath_annotations(demo_run: Path) -> None:
    path = demo_run / "results/predict/demo0.geojson"
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    with h5py.File(demo_run / "results/nuclei/raw/demo0.h5") as h5:
        assert len(collection["features"]) == len(h5["split"])  # background included: every nucleus
    feature = collection["features"][0]
    assert feature["properties"]["objectType"] == "detection"
    measurements = feature["properties"]["measurements"]  # the demo slides record 0.5 µm/px
    assert measurements["Nucleus: Area µm^2"] == pytest.approx(measurements["Area px"] * 0.25)
    assert feature["geometry"]["coordinates"][0][0] == feature["geometry"]["coordinates"][0][-1]
    annotations = read_qupath_geojson(path, (*DEFAULT_CLASSES, BACKGROUND_CLASS))
    assert len(annotations) == len(collection["features"])


@pytest.mark.slow
def test_export_model_bundles_the_models_that_predict(demo_run: Path) -> None:
    from cellkd.bundle import read_bundle

    result = run_snakemake(demo_run, "export_model", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    bundle = read_bundle(demo_run / "results/models/cellkd-raw-wsa", DEFAULT_CLASSES)
    assert (bundle.manifest["classifier"]["stage"], bundle.manifest["classifier"]["count"]) == ("finetuned", 10)
    assert bundle.mpp == 0.5
    metrics = bundle.manifest["metrics"]
    assert metrics["table2"] and metrics["table5"] and len(metrics["table6"]) == 1


@pytest.mark.slow
def test_workflow_plots_training_curves_of_every_model(demo_run: Path) -> None:
    assert (demo_run / "results/report/training_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_workflow_writes_a_log_and_benchmark_per_job(demo_run: Path) -> None:
    for rule in ("generate_demo_slide", "extract_fragments", "normalize_stain", "rasterize_annotations"):
        assert (demo_run / f"logs/{rule}/demo0.log").exists(), rule
        assert (demo_run / f"benchmarks/{rule}/demo0.tsv").exists(), rule


@pytest.mark.slow
def test_workflow_rerun_has_nothing_to_do(demo_run: Path) -> None:
    result = run_snakemake(demo_run, "--cores", "1", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table of `snakemake --dry-run`."""
    lines = dry_run_output.split("Job stats:", 1)[1].splitlines()
    counts = {}
    for line in lines[3:]:
        if not line.strip():
            break
        rule, count = line.split()
        counts[rule] = int(count)
    return counts


@pytest.mark.slow
def test_changing_a_student_parameter_reruns_only_the_rules_that_depend_on_it(demo_run: Path) -> None:
    config = {**TINY, "student": {**TINY["student"], "epochs": TINY["student"]["epochs"] + 1}}
    result = run_snakemake(demo_run, "--dry-run", "--cores", "1", config=config)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = planned_jobs(result.stdout)
    assert planned.pop("total") == sum(planned.values())
    assert planned == {
        "train_student": 4,  # 2 stains x 2 label sets x 1 seed
        "evaluate_student": 4,
        "tabulate_students": 1,
        "finetune_student": 4,  # starts from the student (one job runs both counts)
        "tabulate_finetune": 1,
        "classify_slide": 1,
        "plot_prediction_overlay": 1,
        "plot_training_curves": 1,
        "all": 1,
    }
    # Snakemake sees the parameter itself change on the student, and everything else only follows from it
    assert result.stdout.count("Params have changed since last execution") == planned["train_student"]


def embedded_json(html: str, variable: str) -> dict:
    """The object that the Snakemake report's page script assigns to ``var <variable> = {...}``."""
    decoder = json.JSONDecoder()
    for match in re.finditer(rf"var {variable} = ", html):
        with contextlib.suppress(json.JSONDecodeError):
            value, _ = decoder.raw_decode(html, match.end())
            if isinstance(value, dict):
                return value
    raise AssertionError(f"no `var {variable} = {{...}}` object in the report")


@pytest.mark.slow
def test_report_holds_every_table_and_plot_with_a_caption(demo_run: Path) -> None:
    result = run_snakemake(demo_run, "--cores", "1", "--report", "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    html = (demo_run / "report.html").read_text()
    categories, results = embedded_json(html, "categories"), embedded_json(html, "results")
    entries = {
        path: category
        for category, subcategories in categories.items()
        for paths in subcategories.values()
        for path in paths
    }
    expected = {
        **{f"results/tables/table{n}.csv": None for n in range(2, 7)},
        "results/tables/table2_instances.csv": "Phase I: segmentation",
        "results/report/figure4.png": "Phase I: segmentation",
        "results/report/training_curves.png": "Training curves",
        "results/report/finetune_curve.png": "Phase IV: human in the loop",
        "results/report/overlays/demo0.png": "Phase IV: human in the loop",
        **{
            f"results/teacher/{s}/{lab}/vgg4/seed0/confusion.png": "Phase II: labels and teachers"
            for s, lab in STAIN_LABELS
        },
        **{f"results/student/{s}/{lab}/seed0/confusion.png": "Phase III: student" for s, lab in STAIN_LABELS},
    }
    assert set(entries) == set(expected)
    for path, category in expected.items():
        assert category is None or entries[path] == category, path
        # every entry is embedded with its caption, so the report reads without the results folder
        assert results[path]["data_uri"].startswith("data:"), path
        assert len(results[path]["caption"]) > 40, path


@pytest.mark.slow
def test_training_job_killed_mid_epoch_resumes_from_its_last_epoch(tmp_path: Path) -> None:
    epochs = 30
    config = {
        **TINY,
        "stains": ["raw"],
        "segmentation": {**TINY["segmentation"], "archs": ["unet"], "epochs": epochs, "max_patches_per_epoch": 16},
    }
    target = "results/segmentation/raw/unet/seed0/model.pt"
    checkpoint = tmp_path / "results/segmentation/raw/unet/seed0/last.pt"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [*SNAKEMAKE, target, "--cores", "2", "--directory", str(tmp_path), "--configfile", "config.yaml"]

    # kill -9 the training job mid-epoch, as the OOM killer or a cluster's time limit would: no cleanup in the job
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few more epochs
    assert run.poll() is None, "training finished before it could be interrupted: raise `epochs`"
    jobs = [
        child
        for child in psutil.Process(run.pid).children(recursive=True)
        if any("train_segmentation" in part for part in child.cmdline())
    ]
    assert jobs, "no training job process found under snakemake"
    for job in jobs:
        job.kill()
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode != 0
    assert not (tmp_path / target).exists(), "an interrupted training rule left its model behind"
    assert checkpoint.exists(), stderr[-2000:]

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    log = (tmp_path / "logs/train_segmentation/raw/unet/seed0.log").read_text()
    resumed = re.search(r"resuming from .*last\.pt after epoch (\d+)", log)
    assert resumed, log[-2000:]
    done_before = int(resumed.group(1))
    assert 1 <= done_before < epochs
    # the rerun trained only the epochs that were left
    assert len(re.findall(rf"epoch \d+/{epochs}: train loss", log)) == epochs - done_before
    history = pd.read_csv(tmp_path / "results/segmentation/raw/unet/seed0/history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))


def test_dry_run_of_default_config_plans_every_preprocessing_rule(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "--cores", "1"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for rule in (
        "generate_demo_slide",
        "extract_fragments",
        "normalize_stain",
        "rasterize_annotations",
        "cut_patches",
        "train_segmentation",
        "segment_slide",
        "tabulate_segmentation",
        "compare_with_qupath",
    ):
        assert rule in result.stdout


def rule_blocks() -> dict[str, str]:
    """Rule name -> its text, from every rules/*.smk (snakefmt's layout: ``rule name:`` at column 0)."""
    blocks = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.MULTILINE | re.DOTALL):
            blocks[match.group(1)] = match.group(2)
    return blocks


def test_every_param_a_script_reads_is_set_by_each_rule_that_runs_it() -> None:
    # A renamed param (weak_set for labels) only fails when the job runs, deep into a run: catch it here.
    checked = 0
    for rule, block in rule_blocks().items():
        script = re.search(r'script:\n\s+"\.\./scripts/(\w+\.py)"', block)
        if not script:
            continue
        section = re.search(r"^    params:\n((?:^        .*\n)+)", block, re.MULTILINE)
        given = set(re.findall(r"^        (\w+)=", section.group(1), re.MULTILINE)) if section else set()
        read = set(re.findall(r"snakemake\.params\.(\w+)", (REPO / "scripts" / script.group(1)).read_text()))
        assert read <= given, f"rule {rule} runs scripts/{script.group(1)} without params {sorted(read - given)}"
        checked += 1
    assert checked >= 25  # the regexes found the rules


def test_lint_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Congratulations" in result.stdout + result.stderr


def test_snakefmt_and_ruff_are_clean() -> None:
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "rules").glob("*.smk")))]
    snakefmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert snakefmt.returncode == 0, snakefmt.stderr
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bogus_key": 1}, "'bogus_key' was unexpected"),
        ({"demo": {"slides": "three"}}, "demo.slides: 'three' is not of type 'integer'"),
        ({"patches": {"split": [0.5, 0.2, 0.2]}}, "must sum to 1"),
        ({"sheet": "missing.tsv"}, "slide sheet not found"),
    ],
)
def test_bad_config_stops_before_any_job_with_a_named_key(tmp_path: Path, override: dict, message: str) -> None:
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config={**TINY, **override})
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_dry_run_with_a_public_dataset_adds_its_patch_store_to_segmentation_training(tmp_path: Path) -> None:
    dataset = tmp_path / "monuseg"
    dataset.mkdir()
    config = {**TINY, "public_datasets": [{"name": "monuseg", "kind": "monuseg", "path": str(dataset)}]}
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config=config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "import_public_dataset" in result.stdout
    assert "results/patches/raw/monuseg.h5" in result.stdout
    # the patch store reads its pixels from the stores kept beside it: training declares them as inputs
    assert "results/patches/raw/monuseg.stores" in result.stdout


def test_public_dataset_named_like_a_slide_is_rejected(tmp_path: Path) -> None:
    config = {**TINY, "public_datasets": [{"name": "demo0", "kind": "lizard", "path": str(tmp_path)}]}
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config=config)
    assert result.returncode != 0
    assert "also slide ids" in result.stdout + result.stderr


def test_predict_target_plans_segmentation_and_export_for_new_unannotated_slides(tmp_path: Path) -> None:
    (tmp_path / "new.svs").write_bytes(b"")  # only planned, never read, in a dry run
    (tmp_path / "new.tsv").write_text("slide\tpath\nnewslide\tnew.svs\n")
    config = {**TINY, "predict_sheet": str(tmp_path / "new.tsv")}
    result = run_snakemake(tmp_path, "predict", "--dry-run", "--cores", "1", config=config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = result.stdout
    assert "results/predict/newslide.geojson" in planned
    assert "results/segmentation/raw/masks/newslide.h5" in planned
    assert "masks/newslide.h5" not in planned.replace("results/segmentation/raw/masks/newslide.h5", "")  # no Figure 4
    # a predict-only slide has no Figure 4 masks to copy: segment_slide segments it with the selected model
    (segment,) = planned_job_blocks(planned, "segment_slide")
    assert (
        "results/segmentation/raw/masks/newslide.h5" in segment and "results/segmentation/raw/selected.json" in segment
    )
    assert "results/nuclei/raw/newslide.h5" in planned
    # a slide without annotations is never rasterized or used for training
    assert "results/masks/newslide.h5" not in planned
    assert "results/patches/raw/newslide.h5" not in planned


def dry_run_with_sheet(workdir: Path, sets: tuple[str, ...], *target: str, **config) -> subprocess.CompletedProcess:
    """Dry run of the shipped workflow_config.yaml on a real sheet with ``sets``, plus ``config`` overrides."""
    shutil.copy(REPO / "workflow_config.yaml", workdir / "workflow_config.yaml")
    sheet = write_one_slide_sheet(workdir, sets)
    return run_snakemake(workdir, *target, "--dry-run", "--cores", "1", config={"sheet": str(sheet), **config})


def test_dry_run_of_a_real_sheet_plans_the_paper_models(tmp_path: Path) -> None:
    result = dry_run_with_sheet(tmp_path, ("ssa", "wsa", "ea"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cellkd preset: paper" in result.stdout + result.stderr
    planned = planned_jobs(result.stdout)
    # the paper's teacher, not the demo's vgg4
    assert "results/teacher/raw/wsa/resnet18/seed0/model.pt" in result.stdout
    assert "vgg4" not in result.stdout
    assert "results/finetune/raw/wsa/n1900/seed2/model.pt" in result.stdout
    assert planned["finetune_student"] == 2 * 2 * 3  # stains x label sets x 3 seeds, each job the paper's 11 counts
    assert "generate_demo_slide" not in planned
    assert "tabulate_instances" not in planned  # no truth set: nothing to score instances against


def test_dry_run_of_the_demo_plans_the_demo_models(tmp_path: Path) -> None:
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config={"demo": {"slides": 2}})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cellkd preset: demo" in result.stdout + result.stderr
    assert "results/teacher/raw/wsa/vgg4/seed0/model.pt" in result.stdout
    planned = planned_jobs(result.stdout)
    assert planned["finetune_student"] == 2 * 2 * 3  # stains x label sets x 3 seeds, each job the demo's 4 counts
    assert "results/finetune/raw/wsa/n200/seed2/model.pt" in result.stdout
    assert planned["tabulate_instances"] == 1  # the demo's slides have a truth set
    # Figure 4 segments every slide with both architectures; the later steps use the selected one's masks, copied:
    # no slide is segmented a second time with the selected model
    assert planned["segment_slide_per_arch"] == 2 * 2 * 2  # stains x archs x slides
    assert planned["copy_selected_masks"] == 2 * 2
    assert "segment_slide" not in planned
    (copy,) = [b for b in planned_job_blocks(result.stdout, "copy_selected_masks") if "macenko/masks/demo1.h5" in b]
    assert "results/segmentation/macenko/selected.json" in copy
    for arch in ("unet", "unetplusplus"):
        assert f"results/segmentation/macenko/{arch}/masks/demo1.h5" in copy
    assert "results/segmentation/macenko/unetplusplus/masks/demo1.h5" in result.stdout


def planned_job_blocks(dry_run_output: str, rule: str) -> list[str]:
    """The text of each job of ``rule`` in a `snakemake --dry-run` listing (one block per job)."""
    return [block for block in dry_run_output.split("\n\n") if f"rule {rule}:" in block]


MULTI_THREADED_RULES = (
    "extract_fragments",
    "train_segmentation",
    "segment_slide_per_arch",
    "train_teacher",
    "train_student",
    "classify_slide",
)
"""The rules that ask for JOB_THREADS (rules/common.smk): 1 on the demo, 2 on a real sheet."""


def test_demo_jobs_ask_for_one_thread_and_a_real_sheets_for_two(tmp_path: Path) -> None:
    # --cores 4, so that no request is capped; snakemake prints "threads: N" for the jobs that ask for more than 1
    demo = run_snakemake(tmp_path, "--dry-run", "--cores", "4", config={"demo": {"slides": 2}})
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    for rule in MULTI_THREADED_RULES:
        assert planned_job_blocks(demo.stdout, rule), rule
    assert "threads:" not in demo.stdout  # so `--cores 2` runs two of them side by side
    sheet = write_one_slide_sheet(tmp_path, ("ssa", "wsa", "ea"))
    real = run_snakemake(tmp_path, "--dry-run", "--cores", "4", config={"sheet": str(sheet)})
    assert real.returncode == 0, real.stdout[-2000:] + real.stderr[-2000:]
    for rule in MULTI_THREADED_RULES:
        blocks = planned_job_blocks(real.stdout, rule)
        assert blocks and all("threads: 2" in b for b in blocks), rule
    # --set-threads raises a rule's request
    raised = run_snakemake(
        tmp_path, "--dry-run", "--cores", "4", "--set-threads", "train_teacher=3", config={"sheet": str(sheet)}
    )
    assert raised.returncode == 0, raised.stderr[-2000:]
    assert all("threads: 3" in b for b in planned_job_blocks(raised.stdout, "train_teacher"))


def test_two_seeds_plan_one_training_job_per_seed_and_one_segmentation_per_slide(tmp_path: Path) -> None:
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config={**TINY, "seeds": [0, 1]})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = planned_jobs(result.stdout)
    stains, archs, label_sets, slides = 2, 2, 2, 2
    for rule in ("train_segmentation", "evaluate_segmentation"):
        assert planned[rule] == stains * archs * 2, rule
    for rule in ("train_teacher", "evaluate_teacher", "train_student", "evaluate_student"):
        assert planned[rule] == stains * label_sets * 2, rule  # one teacher arch (vgg4)
    assert planned["finetune_student"] == stains * label_sets * 2  # one job per student runs every count
    # the slides are segmented once per arch (the first seed's model), not once per seed; the selected arch's
    # masks are copied from those
    assert planned["segment_slide_per_arch"] == stains * archs * slides
    assert planned["copy_selected_masks"] == stains * slides and "segment_slide" not in planned
    assert planned["select_segmentation"] == stains and planned["tabulate_segmentation"] == 1
    # the teacher passes over the nuclei once: its evaluation writes the logits that seed 1's student distils
    assert "cache_teacher_logits" not in planned
    (evaluate,) = [b for b in planned_job_blocks(result.stdout, "evaluate_teacher") if "raw/wsa/vgg4/seed1/" in b]
    assert "results/teacher/raw/wsa/vgg4/seed1/logits.h5" in evaluate.split("output:")[1]
    (student,) = [b for b in planned_job_blocks(result.stdout, "train_student") if "raw/wsa/seed1/model.pt" in b]
    student_inputs = student.split("output:")[0]
    assert "results/teacher/raw/wsa/vgg4/seed1/logits.h5" in student_inputs and "seed0" not in student_inputs
    # seed 1 fine-tunes seed 1's student
    (finetune,) = [
        b for b in planned_job_blocks(result.stdout, "finetune_student") if "raw/wsa/n10/seed1/model.pt" in b
    ]
    assert "results/student/raw/wsa/seed1/model.pt" in finetune and "seed0" not in finetune
    assert all(f"results/finetune/raw/wsa/n{count}/seed1/metrics.csv" in finetune for count in (5, 10))
    # predict and the slide segmentation use the first seed's models
    (classify,) = planned_job_blocks(result.stdout, "classify_slide")
    assert "results/finetune/raw/wsa/n10/seed0/model.pt" in classify
    per_arch = planned_job_blocks(result.stdout, "segment_slide_per_arch")
    assert per_arch and all("/seed0/model.pt" in b and "/seed1/" not in b for b in per_arch)


def test_sheet_without_ea_skips_phase_four_and_predicts_with_the_plain_student(tmp_path: Path) -> None:
    result = dry_run_with_sheet(tmp_path, ("ssa", "wsa"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("Phase IV (fine-tuning) and Table 6 are skipped") == 1
    planned = planned_jobs(result.stdout)
    assert "finetune_student" not in planned and "tabulate_finetune" not in planned
    assert "table6" not in result.stdout
    predict = run_snakemake(
        tmp_path, "predict", "--dry-run", "--cores", "1", config=yaml.safe_load((tmp_path / "config.yaml").read_text())
    )
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert "results/student/raw/wsa/seed0/model.pt" in predict.stdout
    assert "finetune_student" not in planned_jobs(predict.stdout)


def test_sheet_without_ssa_trains_everything_on_wsa(tmp_path: Path) -> None:
    result = dry_run_with_sheet(tmp_path, ("wsa", "ea"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no slide of the sheet has ssa annotations: segmentation.mask_set=wsa" in result.stdout + result.stderr
    assert "results/teacher/raw/wsa/resnet18/seed0/model.pt" in result.stdout
    assert "results/teacher/raw/ssa" not in result.stdout and "results/student/raw/ssa" not in result.stdout


def test_sheet_without_ssa_and_a_user_key_naming_ssa_stops_with_the_key(tmp_path: Path) -> None:
    result = dry_run_with_sheet(tmp_path, ("wsa",), student={"validate_against": "ssa"})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "student.validate_against: ssa" in output
    assert not (tmp_path / "results").exists()


def test_sheet_without_ssa_and_wsa_stops_saying_what_each_phase_needs(tmp_path: Path) -> None:
    result = dry_run_with_sheet(tmp_path, ("ea",))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "has an ssa or wsa annotation, so nothing can train" in output
    assert "Phase I (segmentation)" in output and "Phase IV (fine-tuning)" in output


@pytest.mark.parametrize(("device", "gpus"), [("cpu", 0), ("cuda:0", 1)])
def test_training_jobs_request_the_gpu_the_default_profile_caps(tmp_path: Path, device: str, gpus: int) -> None:
    profile = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    assert "gpu=1" in profile["resources"]  # one GPU job at a time under `--cores N`
    config = {**TINY, "device": device}
    result = run_snakemake(
        tmp_path, "results/segmentation/raw/unet/seed0/model.pt", "--dry-run", "--cores", "1", config=config
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    training = result.stdout.split("rule train_segmentation:", 1)[1].split("\n\n", 1)[0]
    assert re.search(rf"resources: .*gpu={gpus}\b", training), training


def test_unknown_device_is_rejected_at_load(tmp_path: Path) -> None:
    result = run_snakemake(tmp_path, "--dry-run", "--cores", "1", config={**TINY, "device": "gpu"})
    assert result.returncode != 0
    assert "device: 'gpu' does not match" in result.stdout + result.stderr
