"""A real SLURM submission: a slice of the workflow through `profiles/slurm` on a one-node cluster.

`.ci/run` starts the cluster with `.ci/slurm-cluster.sh start` (Debian's slurmctld, slurmd and munge on
loopback). Where no cluster answers, the test skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_workflow import REPO, SNAKEMAKE, TINY

from cellkd.store.patches import PatchStore

pytestmark = pytest.mark.slow


def idle_partition() -> str | None:
    """The default partition if a SLURM controller answers and a node is idle, else None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None
    try:
        result = subprocess.run(
            ["sinfo", "--noheader", "--states=idle", "--format=%P"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return None
    partitions = result.stdout.split()
    if result.returncode != 0 or not partitions:
        return None
    default = [name for name in partitions if name.endswith("*")]
    return (default or partitions)[0].rstrip("*")


def cluster_profile(partition: str, destination: Path) -> Path:
    """`profiles/slurm/config.yaml` with the placeholders filled in for the test cluster.

    The partition is the cluster's own; the account is dropped (no accounting database here); GPU requests are
    set to 0 and cpus capped at the node's, because the CI node has no GPU and 2 cores.
    """
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    defaults = profile["default-resources"]
    assert defaults.pop("slurm_partition") == "<partition>"
    assert defaults.pop("slurm_account") == "<account>"
    defaults["slurm_partition"] = partition
    cores = os.cpu_count() or 1
    for resources in profile["set-resources"].values():
        resources["gpu"] = 0
        resources["cpus_per_task"] = min(resources.get("cpus_per_task", 1), cores)
    profile["set-threads"] = {rule: min(threads, cores) for rule, threads in profile["set-threads"].items()}
    profile["latency-wait"] = 10
    destination.mkdir(parents=True)
    (destination / "config.yaml").write_text(yaml.safe_dump(profile))
    return destination


def test_slice_of_the_workflow_runs_as_real_slurm_jobs(tmp_path: Path) -> None:
    partition = idle_partition()
    if partition is None:
        pytest.skip("no SLURM cluster answers (sinfo shows no idle node); `bash .ci/slurm-cluster.sh start` makes one")
    profile = cluster_profile(partition, tmp_path / "profile")
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {
        **TINY,
        "demo": {**TINY["demo"], "slides": 2},
        "segmentation": {**TINY["segmentation"], "epochs": 1, "max_patches_per_epoch": 4},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/segmentation/raw/unet/seed0/model.pt"
    command = [
        *SNAKEMAKE,
        target,
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--profile",
        str(profile),
        "--jobs",
        "4",
        # no slurmdbd on the test cluster: job states come from squeue (MinJobAge=600 keeps finished ones)
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
        "--slurm-logdir",
        str(workdir / "slurm-logs"),
        "--slurm-keep-successful-logs",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    # every job went through sbatch: the plugin keeps one log per job, named by rule and SLURM job id
    logs = sorted((workdir / "slurm-logs").rglob("*.log"))
    rules = [path.relative_to(workdir / "slurm-logs").parts[0].removeprefix("rule_") for path in logs]
    for rule in ("generate_demo_slide", "extract_fragments", "rasterize_annotations", "cut_patches"):
        assert rules.count(rule) == 2, rules
    assert rules.count("train_segmentation") == 1, rules
    # ...and the scheduler itself recorded each of those jobs as completed
    job_ids = ",".join(path.stem for path in logs)
    states = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--jobs", job_ids, "--format=%T"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout.split()
    assert states == ["COMPLETED"] * len(logs), states

    # the artifacts are complete and usable
    for slide in ("demo0", "demo1"):
        with PatchStore(workdir / f"results/patches/raw/{slide}.h5") as store:
            assert len(store) > 0 and store.images[0].shape == (store.patch_size, store.patch_size, 3)
    assert (workdir / target).stat().st_size > 0
    assert (workdir / "results/segmentation/raw/unet/seed0/history.csv").read_text().count("\n") >= 2


def test_slurm_profile_lists_every_rule_that_asks_for_a_gpu() -> None:
    """A CPU-only cluster switches GPUs off in the profile alone, so it must name every GPU rule."""
    gpu_rules = set()
    for rules_file in (REPO / "rules").glob("*.smk"):
        rule = None
        for line in rules_file.read_text().splitlines():
            if line.startswith("rule "):
                rule = line.removeprefix("rule ").rstrip(":")
            elif line.strip() == "gpu=GPU_JOBS,":  # 1 where a GPU is configured or found (rules/common.smk)
                gpu_rules.add(rule)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert gpu_rules, "no rule asks for a GPU: the parse above is out of date"
    assert gpu_rules == {rule for rule, resources in profile["set-resources"].items() if "gpu" in resources}
    assert gpu_rules <= set(profile["set-threads"])


def test_slurm_profile_groups_name_existing_rules_and_batch_them_into_one_submission() -> None:
    rules = {
        line.removeprefix("rule ").rstrip(":")
        for rules_file in (REPO / "rules").glob("*.smk")
        for line in rules_file.read_text().splitlines()
        if line.startswith("rule ")
    }
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    groups = profile["groups"]
    assert set(groups) <= rules, f"profile groups name unknown rules: {set(groups) - rules}"
    for group in set(groups.values()):
        members = [rule for rule, name in groups.items() if name == group]
        assert profile["group-components"][group] >= len(members)
