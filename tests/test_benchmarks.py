"""Smoke test of benchmarks/run.py: a quick run of two cheap benchmarks prints a table and writes the CSV."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
