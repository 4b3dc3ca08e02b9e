"""DAG: ``snakemake -n`` over a sheet of 500 placeholder slides."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from harness import REPO, Context, Row, Stopwatch, met

NAME = "dag"
ORDER = 60


def run(ctx: Context) -> list[Row]:
    n = 50 if ctx.quick else 500
    folder = ctx.work / "dag"
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    lines = ["slide\tpath\tssa\twsa\tea"]
    for i in range(n):
        slide = f"slide{i:04d}"
        for suffix in (".svs", ".ssa.geojson", ".wsa.geojson", ".ea.geojson"):
            (inputs / f"{slide}{suffix}").touch()  # dry-run only checks that inputs exist
        lines.append(f"{slide}\t{slide}.svs\t{slide}.ssa.geojson\t{slide}.wsa.geojson\t{slide}.ea.geojson")
    sheet = inputs / f"sheet_{n}.tsv"
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = folder / f"run_{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    cmd = [
        sys.executable, "-m", "snakemake", "-n", "--cores", "1",
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(run_dir),
        "--configfile", str(REPO / "workflow_config.yaml"), "--config", f"sheet={sheet}",
    ]  # fmt: skip
    with Stopwatch() as watch:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=run_dir)
    seconds = watch.seconds
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    match = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, flags=re.MULTILINE)
    jobs = match.group(1) if match else "?"
    return [
        Row(
            f"dag: snakemake -n over a sheet of {n} slides, s",
            f"{seconds:.1f}",
            "-",
            "-",
            "< 20 s",
            met(seconds < 20),
            f"{jobs} jobs planned (placeholder slide and GeoJSON files)",
        )
    ]
