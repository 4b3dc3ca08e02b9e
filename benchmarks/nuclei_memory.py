#!/usr/bin/env python
"""Peak memory of ``extract_nuclei`` on one square synthetic fragment, tiled vs one tile (the untiled extraction).

    python benchmarks/nuclei_memory.py [--size 8192] [--tiles 4096 0] [--work-dir DIR]

The fragment (``size`` x ``size`` level-0 px, segmented at level 0) holds a grid of discs (radius 6..9 px, one per
40 x 40 px cell) with an ssa GeoJSON box on every third one, so every pass of the extraction runs (instances,
watershed, IoU matching, outlines, crops). Each run is a fresh process (``harness.run_child``) whose peak RSS
(``VmHWM``) is its own. ``--tiles 0`` means one tile covering the fragment, i.e. memory that grows with the
fragment as before tiling. ``extract_step`` with ``tile=0`` uses the default ``NucleiParams()``, so it also measures
an older cellkd run with another ``PYTHONPATH``. Not a ``run.py`` topic: a sizing aid for ``mem_mb`` of the
extract_nuclei rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Stopwatch, peak_rss_mib, run_child  # noqa: E402

CELL = 40
"""Grid cell (level-0 px) of one disc."""


def build_inputs(work: Path, size: int) -> dict[str, str]:
    """Cached fragment store, predicted mask store and ssa GeoJSON of one size x size fragment."""
    import shapely

    from cellkd.annotations import write_qupath_geojson
    from cellkd.classes import DEFAULT_CLASSES
    from cellkd.store.atomic import atomic_h5
    from cellkd.store.fragments import CHUNK, Fragment, FragmentStoreWriter, iter_windows

    folder = work / f"nuclei_{size}"
    paths = {"fragments": folder / "f.h5", "predicted": folder / "p.h5", "ssa": folder / "ssa.geojson"}
    if all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    folder.mkdir(parents=True, exist_ok=True)
    fragment = Fragment("f000", 0, 0, size, size)
    rng = np.random.default_rng(0)
    cells = size // CELL
    radius = rng.uniform(6, 9, (cells, cells))
    shift = rng.integers(-4, 5, (cells, cells, 2))
    rows, cols = np.mgrid[0:CELL, 0:CELL] - CELL // 2
    tile = CHUNK * 8
    with FragmentStoreWriter(paths["fragments"], slide="s", source="s.tiff", stain="raw", mpp=0.25) as writer:
        for level in range(3):
            ds = writer.create_level(fragment, level)
            for y, x, h, w in iter_windows(ds.shape[0], ds.shape[1], tile):
                # A whole array: h5py broadcasts a scalar element by element.
                ds[y : y + h, x : x + w] = np.full((h, w, 3), (y // tile * 37 + x // tile * 11) % 256, np.uint8)
    with atomic_h5(paths["predicted"]) as h5:
        h5.attrs.update({"slide": "s", "stain": "raw", "level": 0})
        group = h5.require_group("fragments/f000")
        group.attrs.update({"x": 0, "y": 0, "width": size, "height": size})
        mask = group.create_dataset("level0", shape=(size, size), dtype=np.uint8, chunks=(CHUNK, CHUNK))
        for r in range(cells):  # one row of cells at a time: the generator holds no full-size array
            band = np.zeros((CELL, cells * CELL), dtype=np.uint8)
            for c in range(cells):
                dy, dx = shift[r, c]
                band[:, c * CELL : (c + 1) * CELL] = (rows - dy) ** 2 + (cols - dx) ** 2 <= radius[r, c] ** 2
            mask[r * CELL : (r + 1) * CELL, : cells * CELL] = band
    centre = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1) * CELL + CELL // 2 + shift
    pick = (np.arange(cells * cells) % 3 == 0).reshape(cells, cells)
    y, x, rad = centre[..., 0][pick], centre[..., 1][pick], radius[pick]
    boxes = shapely.box(x - rad, y - rad, x + rad + 1, y + rad + 1)
    write_qupath_geojson(paths["ssa"], boxes, np.arange(boxes.size) % 3, DEFAULT_CLASSES)
    return {k: str(v) for k, v in paths.items()}


def extract_step(fragments: str, predicted: str, ssa: str, out: str, tile: int) -> dict:
    """Child step: ``extract_nuclei`` as the workflow calls it; nucleus count, wall seconds, peak RSS (MiB)."""
    from cellkd.classes import DEFAULT_CLASSES
    from cellkd.nuclei import NucleiParams, extract_nuclei

    imports = peak_rss_mib()
    params = NucleiParams(tile=tile) if tile else NucleiParams()
    with Stopwatch() as wall:
        n = extract_nuclei(predicted, fragments, {"ssa": ssa}, DEFAULT_CLASSES, out, params)
    Path(out).unlink()
    return {"nuclei": n, "wall_s": wall.seconds, "rss_mib": peak_rss_mib(), "imports_rss_mib": imports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="fragment edge, level-0 px")
    parser.add_argument("--tiles", type=int, nargs="+", default=[2048, 0], help="nuclei tile (0: one tile)")
    parser.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / "work")
    args = parser.parse_args()
    import nuclei_memory  # the step by its module name: the child cannot import __main__'s

    inputs = build_inputs(args.work_dir, args.size)
    print("| fragment | tile | nuclei | wall s | peak RSS MiB | of which imports MiB |")
    print("|---|---|---|---|---|---|")
    for tile in args.tiles:
        out = str(Path(inputs["fragments"]).with_name(f"n{tile}.h5"))
        # tile 0: one tile over the whole fragment (the halo then clips to nothing).
        result = run_child(nuclei_memory.extract_step, **inputs, out=out, tile=tile or args.size)
        print(
            f"| {args.size}x{args.size} | {tile or 'one'} | {result['nuclei']} | {result['wall_s']:.1f} | "
            f"{result['rss_mib']:.0f} | {result['imports_rss_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
