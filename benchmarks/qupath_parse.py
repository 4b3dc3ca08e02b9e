"""Parsing speed and peak memory of a QuPath 0.5 cell export: ``read_qupath_geojson`` vs ``json.load``.

    python benchmarks/run.py --only qupath_parse [--quick]

The input is a generated QuPath 0.5-style cell export (``objectType: "cell"``, a cell ``geometry``, a
``nucleusGeometry``, a ``classification`` and a ``measurements`` dict of 30 QuPath-like entries;
about 2.2 KB per cell, so 470,563 cells make a 1.05 GB file, the size of issue 13's measurement).
It is cached under the runner's ``--work-dir`` (default ``benchmarks/work``, git-ignored); generating it
is not timed.

Each reader runs in a fresh child process, whose own peak RSS (``VmHWM``) is reported:

- ``cellkd``: ``cellkd.annotations.read_qupath_geojson`` (streamed msgspec decoding, nuclei only);
- ``json.load``: the whole file through the standard library, as cellkd read it before issue 13;
- ``ijson``: ``ijson.items`` with its C backend (yajl2_c), the other streaming candidate, which builds
  every feature dict (measurements included) before the caller can drop it. Run on a part of the
  file (its speed does not depend on the file size) and only when ijson is installed.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
from harness import Context, Row, met, peak_rss_mib, run_child

NAME = "qupath_parse"
ORDER = 35

PAPER_CELLS = 470_563
"""Nuclei of the paper's largest slide (Table 1), the size of issue 13's 1.05 GB export."""
QUICK_CELLS = 20_000
TARGET_FEATURES_PER_S = 50_000
TARGET_PEAK_GIB = 2.0
CLASS_NAMES = ("Other", "Immune cells", "Muscle")
MEASUREMENTS = (
    *(f"Nucleus: {m}" for m in ("Area µm^2", "Length µm", "Circularity", "Solidity", "Max diameter µm")),
    *(f"Nucleus: {m}" for m in ("Min diameter µm", "Perimeter µm", "Hematoxylin OD mean", "Hematoxylin OD sum")),
    *(
        f"Nucleus: {m}"
        for m in ("Hematoxylin OD std", "Hematoxylin OD max", "Hematoxylin OD min", "Hematoxylin OD range")
    ),
    *(f"Nucleus: Eosin OD {m}" for m in ("mean", "sum", "std", "max", "min", "range")),
    *(f"Cell: {m}" for m in ("Area µm^2", "Length µm", "Circularity", "Solidity", "Max diameter µm")),
    *(f"Cell: {m}" for m in ("Min diameter µm", "Eosin OD mean", "Eosin OD std")),
    *(f"Cytoplasm: Eosin OD {m}" for m in ("mean", "std")),
    "Nucleus/Cell area ratio",
)
"""30 measurement names as QuPath 0.5's cell detection writes them."""


# ------------------------------------------------------------------------------------------ the input


def _ring(rng: np.random.Generator, cx: float, cy: float, radius: float, vertices: int) -> str:
    """A closed, jittered, star-shaped ring around (cx, cy), as QuPath's 2-decimal GeoJSON coordinates."""
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = radius * rng.uniform(0.85, 1.15, vertices)
    xs, ys = cx + r * np.cos(angles), cy + r * np.sin(angles)
    points = [f"[{x:.2f},{y:.2f}]" for x, y in zip(xs, ys, strict=True)]
    return "[[" + ",".join([*points, points[0]]) + "]]"


def write_cell_export(path: Path, cells: int, seed: int = 0) -> Path:
    """Write a QuPath 0.5-style cell export of ``cells`` cells on a grid (level-0 px, ~0.25 µm/px), atomically.

    Each cell: a 32-vertex cell boundary of radius ~24 px, a 24-vertex nucleus of radius ~12 px inside it,
    one of ``CLASS_NAMES`` with its colour, and the 30 ``MEASUREMENTS``. Feature ``i`` has class
    ``CLASS_NAMES[i % 3]``, so the class counts are known without reading the file.
    """
    rng = np.random.default_rng(seed)
    cols = int(math.ceil(math.sqrt(cells * 3)))
    colors = ([0, 160, 0], [160, 90, 160], [200, 0, 0])
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[')
        for i in range(cells):
            cx, cy = 60.0 * (i % cols) + 40, 60.0 * (i // cols) + 40
            values = rng.uniform(0, 300, len(MEASUREMENTS))
            measurements = ",".join(f'"{name}":{v:.4f}' for name, v in zip(MEASUREMENTS, values, strict=True))
            label = i % len(CLASS_NAMES)
            out.write(
                ("," if i else "")
                + '{"type":"Feature","id":"'
                + f"{i:08x}-5a1e-4c2b-9d3f-{rng.integers(16**12):012x}"
                + '","geometry":{"type":"Polygon","coordinates":'
                + _ring(rng, cx, cy, 24, 32)
                + '},"nucleusGeometry":{"type":"Polygon","coordinates":'
                + _ring(rng, cx, cy, 12, 24)
                + '},"properties":{"objectType":"cell","classification":{"name":"'
                + CLASS_NAMES[label]
                + '","color":'
                + json.dumps(colors[label])
                + '},"measurements":{'
                + measurements
                + "}}}"
            )
        out.write("]}")
    partial.replace(path)
    return path


def cell_export(cells: int, work: Path) -> Path:
    """The cached cell export of ``cells`` cells under ``work`` (written on first use)."""
    path = work / "qupath" / f"cells_{cells}.geojson"
    return path if path.exists() else write_cell_export(path, cells)


# ------------------------------------------------------------------------------------------ the readers


def read_export(path: str, reader: str, limit: int = 0) -> dict[str, float]:
    """One reader on ``path`` (a child step): features read, wall and CPU seconds, peak RSS in GiB (VmHWM)."""
    if reader == "cellkd":  # imported before the clock starts: geopandas alone takes a second or two
        from cellkd.annotations import read_qupath_geojson
        from cellkd.classes import DEFAULT_CLASSES
    began, cpu = time.perf_counter(), time.process_time()
    if reader == "cellkd":
        n = len(read_qupath_geojson(path, DEFAULT_CLASSES))
    elif reader == "json.load":
        with open(path, "rb") as f:
            n = len(json.load(f)["features"])
    else:
        import ijson

        with open(path, "rb") as f:
            n = sum(1 for _ in itertools.islice(ijson.items(f, "features.item", use_float=True), limit))
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    return {"features": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": peak_rss_mib() / 1024}


def _ijson_available() -> bool:
    try:
        import ijson
    except ImportError:
        return False
    return ijson.backend == "yajl2_c"


def run(ctx: Context) -> list[Row]:
    """features/s and peak RSS of cellkd's reader against json.load (and ijson's, where installed)."""
    n = QUICK_CELLS if ctx.quick else PAPER_CELLS
    began = time.perf_counter()
    path = cell_export(n, ctx.work)
    size_gb = path.stat().st_size / 1e9
    generated_s = time.perf_counter() - began
    new = run_child(read_export, path=str(path), reader="cellkd")
    if new["features"] != n:
        raise RuntimeError(f"read_qupath_geojson read {new['features']} nuclei of {n}")
    old = run_child(read_export, path=str(path), reader="json.load")
    new_rate, old_rate = n / new["seconds"], n / old["seconds"]
    what = f"QuPath 0.5 cell export, {n:,} cells, {size_gb:.2f} GB"
    rows = [
        Row(
            f"QuPath parse: {what}, features/s",
            f"{new_rate:,.0f}",
            f"{old_rate:,.0f} (json.load)",
            f"{new_rate / old_rate:.1f}×",
            f">= {TARGET_FEATURES_PER_S:,}",
            met(new_rate >= TARGET_FEATURES_PER_S),
            f"read_qupath_geojson {new['seconds']:.1f} s vs json.load {old['seconds']:.1f} s wall; per CPU second "
            f"(what a quiet core gives): {n / new['cpu_seconds']:,.0f} vs {n / old['cpu_seconds']:,.0f} features/s "
            f"(file generated in {generated_s:.0f} s if not cached)",
        ),
        Row(
            f"QuPath parse: {what}, peak RSS GiB",
            f"{new['peak_gib']:.2f}",
            f"{old['peak_gib']:.2f} (json.load)",
            f"{old['peak_gib'] / new['peak_gib']:.1f}× less",
            f"<= {TARGET_PEAK_GIB:g}",
            met(new["peak_gib"] <= TARGET_PEAK_GIB),
            "VmHWM of a fresh process per reader (cellkd's includes ~0.15 GiB of imports: geopandas, shapely)",
        ),
    ]
    if _ijson_available():
        limit = min(n, 20_000)
        streamed = run_child(read_export, path=str(path), reader="ijson", limit=limit)
        ijson_rate = streamed["features"] / streamed["seconds"]
        rows.append(
            Row(
                f"QuPath parse: ijson.items (yajl2_c) on {limit:,} cells, features/s",
                f"{new_rate:,.0f}",
                f"{ijson_rate:,.0f} (ijson)",
                f"{new_rate / ijson_rate:.1f}×",
                "–",
                met(None),
                "the other streaming candidate: it builds every feature dict, measurements included; "
                f"{limit / streamed['cpu_seconds']:,.0f} features per CPU second",
            )
        )
    return rows
