"""QuPath GeoJSON in and out: nucleus polygons with their class, in level-0 slide pixels.

Reading accepts the exports of QuPath 0.2 to 0.6:

- a ``FeatureCollection``, a bare JSON list of features (QuPath 0.2 scripts) or a single ``Feature``;
- ``Polygon``, ``MultiPolygon`` and ``GeometryCollection`` geometries (polygonal parts kept);
- cell objects: their ``nucleusGeometry`` (a top-level Feature key, or under ``properties`` in some
  versions) is used instead of the cell boundary;
- ``classification`` as ``{"name", "color"}`` (0.3+), ``{"name", "colorRGB"}`` (0.2),
  ``{"names": [...]}`` (derived classes, joined with ``": "`` as QuPath displays them) or a bare string.

QuPath writes coordinates in full-resolution image pixels, which is the level-0 slide frame used
throughout cellkd, so no transform is applied.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely
import shapely.geometry

from cellkd.errors import AnnotationError
from cellkd.store.atomic import atomic_write_text

if TYPE_CHECKING:
    from cellkd.classes import ClassSpec

log = logging.getLogger(__name__)

EXPORT_HINT = (
    "export the detections from QuPath with File > Export objects as GeoJSON "
    "(QuPath 0.4+; File > Object data > Export as GeoJSON in 0.3), objects 'detections' or 'cells'"
)
POLYGONAL = ("Polygon", "MultiPolygon", "GeometryCollection")
NON_POLYGONAL = ("Point", "MultiPoint", "LineString", "MultiLineString")
_MAX_LISTED = 10
"""How many feature indices a warning or error lists before summarising the rest."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building millions of small containers.

    Parsing a 250 MB QuPath export creates ~10^7 lists and dicts without reference cycles; the
    collector would re-traverse all of them again and again as they are allocated (8x slower).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _indices_text(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_MAX_LISTED])
    more = len(indices) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def class_lookup(classes: Sequence[ClassSpec]) -> dict[str, int]:
    """Map the case-folded ``qupath_name``, ``aliases`` and ``name`` of every class to its index.

    Raises ``ValueError`` when two classes share a name case-insensitively (the mapping would be ambiguous).
    """
    lookup: dict[str, int] = {}
    for index, spec in enumerate(classes):
        for label in (spec.qupath_name, *spec.aliases, spec.name):
            key = label.strip().casefold()
            if lookup.get(key, index) != index:
                msg = (
                    f"class name {label!r} is used by classes {classes[lookup[key]].name!r} and {spec.name!r} "
                    "(compared case-insensitively); make it unique under classes: in workflow_config.yaml"
                )
                raise ValueError(msg)
            lookup[key] = index
    return lookup


def _load_features(path: Path, allow_empty: bool = False) -> list[Any]:
    """The list of features in a QuPath GeoJSON file (FeatureCollection, bare list or single Feature)."""
    try:
        with path.open("rb") as stream:
            data = json.load(stream)
    except FileNotFoundError as err:
        raise AnnotationError(f"{path}: annotation file does not exist; check its path in the slide sheet") from err
    except OSError as err:
        raise AnnotationError(
            f"{path}: cannot read the annotation file ({err}); check its path and permissions"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err}); {EXPORT_HINT}") from err
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: not GeoJSON: the FeatureCollection has no 'features' list; {EXPORT_HINT}")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        found = data.get("type") if isinstance(data, dict) else type(data).__name__
        msg = f"{path}: not GeoJSON: expected a FeatureCollection or a list of Features, found {found!r}; {EXPORT_HINT}"
        raise AnnotationError(msg)
    if not features and not allow_empty:
        raise AnnotationError(f"{path}: no features; {EXPORT_HINT}")
    return features


def _class_name(properties: Mapping[str, Any]) -> str | None:
    """QuPath class name of a feature, or None when it is unclassified."""
    classification = properties.get("classification")
    if isinstance(classification, str):
        return classification
    if not isinstance(classification, Mapping):
        return None
    name = classification.get("name")
    if isinstance(name, str):
        return name
    names = classification.get("names")  # derived classes ("Tumor: Positive") in QuPath 0.4+
    if isinstance(names, list) and names:
        return ": ".join(str(n) for n in names)
    return None


def _polygons_from_coordinates(polygons: list[Any]) -> npt.NDArray[np.object_]:
    """Shapely Polygons from GeoJSON ``Polygon.coordinates`` lists, built in one vectorized call.

    Raises ``ValueError``/``TypeError`` on malformed coordinates (e.g. 3-D points); the caller then
    falls back to per-feature parsing to name the bad feature.
    """
    rings = list(chain.from_iterable(polygons))
    ring_sizes = np.fromiter((len(r) for r in rings), np.int64, len(rings))
    rings_per_polygon = np.fromiter((len(p) for p in polygons), np.int64, len(polygons))
    # One float pair per vertex: a vertex with 1 or 3 values raises here instead of shifting the rest.
    coords = np.fromiter(chain.from_iterable(rings), dtype=np.dtype((np.float64, 2)), count=int(ring_sizes.sum()))
    if ring_sizes.size == 0 or rings_per_polygon.min() == 0 or ring_sizes.min() == 0:
        # Grouping by indices would silently drop empty parts; per-feature parsing handles them.
        raise ValueError("a polygon or ring without coordinates")
    ring_of_vertex = np.repeat(np.arange(len(rings)), ring_sizes)
    polygon_of_ring = np.repeat(np.arange(len(polygons)), rings_per_polygon)
    # Per-ring and per-polygon grouping by indices: much faster than shapely.from_ragged_array in shapely 2.0.
    linear_rings = shapely.linearrings(coords, indices=ring_of_vertex)
    if rings_per_polygon.max() == 1:
        return shapely.polygons(linear_rings)
    return shapely.polygons(linear_rings, indices=polygon_of_ring)


def _polygonal_part(geometry: shapely.Geometry) -> shapely.Geometry:
    """The Polygon/MultiPolygon part of ``geometry`` (e.g. of ``make_valid`` output); empty when none."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = shapely.get_parts(shapely.get_parts(geometry))  # twice: collections may hold multipolygons
    polygons = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    if not polygons:
        return shapely.Polygon()
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


def _build_geometries(path: Path, geometries: list[Mapping[str, Any]], feature_index: list[int]) -> np.ndarray:
    """Shapely geometries (level-0 pixels, 2-D) for GeoJSON geometry dicts; AnnotationError names a bad one."""
    out = np.empty(len(geometries), dtype=object)
    is_polygon = np.fromiter((g["type"] == "Polygon" for g in geometries), bool, len(geometries))
    slow = np.flatnonzero(~is_polygon)
    fast = np.flatnonzero(is_polygon)
    try:
        out[fast] = _polygons_from_coordinates([geometries[i]["coordinates"] for i in fast])
    except (ValueError, TypeError, KeyError, shapely.errors.GEOSException):
        slow = np.arange(len(geometries))
    for i in slow:
        try:
            out[i] = shapely.geometry.shape(geometries[i])
        except Exception as err:  # shapely raises many types on malformed input
            kind = geometries[i].get("type")
            msg = f"{path}: feature {feature_index[i]} has malformed {kind} coordinates ({err}); {EXPORT_HINT}"
            raise AnnotationError(msg) from err
    if shapely.has_z(out).any():
        out = shapely.force_2d(out)
    return out


def read_qupath_geojson(
    path: str | os.PathLike[str], classes: Sequence[ClassSpec], *, allow_empty: bool = False
) -> gpd.GeoDataFrame:
    """Read nucleus polygons and their classes from a QuPath GeoJSON export.

    Returns a GeoDataFrame with one row per usable feature: ``geometry`` (shapely Polygon or
    MultiPolygon, level-0 slide pixels), ``class_index`` (int64, index into ``classes``) and
    ``feature_index`` (int64, position of the feature in the file). Class names match a class's
    ``qupath_name``, ``aliases`` or ``name``, case-insensitively.

    Features with Point/LineString geometry or no geometry are skipped with a logged warning;
    self-intersecting polygons are repaired with ``shapely.make_valid`` (polygonal parts kept).
    Raises ``AnnotationError`` for a file that is not (QuPath) GeoJSON, has no features, has
    unclassified or unknown-class features, or has no polygon left after skipping. With
    ``allow_empty`` (cellkd's own predictions for a slide with no nucleus), a file with no features
    gives an empty frame instead.
    """
    with gc_paused():
        return _read_qupath_geojson(Path(path), classes, allow_empty)


@dataclass
class _Collected:
    """Features sorted out by ``_collect``: usable ones (geometry dict, class, position) and the rest."""

    geometries: list[Mapping[str, Any]] = field(default_factory=list)
    class_index: list[int] = field(default_factory=list)
    feature_index: list[int] = field(default_factory=list)
    no_geometry: list[int] = field(default_factory=list)
    non_polygonal: list[int] = field(default_factory=list)
    cells_without_nucleus: list[int] = field(default_factory=list)
    unclassified: list[int] = field(default_factory=list)
    unknown: dict[str, list[int]] = field(default_factory=dict)


def _collect(path: Path, features: list[Any], lookup: Mapping[str, int]) -> _Collected:
    """Sort features into usable polygons (nucleus geometry, known class) and the kinds of unusable ones."""
    out = _Collected()
    for i, feature in enumerate(features):
        if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
            found = feature.get("type") if isinstance(feature, Mapping) else type(feature).__name__
            raise AnnotationError(f"{path}: not GeoJSON: feature {i} is a {found!r}, not a 'Feature'; {EXPORT_HINT}")
        properties = feature.get("properties") or {}
        geometry = feature.get("nucleusGeometry") or properties.get("nucleusGeometry")
        if geometry is None:
            geometry = feature.get("geometry")
            if properties.get("objectType") == "cell" or feature.get("id") == "PathCellObject":
                out.cells_without_nucleus.append(i)
        if not isinstance(geometry, Mapping):
            out.no_geometry.append(i)
            continue
        kind = geometry.get("type")
        if kind in NON_POLYGONAL:
            out.non_polygonal.append(i)
            continue
        if kind not in POLYGONAL:
            raise AnnotationError(f"{path}: feature {i} has unknown geometry type {kind!r}; {EXPORT_HINT}")
        name = _class_name(properties)
        if name is None:
            out.unclassified.append(i)
            continue
        index = lookup.get(name.strip().casefold())
        if index is None:
            out.unknown.setdefault(name, []).append(i)
            continue
        out.geometries.append(geometry)
        out.class_index.append(index)
        out.feature_index.append(i)
    return out


def _report(path: Path, collected: _Collected, classes: Sequence[ClassSpec]) -> None:
    """Raise for unclassified or unknown-class features; log the skipped ones."""
    if collected.unclassified:
        indices = collected.unclassified
        msg = (
            f"{path}: feature {_indices_text(indices)} ({len(indices)} in all) has no classification; "
            "classify every nucleus in QuPath (or delete the unclassified ones) and export again"
        )
        raise AnnotationError(msg)
    if collected.unknown:
        found = "; ".join(f"{name!r} (feature {_indices_text(i)})" for name, i in sorted(collected.unknown.items()))
        expected = ", ".join(repr(spec.qupath_name) for spec in classes)
        msg = (
            f"{path}: unknown class {found}; expected QuPath names {expected} (or their aliases); "
            "rename the class in QuPath, or add the name under classes: in workflow_config.yaml "
            "as the qupath_name or one of the aliases of the class it belongs to"
        )
        raise AnnotationError(msg)
    skipped = (
        (collected.no_geometry, "skipped %d features without geometry: %s"),
        (collected.non_polygonal, "skipped %d Point/LineString features (nuclei must be polygons): %s"),
        (collected.cells_without_nucleus, "%d cell objects have no nucleusGeometry; used their cell boundary: %s"),
    )
    for indices, text in skipped:
        if indices:
            log.warning("%s: " + text, path, len(indices), _indices_text(indices))


def _read_qupath_geojson(path: Path, classes: Sequence[ClassSpec], allow_empty: bool) -> gpd.GeoDataFrame:
    features = _load_features(path, allow_empty)
    if not features:
        empty = np.zeros(0, dtype=np.int64)
        return gpd.GeoDataFrame({"class_index": empty, "feature_index": empty}, geometry=gpd.GeoSeries([]))
    collected = _collect(path, features, class_lookup(classes))
    _report(path, collected, classes)
    feature_index = np.asarray(collected.feature_index, dtype=np.int64)
    shapes = _build_geometries(path, collected.geometries, collected.feature_index)
    shapes, keep = _repair(path, shapes, feature_index)
    if not keep.any():
        msg = (
            f"{path}: no usable polygon among {len(features)} features ({len(collected.non_polygonal)} "
            f"Point/LineString, {len(collected.no_geometry)} without geometry, {len(shapes)} empty); {EXPORT_HINT}"
        )
        raise AnnotationError(msg)
    frame = gpd.GeoDataFrame(
        {"class_index": np.asarray(collected.class_index, dtype=np.int64)[keep], "feature_index": feature_index[keep]},
        geometry=gpd.GeoSeries(shapes[keep]),
    )
    counts = Counter(frame["class_index"].tolist())
    summary = ", ".join(f"{spec.name} {counts[k]}" for k, spec in enumerate(classes))
    log.info("%s: %d nuclei (%s)", path, len(frame), summary)
    return frame


def _repair(path: Path, shapes: np.ndarray, feature_index: np.ndarray) -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
    """Make invalid polygons valid (polygonal parts kept) and flag empty ones; returns (shapes, keep)."""
    shapes = shapes.copy()
    if len(shapes) == 0:
        return shapes, np.zeros(0, dtype=bool)
    invalid = np.flatnonzero(~shapely.is_valid(shapes))
    if invalid.size:
        log.warning(
            "%s: repaired %d self-intersecting/invalid polygons with shapely.make_valid: feature %s",
            path,
            invalid.size,
            _indices_text(feature_index[invalid].tolist()),
        )
        shapes[invalid] = [_polygonal_part(g) for g in shapely.make_valid(shapes[invalid])]
    # GeometryCollections valid from the start still need their non-polygonal parts dropped.
    collections = np.flatnonzero(shapely.get_type_id(shapes) == shapely.GeometryType.GEOMETRYCOLLECTION)
    shapes[collections] = [_polygonal_part(g) for g in shapes[collections]]
    empty = shapely.is_empty(shapes) | (shapely.area(shapes) <= 0)
    if empty.any():
        log.warning(
            "%s: dropped %d empty or zero-area polygons: feature %s",
            path,
            int(empty.sum()),
            _indices_text(feature_index[empty].tolist()),
        )
    return shapes, ~empty


def check_annotations_fit(
    annotations: gpd.GeoDataFrame,
    slide_width: int,
    slide_height: int,
    path: str | os.PathLike[str],
    max_outside_fraction: float = 0.01,
) -> None:
    """Raise ``AnnotationError`` when the annotations do not fit a slide of ``slide_width x slide_height``.

    A nucleus counts as outside when its centroid (level-0 pixels) falls outside ``[0, w] x [0, h]``.
    More than ``max_outside_fraction`` of them outside means the file belongs to another slide or
    another coordinate frame. Nuclei merely crossing the slide edge are fine (rasterization clips them).
    """
    if len(annotations) == 0:
        return
    centroids = shapely.centroid(np.asarray(annotations.geometry.values))
    x, y = shapely.get_x(centroids), shapely.get_y(centroids)
    outside = ~((x >= 0) & (x <= slide_width) & (y >= 0) & (y <= slide_height))
    fraction = float(outside.mean())
    if fraction > max_outside_fraction:
        x0, y0, x1, y1 = (round(float(v)) for v in annotations.total_bounds)
        msg = (
            f"{path}: {int(outside.sum())} of {len(annotations)} nuclei ({fraction:.1%}) lie outside the slide "
            f"({slide_width} x {slide_height} px; the annotations span x {x0}..{x1}, y {y0}..{y1}); "
            "this GeoJSON probably belongs to another slide (check the slide sheet) "
            "or was exported from a cropped/rescaled image"
        )
        raise AnnotationError(msg)
    if outside.any():
        log.warning("%s: %d nuclei lie outside the slide and are ignored", path, int(outside.sum()))


def write_qupath_geojson(
    path: str | os.PathLike[str],
    geometries: Iterable[shapely.Geometry] | gpd.GeoSeries,
    class_indices: npt.ArrayLike,
    classes: Sequence[ClassSpec],
    measurements: Mapping[str, npt.ArrayLike] | None = None,
    object_type: str = "detection",
) -> None:
    """Write classified nuclei as a QuPath-importable GeoJSON FeatureCollection of detections (atomic).

    ``geometries``: N shapely polygons in level-0 slide pixels; ``class_indices``: (N,) ints into
    ``classes``; ``measurements``: name -> (N,) numbers, written as QuPath's measurement map
    (non-finite values are left out, which QuPath shows as NaN). Import with File > Import objects
    (or drag the file onto the QuPath viewer). ``object_type`` ``"cell"`` writes cell objects whose
    boundary and ``nucleusGeometry`` are both the nucleus outline.
    """
    if object_type not in ("detection", "cell"):
        raise ValueError(f"object_type must be 'detection' or 'cell', got {object_type!r}")
    shapes = np.asarray(list(geometries.values if isinstance(geometries, gpd.GeoSeries) else geometries), dtype=object)
    labels = np.asarray(class_indices)
    n = len(shapes)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class_indices must be {n} integers (one per geometry), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"class_indices must lie in 0..{len(classes) - 1}, got {labels.min()}..{labels.max()}")
    if n and (shapely.is_missing(shapes).any() or not np.all(shapely.is_geometry(shapes))):
        raise ValueError("geometries must all be shapely geometries (found None or another type)")
    columns: dict[str, np.ndarray] = {}
    for name, values in (measurements or {}).items():
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (n,):
            raise ValueError(f"measurement {name!r} must have shape ({n},), got {array.shape}")
        columns[name] = array

    classifications = [json.dumps({"name": spec.qupath_name, "color": list(spec.color)}) for spec in classes]
    geometry_json = shapely.to_geojson(shapes) if n else np.empty(0, dtype=object)
    names = list(columns)
    values = np.column_stack([columns[k] for k in names]).tolist() if names else [[]] * n
    features = []
    for geometry, label, row in zip(geometry_json, labels.tolist(), values, strict=True):
        properties = '{"objectType":"' + object_type + '","classification":' + classifications[label]
        if names:
            finite = {k: v for k, v in zip(names, row, strict=True) if math.isfinite(v)}
            properties += ',"measurements":' + json.dumps(finite)
        nucleus = ',"nucleusGeometry":' + geometry if object_type == "cell" else ""
        features.append('{"type":"Feature","geometry":' + geometry + nucleus + ',"properties":' + properties + "}}")
    text = '{"type":"FeatureCollection","features":[\n' + ",\n".join(features) + "\n]}\n"
    atomic_write_text(path, text)
    log.info("%s: wrote %d detections", path, n)
