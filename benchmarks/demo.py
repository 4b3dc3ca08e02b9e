"""Default demo: the whole default run (``snakemake --cores 2`` with an empty sheet: the synthetic slides, every
phase, 3 training seeds) in a fresh folder; wall time, disk, jobs, CPU and the largest job's peak RSS against issue
15's targets (<= 10 min on a quiet 2-core machine, <= 0.8 GB). About half an hour: it runs only when named
(``--only demo``); ``--quick`` plans it (``snakemake -n``) and counts the jobs.

Per rule, the jobs' wall and CPU seconds and peak RSS go to ``WORK/demo/per_rule.md`` (the README's "The 3-seed
demo, measured" table). The run folder is deleted first, so every call measures a complete run.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pandas as pd
from harness import N_CORES, REPO, Context, Row, Stopwatch, met
from workflow_runs import folder_bytes, job_figures, rule_totals, snakemake_output

NAME = "demo"
ORDER = 90
OPT_IN = True
"""Runs only with ``--only demo``: half an hour of both cores."""

CORES = 2
TARGET_MINUTES = 10
TARGET_GB = 0.8
BASELINE_MINUTES = 20 + 35 / 60
"""Issue 15's starting point: the one-seed demo (99 jobs) on a quiet 2-core machine, 20 min 35 s."""
BASELINE_GB = 1.7
"""Issue 15's starting point: ``du -sh results`` of that run (256 px patches)."""


def snakemake_command(run_dir: Path, *args: str) -> list[str]:
    """The README's demo command, in ``run_dir``, with the repository's workflow and default config."""
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(run_dir),
        "--configfile", str(REPO / "workflow_config.yaml"), "--cores", str(CORES), *args,
    ]  # fmt: skip


def planned_jobs(output: str) -> int:
    """The job count of a ``snakemake`` output's job-stats table (its ``total`` line)."""
    match = re.search(r"^total\s+(\d+)", output, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no job count in the snakemake output:\n{output[-2000:]}")
    return int(match.group(1))


def per_rule(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs, summed wall and CPU seconds and the largest peak RSS per rule, the most wall time first."""
    return rule_totals(jobs).sort_values("wall_s", ascending=False).reset_index()


def markdown(table: pd.DataFrame) -> str:
    lines = ["| rule | jobs | wall s, all jobs | CPU s, all jobs | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| `{r.rule}` | {r.jobs} | {r.wall_s:.0f} | {r.cpu_s:.0f} | {r.peak_rss_mb:.0f} |" for r in table.itertuples()
    ]
    return "\n".join(lines)


def _snakemake(run_dir: Path, *args: str) -> str:
    return snakemake_output(snakemake_command(run_dir, *args), run_dir, args)


def run(ctx: Context) -> list[Row]:
    run_dir = ctx.work / "demo" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    jobs = planned_jobs(_snakemake(run_dir, "-n"))
    if ctx.quick:
        return [Row("demo: default demo, jobs planned (--quick: not run)", str(jobs), "-", "-", "-", met(None))]

    with Stopwatch() as watch:
        _snakemake(run_dir)
    figures = job_figures(run_dir)
    table = per_rule(figures)
    (run_dir.parent / "per_rule.md").write_text(markdown(table) + "\n", encoding="utf-8")
    print(f"# per rule ({run_dir.parent / 'per_rule.md'}):\n{markdown(table)}", file=sys.stderr, flush=True)

    minutes = watch.seconds / 60
    results_gb = folder_bytes(run_dir / "results") / 1e9
    cpu_s = figures["cpu_s"].sum()
    busiest = table.loc[table["peak_rss_mb"].idxmax()]
    machine_note = "" if N_CORES == CORES else f"; this machine has {N_CORES} cores, the target is for {CORES}"
    return [
        Row(
            f"demo: default demo ({jobs} jobs), snakemake --cores {CORES}, wall min",
            f"{minutes:.1f}",
            f"{BASELINE_MINUTES:.1f} (issue 15's start: one seed, 99 jobs)",
            f"{BASELINE_MINUTES / minutes:.2f}×",
            f"<= {TARGET_MINUTES}",
            met(minutes <= TARGET_MINUTES),
            f"job CPU s summed {cpu_s:.0f}, {cpu_s / watch.seconds:.2f} CPU per wall second of the run; per rule in "
            f"{run_dir.parent / 'per_rule.md'}{machine_note}",
        ),
        Row(
            "demo: results/ GB",
            f"{results_gb:.2f}",
            f"{BASELINE_GB} (issue 15's start)",
            f"{BASELINE_GB / results_gb:.1f}× less",
            f"<= {TARGET_GB}",
            met(results_gb <= TARGET_GB),
            f"of it .pt files {folder_bytes(run_dir / 'results', '*.pt') / 1e9:.2f} GB",
        ),
        Row(
            "demo: largest job peak RSS, MB",
            f"{busiest['peak_rss_mb']:.0f} ({busiest['rule']})",
            "-",
            "-",
            "-",
            met(None),
        ),
    ]
