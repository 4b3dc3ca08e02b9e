"""Synthetic inputs that several topics share, cached under the work directory; generating them is not timed."""

from __future__ import annotations

import sys
from pathlib import Path

from harness import Context, Stopwatch, run_child


def synthetic_slide(ctx: Context, width: int, height: int) -> Path:
    """Cached synthetic slide of width x height level-0 px (seed 0), generated in a child process."""
    path = ctx.work / "slides" / f"synthetic_{width}x{height}.tiff"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        info = run_child(generate_slide_step, path=str(path), width=width, height=height)
        print(f"# generated {path.name} in {info['seconds']:.1f} s (not timed)", file=sys.stderr)
    return path


def raw_store(ctx: Context, width: int, height: int) -> Path:
    """Cached raw fragment store of the synthetic slide of that size."""
    from cellkd.slides import TissueParams, extract_fragments

    slide = synthetic_slide(ctx, width, height)
    path = ctx.work / "stores" / f"raw_{width}x{height}.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        extract_fragments(slide, path, f"s{width}x{height}", TissueParams())
    return path


def generate_slide_step(path: str, width: int, height: int) -> dict:
    """Child step of ``synthetic_slide``: write the slide, return {"seconds": generation time}."""
    from cellkd.synthetic import SyntheticSlideParams, generate_slide

    with Stopwatch() as watch:
        generate_slide(Path(path).stem, path, {}, SyntheticSlideParams(width=width, height=height), seed=0)
    return {"seconds": watch.seconds}
