"""The resource line that ``log_to`` leaves at the end of every job log: wall, CPU and peak RSS of the job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cellkd.workflow import read_job_resources

ALLOCATE = """
import sys
import numpy as np
from cellkd.workflow import log_to
log_to(sys.argv[1])
block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched page by page
if sys.argv[2] == "fail":
    raise RuntimeError("the job failed")
"""


def _job(tmp_path: Path, outcome: str) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "job.log"
    proc = subprocess.run([sys.executable, "-c", ALLOCATE, str(log), outcome], capture_output=True, text=True)
    return proc, log


def test_job_log_ends_with_wall_cpu_and_a_peak_rss_that_holds_the_allocation(tmp_path: Path) -> None:
    proc, log = _job(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    last = log.read_text(encoding="utf-8").splitlines()[-1]
    assert "job resources: wall" in last
    used = read_job_resources(log)
    assert used is not None
    assert 300 * 2**20 / 1e6 < used.peak_rss_mb < 2000  # the array plus an interpreter with numpy
    assert used.wall_s > 0 and used.cpu_s > 0
    assert used.cpu_s < used.wall_s * 4  # CPU seconds of this process, not of the machine


def test_a_failing_job_still_logs_its_resources_once(tmp_path: Path) -> None:
    proc, log = _job(tmp_path, "fail")
    assert proc.returncode != 0 and "the job failed" in proc.stderr
    text = log.read_text(encoding="utf-8")
    assert "job failed" in text and "RuntimeError: the job failed" in text  # the traceback is in the log
    assert text.count("job resources:") == 1
    assert read_job_resources(log).peak_rss_mb > 300  # type: ignore[union-attr]


def test_a_log_without_the_line_reads_as_none(tmp_path: Path) -> None:
    log = tmp_path / "killed.log"
    log.write_text("2026-01-01 INFO cellkd: started\n", encoding="utf-8")
    assert read_job_resources(log) is None
