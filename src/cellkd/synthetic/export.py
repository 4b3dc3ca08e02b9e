"""QuPath GeoJSON writers for simulated annotation sets, streamed feature by feature.

Two layouts: ``detection`` exports (one polygon per nucleus, what the demo writes) and QuPath 0.5
``cell`` exports (a cell polygon, a ``nucleusGeometry`` and a ``measurements`` dict of about 30
QuPath-like entries per object, as a lab's cell-detection export looks), optionally with some
objects as expert point clicks. Neither holds the whole document in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from scipy.spatial import cKDTree

from cellkd.classes import ClassSpec
from cellkd.store.atomic import atomic_path
from cellkd.synthetic.annotate import Annotation, Stain, deconvolved, measure_nuclei, polygon_moments
from cellkd.synthetic.layout import Nuclei, closed, geojson_polygon
from cellkd.synthetic.render import MEAN_TISSUE_EOSIN, TISSUE_HEMATOXYLIN
from cellkd.synthetic.spec import EOSIN_KEPT_IN_NUCLEUS
from cellkd.types import PathLike

CELL_EXPANSION_UM = 5.0
"""QuPath's default cell expansion around the nucleus; neighbours' cells never overlap (it shrinks to fit)."""

_CHUNK = 1024
# Objects measured and serialised together: vectorised maths, bounded memory at any slide size.


def _classifications(classes: Sequence[ClassSpec]) -> list[dict[str, Any]]:
    return [{"name": c.qupath_name, "color": list(c.color)} for c in classes]


def _write_collection(path: PathLike, features: Iterator[dict[str, Any]], ensure_ascii: bool = True) -> None:
    """Write a FeatureCollection atomically, one feature per line, never holding the whole document."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        stream.write('{"type": "FeatureCollection", "features": [')
        for i, feature in enumerate(features):
            stream.write(("\n" if i == 0 else ",\n") + json.dumps(feature, ensure_ascii=ensure_ascii))
        stream.write("\n]}\n")


def write_detections(path: PathLike, ids: Sequence[str], annotation: Annotation, classes: Sequence[ClassSpec]) -> None:
    """Write a QuPath GeoJSON export atomically: one detection per nucleus, closed rings in level-0 pixels."""
    classifications = _classifications(classes)

    def features() -> Iterator[dict[str, Any]]:
        for uid, ring, label in zip(ids, annotation.rings, annotation.labels.tolist(), strict=True):
            yield {
                "type": "Feature",
                "id": uid,
                "geometry": geojson_polygon(ring),
                "properties": {"objectType": "detection", "classification": classifications[label], "isLocked": False},
            }

    _write_collection(path, features())


def cell_rings(
    rings: npt.NDArray[np.float64],
    centres: npt.NDArray[np.float64],
    neighbours: cKDTree,
    radii: npt.NDArray[np.float64],
    mpp: float,
) -> npt.NDArray[np.float64]:
    """(N, 2K, 2) cell contours: each nucleus contour resampled to 2K vertices and pushed out radially.

    Each ring must be star-shaped around its ``centres`` row, so pushing every vertex away from it keeps
    the nucleus inside its cell. The push is ``CELL_EXPANSION_UM``, shrunk so that bounding circles of
    neighbouring cells stay apart (``neighbours``: a tree of every nucleus centre; ``radii``: every
    nucleus's bounding radius around it).
    """
    offsets = rings - centres[:, None]
    radius = np.linalg.norm(offsets, axis=-1).max(axis=1)
    most = CELL_EXPANSION_UM / mpp
    k = min(9, neighbours.n)
    distance, index = neighbours.query(centres, k=k)
    distance, index = distance.reshape(len(rings), k), index.reshape(len(rings), k)
    # Column 0 is the nucleus itself; half the gap between bounding circles is this cell's share.
    gap = distance[:, 1:] - radius[:, None] - radii[index[:, 1:]]
    expansion = np.clip(gap.min(axis=1, initial=2 * most) / 2, 0, most)
    middle = (offsets + np.roll(offsets, -1, axis=1)) / 2
    dense = np.stack([offsets, middle], axis=2).reshape(len(rings), -1, 2)
    length = np.maximum(np.linalg.norm(dense, axis=-1, keepdims=True), 1e-9)
    return (centres[:, None] + dense * (length + expansion[:, None, None]) / length).round(2)


_CALIPER_ANGLES = np.linspace(0, np.pi, 36, endpoint=False)
# Caliper directions every 5 degrees: the widths found are within cos(2.5°) = 0.1% of the true extremes.


def _calipers(rings: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Max and min caliper diameters (px) of (N, K, 2) rings: the widest and narrowest projected extents."""
    directions = np.stack([np.cos(_CALIPER_ANGLES), np.sin(_CALIPER_ANGLES)])
    projected = (rings - rings.mean(axis=1, keepdims=True)) @ directions  # (N, K, angles)
    widths = projected.max(axis=1) - projected.min(axis=1)
    return widths.max(axis=1), widths.min(axis=1)


def _solidity(area: npt.NDArray[np.float64], rings: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    hull = shapely.area(shapely.convex_hull(shapely.polygons(closed(rings))))
    return np.clip(area / np.maximum(hull, 1e-9), 0, 1)


def cell_measurements(
    rng: np.random.Generator,
    nucleus: npt.NDArray[np.float64],
    cell: npt.NDArray[np.float64],
    concentration: npt.NDArray[np.floating],
    chromatin: npt.NDArray[np.floating],
    stain: Stain,
    mpp: float,
    features: Mapping[str, npt.NDArray[np.float64]] | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """31 QuPath 0.5 cell-detection measurements per object, named as QuPath names them.

    Shape from the contours; stain readings around the nuclei's true concentrations, as colour
    deconvolution with the reference vectors reads them. ``features`` (from the annotator) are reused
    so the exported area and hematoxylin mean are the very values its rules tested.
    """
    if features is None:
        features = measure_nuclei(rng, nucleus, concentration, chromatin, stain, mpp)
    n = len(nucleus)
    n_area, n_perimeter, _ = polygon_moments(nucleus)
    c_area, c_perimeter, _ = polygon_moments(cell)
    n_max, n_min = _calipers(nucleus)
    c_max, c_min = _calipers(cell)
    um2, um = mpp * mpp, mpp
    h_mean = features["hematoxylin"]
    h_sd = np.maximum(features["texture"], 0.01)
    h_cyto, e_cyto = deconvolved(np.array([[TISSUE_HEMATOXYLIN, MEAN_TISSUE_EOSIN]]), stain)[0]
    noise = rng.standard_normal((8, n))
    ratio = np.clip(n_area / np.maximum(c_area, 1e-9), 0, 1)
    h_cyto_mean = h_cyto * (1 + 0.15 * noise[0])
    e_cyto_mean = e_cyto * (1 + 0.10 * noise[1])
    e_nucleus = EOSIN_KEPT_IN_NUCLEUS * e_cyto * (1 + 0.10 * noise[2])
    return {
        "Nucleus: Area µm^2": n_area * um2,
        "Nucleus: Length µm": n_perimeter * um,
        "Nucleus: Circularity": np.clip(4 * math.pi * n_area / n_perimeter**2, 0, 1),
        "Nucleus: Solidity": _solidity(n_area, nucleus),
        "Nucleus: Max diameter µm": n_max * um,
        "Nucleus: Min diameter µm": n_min * um,
        "Cell: Area µm^2": c_area * um2,
        "Cell: Length µm": c_perimeter * um,
        "Cell: Circularity": np.clip(4 * math.pi * c_area / c_perimeter**2, 0, 1),
        "Cell: Solidity": _solidity(c_area, cell),
        "Cell: Max diameter µm": c_max * um,
        "Cell: Min diameter µm": c_min * um,
        "Nucleus/Cell area ratio": ratio,
        "Hematoxylin: Nucleus: Mean": h_mean,
        "Hematoxylin: Nucleus: Median": h_mean + 0.1 * h_sd * noise[3],
        "Hematoxylin: Nucleus: Min": np.maximum(h_mean - 2.5 * h_sd, 0),
        "Hematoxylin: Nucleus: Max": h_mean + 2.5 * h_sd,
        "Hematoxylin: Nucleus: Std.Dev.": h_sd,
        "Hematoxylin: Cytoplasm: Mean": h_cyto_mean,
        "Hematoxylin: Cytoplasm: Std.Dev.": np.abs(0.3 * h_cyto * (1 + 0.2 * noise[4])),
        "Hematoxylin: Cell: Mean": ratio * h_mean + (1 - ratio) * h_cyto_mean,
        "Hematoxylin: Cell: Std.Dev.": np.sqrt(ratio * h_sd**2 + ratio * (1 - ratio) * (h_mean - h_cyto_mean) ** 2),
        "Eosin: Nucleus: Mean": e_nucleus,
        "Eosin: Nucleus: Median": e_nucleus * (1 + 0.02 * noise[5]),
        "Eosin: Nucleus: Min": np.maximum(0.3 * e_nucleus, 0),
        "Eosin: Nucleus: Max": 1.8 * e_nucleus,
        "Eosin: Nucleus: Std.Dev.": np.abs(0.25 * e_nucleus * (1 + 0.2 * noise[6])),
        "Eosin: Cytoplasm: Mean": e_cyto_mean,
        "Eosin: Cytoplasm: Std.Dev.": np.abs(0.2 * e_cyto * (1 + 0.2 * noise[7])),
        "Eosin: Cell: Mean": ratio * e_nucleus + (1 - ratio) * e_cyto_mean,
        "Eosin: Cell: Std.Dev.": np.sqrt(ratio * (1 - ratio)) * np.abs(e_cyto_mean - e_nucleus),
    }


def write_cells(
    path: PathLike,
    rng: np.random.Generator,
    ids: Sequence[str],
    annotation: Annotation,
    nuclei: Nuclei,
    classes: Sequence[ClassSpec],
    stain: Stain,
    mpp: float,
    points: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Write a QuPath 0.5 cell export atomically, computed and serialised ``_CHUNK`` objects at a time.

    Each object: ``objectType`` "cell", the cell polygon as ``geometry``, the nucleus polygon as
    ``nucleusGeometry``, ``classification`` and ``measurements``. Where ``points`` is True (expert
    clicks), the object is instead a point annotation at the nucleus centre, as QuPath exports a click.
    """
    classifications = _classifications(classes)
    every_radius = np.linalg.norm(nuclei.rings - nuclei.centres[:, None], axis=-1).max(axis=1)
    tree = cKDTree(nuclei.centres)

    def features() -> Iterator[dict[str, Any]]:
        for start in range(0, len(annotation.kept), _CHUNK):
            chunk = slice(start, start + _CHUNK)
            which = annotation.kept[chunk]
            nucleus = annotation.rings[chunk]
            cell = cell_rings(nucleus, annotation.centres[chunk], tree, every_radius, mpp)
            measured = None
            if annotation.features is not None:
                measured = {name: values[chunk] for name, values in annotation.features.items()}
            columns = cell_measurements(
                rng, nucleus, cell, nuclei.concentration[which], nuclei.chromatin[which], stain, mpp, measured
            )
            names = list(columns)
            # QuPath keeps measurements as float32 and writes them as doubles: the same long decimals.
            rows = np.stack([columns[name] for name in names], axis=1).astype(np.float32).astype(np.float64).tolist()
            is_point = points[chunk] if points is not None else np.zeros(len(which), bool)
            for k, label in enumerate(annotation.labels[chunk].tolist()):
                uid = ids[start + k]
                if is_point[k]:
                    x, y = annotation.centres[start + k].round(2).tolist()
                    yield {
                        "type": "Feature",
                        "id": uid,
                        "geometry": {"type": "Point", "coordinates": [x, y]},
                        "properties": {"objectType": "annotation", "classification": classifications[label]},
                    }
                    continue
                yield {
                    "type": "Feature",
                    "id": uid,
                    "geometry": geojson_polygon(cell[k]),
                    "nucleusGeometry": geojson_polygon(nucleus[k]),
                    "properties": {
                        "objectType": "cell",
                        "classification": classifications[label],
                        "isLocked": False,
                        "measurements": dict(zip(names, rows[k], strict=True)),
                    },
                }

    _write_collection(path, features(), ensure_ascii=False)
