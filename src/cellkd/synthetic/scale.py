"""Paper-scale benchmark fixture: one 48,724 x 17,910 px slide at 0.25 µm/px (40x) with ~470k nuclei.

Beside the pyramidal TIFF it writes QuPath 0.5-style cell exports for ``truth``, ``ssa`` and ``wsa``
(cell polygon, ``nucleusGeometry``, classification, 31 measurements; the SSA export is > 1 GB at full
size) and an ``ea`` export of ~7k expert cells, some of them point clicks. Everything is streamed: the
slide is rendered in strips, the exports are serialised a few thousand objects at a time.

``scale`` shrinks both slide sides by that factor at the same nucleus density, so tests run the real
code path on a slide of a few thousand pixels. A finished fixture is cached: its ``manifest.json`` is
written last, and a rerun with the same parameters returns it without regenerating anything.

CLI: ``python -m cellkd.synthetic.scale OUT_DIR [--scale 0.1] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.store.atomic import atomic_path
from cellkd.synthetic.export import write_cells
from cellkd.synthetic.slide import draw_slide
from cellkd.synthetic.spec import ANNOTATION_SET_NAMES, SyntheticSlideParams
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

PAPER_WIDTH, PAPER_HEIGHT = 48_724, 17_910
"""Level-0 size of the paper's largest slide (Table 1)."""
PAPER_MPP = 0.25
"""40x scanning."""
PAPER_NUCLEI = 470_000
"""About the paper's 470,563 nuclei on that slide."""
PAPER_EXPERT_CELLS = 7_000
"""Expert-labelled cells on the slide."""
EA_POINT_FRACTION = 0.3
"""Share of expert labels given as point clicks rather than drawn cells."""
SLIDE_ID = "scale"
MANIFEST = "manifest.json"


def scale_params(scale: float = 1.0) -> SyntheticSlideParams:
    """Parameters of the fixture at ``scale`` (each side times ``scale``; nuclei and expert cells by area).

    Raises ``ValueError`` for a scale outside (0, 1] or one that makes a side shorter than 256 px.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale = {scale!r} is invalid; expected a factor in (0, 1] applied to both slide sides")
    width, height = round(PAPER_WIDTH * scale), round(PAPER_HEIGHT * scale)
    if min(width, height) < 256:
        raise ValueError(f"scale = {scale} gives a {width}x{height} px slide; use a scale >= {256 / PAPER_HEIGHT:.4f}")
    area = width * height / (PAPER_WIDTH * PAPER_HEIGHT)
    return SyntheticSlideParams(
        width=width,
        height=height,
        mpp=PAPER_MPP,
        fragments=(3, 3),
        # Three round, cell-filling fragments of small nuclei: the paper has 470k nuclei on a 54 mm² slide.
        fragment_aspect=(0.85, 1.0),
        nucleus_size=0.6,
        nuclei_total=round(PAPER_NUCLEI * area),
        appearance="overlapping",
        annotator="rules",
        # Contour jitter in proportion to the nuclei: the demo's micrometres times nucleus_size, in 40x pixels.
        ssa_jitter_px=1.8,
        wsa_jitter_px=3.0,
        ea_count=max(20, round(PAPER_EXPERT_CELLS * area)),
        ea_jitter_px=0.4,
        compression="jpeg",
    )


def _usage(wall_started: float, cpu_started: float) -> dict[str, float]:
    """Wall and CPU seconds since the given marks, and the process's peak RSS so far (MB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": time.perf_counter() - wall_started,
        # CPU time too: on a shared machine the wall time says more about the neighbours than about this job.
        "cpu_seconds": time.process_time() - cpu_started,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def generate_scale_fixture(
    out_dir: PathLike, scale: float = 1.0, seed: int = 0, classes: Sequence[ClassSpec] = DEFAULT_CLASSES
) -> dict[str, Any]:
    """Write (or reuse) the fixture in ``out_dir``; return its manifest.

    The manifest holds the parameters, the slide's truth summary, the file paths and sizes, and the
    wall time and peak RSS of each stage (slide, each export) of the run that made it.
    """
    out = Path(out_dir)
    params = scale_params(scale)
    identity = {"scale": scale, "seed": seed, "params": asdict(params), "classes": [c.name for c in classes]}
    files = {"slide": out / f"{SLIDE_ID}.tiff", **{s: out / f"{SLIDE_ID}.{s}.geojson" for s in ANNOTATION_SET_NAMES}}
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        cached = json.loads(manifest_path.read_text(encoding="utf-8"))
        if {k: cached.get(k) for k in identity} == json.loads(json.dumps(identity)) and all(
            p.exists() for p in files.values()
        ):
            logger.info("%s: cached fixture reused (delete it to regenerate)", manifest_path)
            return cached

    stages: dict[str, dict[str, float]] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    drawn = draw_slide(SLIDE_ID, params, classes, seed)
    stages["draw"] = _usage(started, cpu_started)
    logger.info("drew %d nuclei in %.1f s", len(drawn.nuclei.labels), stages["draw"]["seconds"])

    clock, cpu = time.perf_counter(), time.process_time()
    drawn.write_slide(files["slide"])
    stages["slide"] = _usage(clock, cpu)
    logger.info("wrote %s in %.1f s", files["slide"], stages["slide"]["seconds"])

    ids = np.array(drawn.ids, dtype=object)
    counts = []
    for index, (name, annotation) in enumerate(drawn.annotations(ANNOTATION_SET_NAMES)):
        clock, cpu = time.perf_counter(), time.process_time()
        # Measurement noise has its own stream per set, so the labels never depend on the export.
        rng = np.random.default_rng([seed, 1_000 + index])
        points = rng.random(len(annotation.kept)) < EA_POINT_FRACTION if name == "ea" else None
        write_cells(
            files[name], rng, ids[annotation.kept].tolist(), annotation, drawn.nuclei, drawn.classes,
            drawn.stain, params.mpp, points,
        )  # fmt: skip
        counts.append((name, len(annotation.kept)))
        stages[name] = _usage(clock, cpu)
        logger.info("wrote %s (%d objects) in %.1f s", files[name], len(annotation.kept), stages[name]["seconds"])
        del annotation, points  # before the next set is drawn: one set's arrays in memory at a time

    manifest = {
        **identity,
        "truth": drawn.truth(counts).to_dict(),
        "files": {k: str(p) for k, p in files.items()},
        "bytes": {k: p.stat().st_size for k, p in files.items()},
        "stages": stages,
        **_usage(started, cpu_started),
    }
    text = json.dumps(manifest, indent=1)
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return json.loads(text)  # the same plain-JSON form a cached rerun returns


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellkd.synthetic.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the fixture (keep it outside results/)")
    parser.add_argument("--scale", type=float, default=1.0, help="factor on both slide sides (default 1 = paper size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        manifest = generate_scale_fixture(args.out_dir, args.scale, args.seed)
    except ValueError as err:
        parser.error(str(err))
    truth = manifest["truth"]
    sizes = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in manifest["bytes"].items())
    print(
        f"{truth['width']}x{truth['height']} px at {truth['mpp']} µm/px, {sum(truth['nuclei_per_class'])} nuclei, "
        f"{len(truth['fragments'])} fragments; {sizes}; {manifest['seconds']:.0f} s "
        f"({manifest['cpu_seconds']:.0f} s CPU), peak RSS {manifest['peak_rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
