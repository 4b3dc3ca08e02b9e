"""What the benchmarks that run the whole workflow (``scale``, ``demo``) share: running ``snakemake`` in a run folder,
and reading back each job's wall, CPU and peak memory, their totals per rule, and the bytes under a folder. A helper
module, not a topic (no ``NAME``)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def snakemake_output(command: Sequence[str], run_dir: Path, args: Sequence[str] = ()) -> str:
    """stdout + stderr of the ``snakemake`` ``command`` run in ``run_dir`` (``args``: its options, for the message);
    a RuntimeError with the output's tail when it fails."""
    proc = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"snakemake {' '.join(args)} in {run_dir} failed (rc {proc.returncode}); see {run_dir}/logs:\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return proc.stdout + proc.stderr


def job_figures(run_dir: Path) -> pd.DataFrame:
    """One row per job: rule, job (its log path under logs/<rule>/), wall_s, cpu_s, peak_rss_mb.

    Jobs are found by their logs (every rule has one) and benchmark TSVs (most rules), which share the path
    after ``logs/`` and ``benchmarks/``; a job's peak is the larger of the two figures.
    """
    from cellkd.workflow import read_job_resources

    jobs: dict[str, dict] = {}
    for log in sorted((run_dir / "logs").rglob("*.log")):
        key = log.relative_to(run_dir / "logs").with_suffix("").as_posix()
        used = read_job_resources(log)
        if used is not None:
            jobs[key] = {"wall_s": used.wall_s, "cpu_s": used.cpu_s, "peak_rss_mb": used.peak_rss_mb}
    for tsv in sorted((run_dir / "benchmarks").rglob("*.tsv")):
        key = tsv.relative_to(run_dir / "benchmarks").with_suffix("").as_posix()
        last = pd.read_csv(tsv, sep="\t").iloc[-1]  # one line per --benchmark-repeats; the last run
        job = jobs.setdefault(key, {})
        job["wall_s"] = float(last["s"])  # Snakemake's clock includes the interpreter start and imports
        job["cpu_s"] = max(job.get("cpu_s", 0.0), float(last["cpu_time"]))
        job["peak_rss_mb"] = max(job.get("peak_rss_mb", 0.0), float(last["max_rss"]))
    rows = [{"rule": key.split("/")[0], "job": key, **figures} for key, figures in jobs.items()]
    return pd.DataFrame(rows, columns=["rule", "job", "wall_s", "cpu_s", "peak_rss_mb"])


def rule_totals(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule (in ``jobs``' order, as the index): jobs, summed wall and CPU seconds, the largest peak RSS."""
    return jobs.groupby("rule", sort=False).agg(
        jobs=("job", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"), peak_rss_mb=("peak_rss_mb", "max")
    )


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the files under ``folder`` whose names match ``pattern``, each file once, as ``du`` counts them.

    A trained model's ``model.pt`` is a hard link to its ``best.pt`` (``cellkd.training.common.publish_model``):
    summing every name would count those bytes twice (1.00 GB instead of ``du``'s 0.76 GB on the 3-seed demo).
    """
    sizes = {}
    for path in folder.rglob(pattern):
        if path.is_file():
            stat = path.stat()
            sizes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(sizes.values())
