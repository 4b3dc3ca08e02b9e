#!/usr/bin/env python
"""Peak memory of the classifier jobs against the number of nuclei: per-nucleus slope and the paper slide's RSS.

    python benchmarks/classifier_memory.py [--nuclei 5000 40000] [--threads 1] [--work-dir DIR]

For each size, a nuclei store of N synthetic nuclei (random crops at the three levels, ``wsa`` labels, the
default 70/15/15 split) is written with the real ``NucleiWriter``; then train_teacher (VGG-4),
evaluate_teacher (which caches the teacher's logits) and train_student (RCCNet) run as their scripts call them
(``train_classifier``, ``evaluate_classifier_stores``; the demo's batch 128, one epoch, ``--threads`` torch
threads), each in a fresh process (``harness.run_child``) whose peak RSS (``VmHWM``) is its own. The slope between
the two sizes (KB per nucleus) is what each job adds per nucleus of a slide, to compare with its crops
(32 x 32 x 3 uint8 = 3 KB) and to project to the paper's 470k nuclei (``PAPER_NUCLEI``): the figure behind the
``mem_mb`` of those rules. Not a ``run.py`` topic: a sizing aid, like ``nuclei_memory.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Stopwatch, peak_rss_mib, run_child  # noqa: E402

PAPER_NUCLEI = 470_000
"""Nuclei of the paper's slide (``benchmarks/scale.py`` at scale 1)."""
CLASSES = ["other", "immune", "muscle", "background"]
FRAGMENT_ROWS = 5000
"""Nuclei per appended fragment (the writer streams crops to disk fragment by fragment)."""
SPLIT = (0.70, 0.15, 0.15)
"""Train / val / test shares (``NucleiParams.split``'s default)."""
TRAIN = {"epochs": 1, "batch_size": 128, "lr": 1e-3, "dropout": 0.3}
"""The demo preset's classifier settings (config/demo.yaml), at one epoch as benchmarks/scale.py runs them."""


def build_store(work: Path, n: int) -> str:
    """A cached nuclei store of ``n`` synthetic nuclei written by ``NucleiWriter`` (the layout of extract_nuclei)."""
    import shapely

    from cellkd.store.atomic import atomic_h5
    from cellkd.store.nuclei import FragmentNuclei, NucleiWriter

    path = work / f"classifier_memory_{n}.h5"
    if path.exists():
        return str(path)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    with atomic_h5(path) as h5:
        writer = NucleiWriter(h5, crop_size=32, multiscale_size=16, label_sets=["wsa"])
        for first in range(0, n, FRAGMENT_ROWS):
            m = min(FRAGMENT_ROWS, n - first)
            x = rng.uniform(0, 10_000, m)
            y = rng.uniform(0, 10_000, m)
            nuclei = FragmentNuclei(
                centroid_x=x,
                centroid_y=y,
                area=np.full(m, 50),
                bbox=np.stack([x - 4, y - 4, x + 4, y + 4], axis=1).astype(np.int64),
                labels={"wsa": rng.integers(0, len(CLASSES), m)},
                outline=shapely.box(x - 4, y - 4, x + 4, y + 4),
            )
            crops = (rng.integers(0, 256, (m, s, s, 3), dtype=np.uint8) for s in writer.crop_sizes)
            writer.append(f"f{first // FRAGMENT_ROWS:03d}", nuclei, crops)
        split = rng.choice(3, size=n, p=SPLIT).astype(np.int8)
        writer.finish(split, {"slide": path.stem, "stain": "raw", "classes": CLASSES, "label_sets": ["wsa"]})
    return str(path)


def _setup(threads: int) -> float:
    """``threads`` torch threads, as ``limit_threads`` sets a rule's; the peak RSS after the imports (MiB)."""
    from cellkd.workflow import limit_threads

    limit_threads(threads)
    return peak_rss_mib()


def train_step(store: str, out: str, arch: str, threads: int, logits: str | None = None) -> dict:
    """Child step: ``train_classifier`` as scripts/train_classifier.py calls it (teacher, or student with logits).

    ``out`` is emptied first: a finished run there would resume with nothing left to train.
    """
    from cellkd.training.classifier import ClassifierTrainParams, train_classifier

    shutil.rmtree(out, ignore_errors=True)
    imports = _setup(threads)

    with Stopwatch() as wall:
        train_classifier([store], "wsa", out, ClassifierTrainParams(arch=arch, **TRAIN), teacher_logits=logits)
    return {"wall_s": wall.seconds, "rss_mib": peak_rss_mib(), "imports_rss_mib": imports}


def evaluate_step(model: str, store: str, out: str, threads: int) -> dict:
    """Child step: ``evaluate_classifier_stores`` as scripts/evaluate_classifier.py calls it for a teacher (metrics,
    confusion figure and the logit cache ``out``/logits.h5 from one pass)."""
    from cellkd.report.classification import evaluate_classifier_stores

    imports = _setup(threads)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with Stopwatch() as wall:
        evaluate_classifier_stores(
            model, [store], "wsa", folder / "metrics.csv", folder / "confusion.png", logits_h5=folder / "logits.h5"
        )
    return {"wall_s": wall.seconds, "rss_mib": peak_rss_mib(), "imports_rss_mib": imports}


def measure(work: Path, n: int, threads: int) -> dict[str, dict]:
    """The three jobs' results on a store of ``n`` nuclei (teacher, its evaluation and logits, the student)."""
    import classifier_memory  # the steps by their module name: the child cannot import __main__'s

    store = build_store(work, n)
    run = work / f"classifier_memory_run_{n}"
    teacher = run / "teacher"
    steps = {
        "train_teacher (vgg4)": (classifier_memory.train_step, {"out": str(teacher), "arch": "vgg4"}),
        "evaluate_teacher": (
            classifier_memory.evaluate_step,
            {"model": str(teacher / "model.pt"), "out": str(teacher)},
        ),
        "train_student (rccnet)": (
            classifier_memory.train_step,
            {"out": str(run / "student"), "arch": "rccnet", "logits": str(teacher / "logits.h5")},
        ),
    }
    results = {}
    for job, (step, kwargs) in steps.items():
        results[job] = run_child(step, store=store, threads=threads, **kwargs)
        print(f"# {job} at {n:,} nuclei: {results[job]}", file=sys.stderr, flush=True)  # a partial run's figures
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nuclei", type=int, nargs=2, default=[5000, 40000], help="the two store sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (the rules give 1-2)")
    parser.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / "work")
    args = parser.parse_args()
    small, large = sorted(args.nuclei)
    results = {n: measure(args.work_dir, n, args.threads) for n in (small, large)}
    print(
        f"| job | peak RSS MiB at {small:,} | at {large:,} | of which imports | KB per nucleus "
        f"| projected at {PAPER_NUCLEI:,} MB | wall s at {large:,} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for job in results[small]:
        a, b = results[small][job], results[large][job]
        slope_kb = (b["rss_mib"] - a["rss_mib"]) * 2**20 / (large - small) / 1e3
        projected_mb = (b["rss_mib"] * 2**20 + slope_kb * 1e3 * (PAPER_NUCLEI - large)) / 1e6
        print(
            f"| {job} | {a['rss_mib']:.0f} | {b['rss_mib']:.0f} | {b['imports_rss_mib']:.0f} | {slope_kb:.1f} "
            f"| {projected_mb:.0f} | {b['wall_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
