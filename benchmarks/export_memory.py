#!/usr/bin/env python
"""Peak memory and time of ``classify_slide``'s QuPath export on a real nuclei store, each run in a fresh process.

    python benchmarks/export_memory.py NUCLEI_STORE FRAGMENT_STORE [--out DIR] [--forward-rows R --model WEIGHTS]

``export_predictions`` (the GeoJSON of every nucleus, background included, as the scale run's predict config
asks) gets random softmax probabilities, so the classifier's forward (~600 CPU s at the paper slide) is skipped.
With ``--forward-rows R`` the step is the whole job instead: ``classify_nuclei`` with ``--model`` (a classifier
``model.pt`` or a bundle's ``classifier.safetensors``) forwarding only the store's first R rows (the rest keep
logit 0), which gives the forward's peak (flat in the rows: the crops stream from disk) and the job's. Torch uses
1 thread. The stores are only read; the GeoJSON goes to ``--out`` and is removed. Run it with another
``PYTHONPATH`` to measure an older cellkd. Not a ``run.py`` topic (it needs a real paper-scale store): the sizing
aid behind the ``mem_mb`` of the classify_slide rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Stopwatch, cpu_seconds, peak_rss_mib, run_child  # noqa: E402


def export_step(nuclei: str, fragments: str, out: str) -> dict:
    """Child step: ``export_predictions`` of random softmax rows; features, wall and CPU seconds, peak RSS (MiB)."""
    from cellkd.classes import DEFAULT_CLASSES
    from cellkd.predict import export_predictions
    from cellkd.store.fragments import FragmentStore
    from cellkd.store.nuclei import NucleiStore

    with NucleiStore(nuclei) as store:
        n = len(store)
    with FragmentStore(fragments) as store:
        geometry = store.geometry
    logits = np.random.default_rng(0).normal(size=(n, len(DEFAULT_CLASSES) + 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    before, cpu = peak_rss_mib(), cpu_seconds()
    with Stopwatch() as wall:
        count = export_predictions(
            nuclei, probabilities, DEFAULT_CLASSES, out, include_background=True, geometry=geometry
        )
    result = {"nuclei": n, "features": count, "wall_s": wall.seconds, "cpu_s": cpu_seconds() - cpu}
    result |= {"rss_mib": peak_rss_mib(), "before_export_rss_mib": before, "bytes": Path(out).stat().st_size}
    Path(out).unlink()
    return result


def job_step(nuclei: str, fragments: str, out: str, model: str, forward_rows: int) -> dict:
    """Child step: ``classify_nuclei`` forwarding the first ``forward_rows`` rows; also the forward's peak RSS."""
    import torch

    import cellkd.training.classifier.evaluate as evaluate
    from cellkd.classes import DEFAULT_CLASSES
    from cellkd.predict import classify_nuclei

    torch.set_num_threads(1)
    every_chunk = evaluate.iter_store_chunks
    forward: dict[str, float] = {}

    def first_rows(*args: object) -> object:
        for first, crops in every_chunk(*args):
            if first >= forward_rows:
                break
            yield first, crops
        forward["forward_rss_mib"] = peak_rss_mib()

    evaluate.iter_store_chunks = first_rows  # predict_logits looks it up in its module at call time
    with Stopwatch() as wall:
        count = classify_nuclei(model, nuclei, DEFAULT_CLASSES, out, include_background=True, fragment_store=fragments)
    # CPU of the whole child process: the job, imports included, as its snakemake job would spend it.
    result = {"features": count, "wall_s": wall.seconds, "cpu_s": cpu_seconds(), **forward}
    result |= {"rss_mib": peak_rss_mib(), "bytes": Path(out).stat().st_size}
    Path(out).unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nuclei", help="nuclei store, e.g. results/nuclei/raw/paper_slide.h5")
    parser.add_argument("fragments", help="the slide's fragment store (its SlideGeometry)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/export_memory"), help="folder for the GeoJSON")
    parser.add_argument("--forward-rows", type=int, default=0, help="0: the export alone; R: the job, R rows forwarded")
    parser.add_argument("--model", help="classifier weights (needed with --forward-rows)")
    args = parser.parse_args()
    if args.forward_rows and not args.model:
        parser.error("--forward-rows needs --model")
    import export_memory  # the step by its module name: the child cannot import __main__'s

    args.out.mkdir(parents=True, exist_ok=True)
    out = str(args.out / "export.geojson")
    if args.forward_rows:
        result = run_child(
            export_memory.job_step,
            nuclei=args.nuclei,
            fragments=args.fragments,
            out=out,
            model=args.model,
            forward_rows=args.forward_rows,
        )
        print("| step | features | rows forwarded | wall s | CPU s | forward peak MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| classify_nuclei | {result['features']} | {args.forward_rows} | {result['wall_s']:.1f} | "
            f"{result['cpu_s']:.1f} | {result['forward_rss_mib']:.0f} | {result['rss_mib']:.0f} |"
        )
        return
    result = run_child(export_memory.export_step, nuclei=args.nuclei, fragments=args.fragments, out=out)
    print("| step | features | MB written | wall s | CPU s | peak RSS MiB | of which before the export MiB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| export_predictions | {result['features']} | {result['bytes'] / 1e6:.0f} | {result['wall_s']:.1f} | "
        f"{result['cpu_s']:.1f} | {result['rss_mib']:.0f} | {result['before_export_rss_mib']:.0f} |"
    )


if __name__ == "__main__":
    main()
