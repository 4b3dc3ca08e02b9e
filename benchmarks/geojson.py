"""GeoJSON to masks: ``write_mask_store`` (``read_qupath_geojson`` + rasterize 3 levels + HDF5) on 470k nuclei vs
a naive json.load + per-polygon ``skimage.draw.polygon`` loop (run on a subset, extrapolated)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from harness import Context, Row, Stopwatch, met

NAME = "geojson"
ORDER = 30


def _nuclei_geojson(ctx: Context, n: int) -> tuple[Path, Path, tuple[int, int]]:
    """Cached QuPath GeoJSON of ``n`` 12-gon nuclei (1 per 1000 px², radius 4-8 px, 3 classes) and an empty
    one-fragment store covering them (HDF5 leaves unwritten chunks unallocated, so it costs nothing)."""
    from cellkd.classes import DEFAULT_CLASSES
    from cellkd.store.fragments import Fragment, FragmentStoreWriter

    spacing = math.sqrt(1000.0)
    cols = int(math.ceil(math.sqrt(2 * n)))  # a 2:1 field
    rows = int(math.ceil(n / cols))
    width, height = int(cols * spacing) + 16, int(rows * spacing) + 16
    folder = ctx.work / "geojson"
    geojson, store = folder / f"nuclei_{n}.geojson", folder / f"fragments_{n}.h5"
    if geojson.exists() and store.exists():
        return geojson, store, (width, height)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = np.arange(n)
    centres = np.stack([(index % cols + 0.5) * spacing, (index // cols + 0.5) * spacing], axis=1) + 8
    centres += rng.uniform(-6, 6, size=(n, 2))
    radii = rng.uniform(4, 8, size=(n, 1)) * np.array([[1.0, 0.7]])
    angles = np.linspace(0, 2 * np.pi, 13)[None, :]
    theta = rng.uniform(0, np.pi, size=(n, 1))
    dx, dy = radii[:, :1] * np.cos(angles), radii[:, 1:] * np.sin(angles)
    xs = centres[:, :1] + dx * np.cos(theta) - dy * np.sin(theta)
    ys = centres[:, 1:] + dx * np.sin(theta) + dy * np.cos(theta)
    xs[:, -1], ys[:, -1] = xs[:, 0], ys[:, 0]
    labels = rng.integers(0, len(DEFAULT_CLASSES), size=n)
    names = [c.qupath_name for c in DEFAULT_CLASSES]
    with open(geojson, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for i in range(n):
            ring = ",".join(f"[{x:.2f},{y:.2f}]" for x, y in zip(xs[i], ys[i], strict=True))
            sep = ",\n" if i + 1 < n else "\n"
            f.write(
                f'{{"type":"Feature","geometry":{{"type":"Polygon","coordinates":[[{ring}]]}},'
                f'"properties":{{"objectType":"detection","classification":{{"name":"{names[labels[i]]}"}}}}}}{sep}'
            )
        f.write("]}\n")
    fragment = Fragment("fragment_000", 0, 0, width, height)
    with FragmentStoreWriter(store, slide="bench", source="synthetic", stain="raw", mpp=0.5) as writer:
        for level in range(3):
            writer.create_level(fragment, level)
    return geojson, store, (width, height)


def _naive_rasterize(geojson: Path, subset: int, width: int) -> tuple[float, float]:
    """Naive baseline: json.load (whole file) + skimage.draw.polygon per polygon, per level, for ``subset`` polygons.

    Returns (json.load seconds, drawing seconds for the subset). Masks cover only the rows the subset needs.
    """
    from skimage.draw import polygon

    from cellkd.classes import DEFAULT_CLASSES

    lookup = {c.qupath_name: i for i, c in enumerate(DEFAULT_CLASSES)}
    with Stopwatch() as load, open(geojson, encoding="utf-8") as f:
        features = json.load(f)["features"]
    chosen = features[:subset]
    with Stopwatch() as draw:
        rings = [np.asarray(feat["geometry"]["coordinates"][0], dtype=np.float64) for feat in chosen]
        classes = [lookup[feat["properties"]["classification"]["name"]] for feat in chosen]
        bottom = max(float(r[:, 1].max()) for r in rings) + 1
        for down in (1, 2, 4):
            mask = np.zeros((int(bottom / down) + 1, int(width / down) + 1, len(lookup)), dtype=np.uint8)
            for ring, cls in zip(rings, classes, strict=True):
                # Pixel centres: skimage's polygon tests integer coordinates, so shift by half a pixel.
                rr, cc = polygon(ring[:, 1] / down - 0.5, ring[:, 0] / down - 0.5, mask.shape[:2])
                mask[rr, cc, cls] = 1
    return load.seconds, draw.seconds


def run(ctx: Context) -> list[Row]:
    from cellkd.annotations import read_qupath_geojson, write_mask_store
    from cellkd.classes import DEFAULT_CLASSES

    n = 20_000 if ctx.quick else 470_000
    geojson, store, (width, height) = _nuclei_geojson(ctx, n)
    out = ctx.work / "geojson" / f"masks_{n}.h5"
    with Stopwatch() as watch:
        write_mask_store(store, {"truth": geojson}, DEFAULT_CLASSES, out, levels=(0, 1, 2))
    total_s = watch.seconds
    out.unlink(missing_ok=True)
    with Stopwatch() as watch:
        frame = read_qupath_geojson(geojson, DEFAULT_CLASSES)
    read_s = watch.seconds
    assert len(frame) == n, f"read {len(frame)} of {n} polygons"

    subset = min(n, 2_000 if ctx.quick else 20_000)
    load_s, draw_s = _naive_rasterize(geojson, subset, width)
    naive_s = load_s + draw_s * n / subset
    return [
        Row(
            f"geojson -> masks: {n // 1000}k nuclei, read + rasterize 3 levels + HDF5, s",
            f"{total_s:.1f}",
            f"{naive_s:.1f}",
            f"{naive_s / total_s:.1f}x",
            "< 30 s",
            met(total_s < 30),
            f"write_mask_store on a {width}x{height} fragment (read_qupath_geojson alone {read_s:.1f} s); "
            f"naive = json.load ({load_s:.1f} s) + skimage.draw.polygon per polygon and level, "
            f"timed on {subset} polygons and extrapolated x{n / subset:.1f}, no HDF5 write",
        )
    ]
