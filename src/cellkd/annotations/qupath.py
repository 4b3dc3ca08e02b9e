"""QuPath GeoJSON in and out: nuclei (polygons) and point labels with their class, in level-0 slide pixels.

Reading (``read_qupath_annotations``; ``read_qupath_geojson`` for the polygons alone) accepts the
exports of QuPath 0.2 to 0.6, decoded in bounded memory by ``cellkd.annotations.qupath_decode``
(which documents the layouts and which geometry counts: a cell's ``nucleusGeometry``). Then:

- **Polygons** (``Polygon``, ``MultiPolygon``, polygonal parts of a ``GeometryCollection``) are nuclei;
  self-intersecting ones are repaired with ``shapely.make_valid``.
- **Points** (``Point``, and each point of a ``MultiPoint``) are kept apart as point labels: an
  expert's click on a nucleus. ``cellkd.annotations.points.label_nuclei_by_points`` gives each
  nucleus the class of the points inside it.
- **Regions**: ``objectType: "annotation"`` polygons larger than ``max_nucleus_area_um2`` (e.g. a
  tumour outline drawn around the cells) are not nuclei; they are ignored and logged.
- **Unclassified** features are skipped with a warning (``unclassified: skip``) or rejected
  (``error``); features of a class that is not configured are rejected (``unknown_classes: error``)
  or skipped with a warning (``ignore``). Class names are matched by ``class_lookup``.
- Lines and features without geometry are skipped with a warning.

QuPath writes coordinates in full-resolution image pixels, which is the level-0 slide frame used
throughout cellkd, so no transform is applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO, get_args

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely

from cellkd.annotations.qupath_decode import EXPORT_HINT, QuPathObjects, decode_qupath_geojson, gc_paused
from cellkd.errors import AnnotationError, ConfigError
from cellkd.store.atomic import atomic_path

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cellkd.classes import ClassSpec

__all__ = [
    "AnnotationOptions",
    "QuPathAnnotations",
    "QuPathGeoJSONWriter",
    "check_annotations_fit",
    "class_lookup",
    "gc_paused",
    "open_qupath_geojson",
    "read_qupath_annotations",
    "read_qupath_geojson",
    "write_qupath_geojson",
]

log = logging.getLogger(__name__)

Unclassified = Literal["skip", "error"]
UnknownClasses = Literal["error", "ignore"]
_MAX_LISTED = 10
"""How many feature indices a warning or error lists before summarising the rest."""


@dataclass(frozen=True)
class AnnotationOptions:
    """How QuPath exports are read: the config's ``annotations:`` block.

    ``unclassified``: ``skip`` features without a class (warning with their count and first
    indices) or ``error``. ``unknown_classes``: ``error`` on a class name no configured class
    matches, or ``ignore`` those features (warning). ``max_nucleus_area_um2``: ``objectType:
    "annotation"`` polygons larger than this are regions (an outline around cells), not nuclei.
    """

    unclassified: Unclassified = "skip"
    unknown_classes: UnknownClasses = "error"
    max_nucleus_area_um2: float = 2000.0

    def __post_init__(self) -> None:
        if self.unclassified not in get_args(Unclassified):
            raise ValueError(f"unclassified must be one of {get_args(Unclassified)}, got {self.unclassified!r}")
        if self.unknown_classes not in get_args(UnknownClasses):
            msg = f"unknown_classes must be one of {get_args(UnknownClasses)}, got {self.unknown_classes!r}"
            raise ValueError(msg)
        if not (math.isfinite(self.max_nucleus_area_um2) and self.max_nucleus_area_um2 > 0):
            raise ValueError(f"max_nucleus_area_um2 must be a positive number, got {self.max_nucleus_area_um2!r}")

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None, source: str = "workflow_config.yaml") -> AnnotationOptions:
        """Options from the config's ``annotations:`` mapping (missing keys keep their defaults)."""
        try:
            return cls(**dict(block or {}))
        except (TypeError, ValueError) as err:
            msg = (
                f"{source}: annotations: {dict(block or {})!r} is invalid ({err}); expected keys unclassified "
                "(skip|error), unknown_classes (error|ignore) and max_nucleus_area_um2 (a positive number)"
            )
            raise ConfigError(msg) from err


@dataclass(frozen=True)
class QuPathAnnotations:
    """What one QuPath GeoJSON file says about nuclei.

    ``nuclei``: one row per nucleus polygon: ``geometry`` (valid shapely Polygon or MultiPolygon),
    ``class_index`` (int64 into the classes) and ``feature_index`` (int64, its position in the file).
    ``points``: one row per point label, same columns with Point geometries; the points of a
    ``MultiPoint`` feature share its ``feature_index``.
    """

    nuclei: gpd.GeoDataFrame
    points: gpd.GeoDataFrame


def _indices_text(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_MAX_LISTED])
    more = len(indices) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def class_lookup(classes: Sequence[ClassSpec]) -> dict[str, int]:
    """Map the ``qupath_name``, ``aliases`` and ``name`` of every class to its index, case-insensitively.

    Keys are stripped and case-folded: look a QuPath class name up with ``name.strip().casefold()``,
    so "Immune cells", "immune cells " and "IMMUNE CELLS" are one class. This is the single lookup
    of QuPath class names in cellkd. Raises ``ValueError`` when two classes share a name
    case-insensitively (the mapping would be ambiguous).
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


def _frame(geometry: np.ndarray, class_index: np.ndarray, feature_index: np.ndarray) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"class_index": class_index.astype(np.int64), "feature_index": feature_index.astype(np.int64)},
        geometry=gpd.GeoSeries(geometry),
    )


def _polygonal_part(geometry: shapely.Geometry) -> shapely.Geometry:
    """The Polygon/MultiPolygon part of ``geometry`` (e.g. of ``make_valid`` output); empty when none."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = shapely.get_parts(shapely.get_parts(geometry))  # twice: collections may hold multipolygons
    polygons = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    if not polygons:
        return shapely.Polygon()
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


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


def _regions(
    objects: QuPathObjects, polygonal: np.ndarray, options: AnnotationOptions, mpp: float | None
) -> np.ndarray:
    """bool (N,): annotation-object polygons larger than ``max_nucleus_area_um2`` (outlines, not nuclei)."""
    annotation = objects.is_object_type("annotation") & polygonal
    if not annotation.any():
        return annotation
    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        log.warning(
            "%s: slide resolution unknown, so %d objectType 'annotation' polygons are all taken as nuclei "
            "(none is set aside as a region larger than %g µm²)",
            objects.path,
            int(annotation.sum()),
            options.max_nucleus_area_um2,
        )
        return np.zeros_like(annotation)
    regions = annotation.copy()
    regions[annotation] = shapely.area(objects.geometry[annotation]) * mpp**2 > options.max_nucleus_area_um2
    if regions.any():
        log.info(
            "%s: ignored %d objectType 'annotation' regions larger than %g µm² (outlines, not nuclei): feature %s",
            objects.path,
            int(regions.sum()),
            options.max_nucleus_area_um2,
            _indices_text(objects.feature_index[regions].tolist()),
        )
    return regions


def _class_indices(
    objects: QuPathObjects, used: np.ndarray, classes: Sequence[ClassSpec], options: AnnotationOptions
) -> np.ndarray:
    """int64 (N,) class index per row: -1 unclassified, -2 unknown class; applies the options to ``used`` rows."""
    lookup = class_lookup(classes)
    by_code = np.asarray([lookup.get(name.strip().casefold(), -2) for name in objects.class_names] + [-1])
    class_index = by_code[objects.class_code].astype(np.int64)  # code -1 (unclassified) picks the last entry
    path = objects.path
    unclassified = objects.feature_index[used & (class_index == -1)].tolist()
    if unclassified:
        text = _indices_text(unclassified)
        if options.unclassified == "error":
            msg = (
                f"{path}: feature {text} ({len(unclassified)} in all) has no classification; classify every "
                "nucleus in QuPath (or delete the unclassified ones) and export again, or set "
                "annotations: unclassified: skip in workflow_config.yaml to leave them out"
            )
            raise AnnotationError(msg)
        log.warning("%s: skipped %d unclassified features: feature %s", path, len(unclassified), text)
    unknown_rows = used & (class_index == -2)
    if unknown_rows.any():
        unknown: dict[str, list[int]] = {}
        for code, index in zip(objects.class_code[unknown_rows], objects.feature_index[unknown_rows], strict=True):
            unknown.setdefault(objects.class_names[code], []).append(int(index))
        found = "; ".join(f"{name!r} (feature {_indices_text(i)})" for name, i in sorted(unknown.items()))
        if options.unknown_classes == "ignore":
            log.warning("%s: skipped %d features of unknown classes: %s", path, int(unknown_rows.sum()), found)
        else:
            expected = ", ".join(repr(spec.qupath_name) for spec in classes)
            msg = (
                f"{path}: unknown class {found}; expected QuPath names {expected} (or their aliases); "
                "rename the class in QuPath, or add the name under classes: in workflow_config.yaml "
                "as the qupath_name or one of the aliases of the class it belongs to, or set "
                "annotations: unknown_classes: ignore to leave those features out"
            )
            raise AnnotationError(msg)
    return class_index


def read_qupath_annotations(
    path: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    *,
    options: AnnotationOptions | None = None,
    mpp: float | None = None,
    allow_empty: bool = False,
) -> QuPathAnnotations:
    """Read the nuclei (polygons) and point labels of a QuPath GeoJSON export, with their classes.

    ``options``: the config's ``annotations:`` block (defaults: skip unclassified features, reject
    unknown classes, regions above 2000 µm²). ``mpp``: level-0 µm/px of the slide, needed to set
    large ``annotation`` regions aside (without it none is, with a warning). See the module
    docstring for what is kept. Raises ``AnnotationError`` (naming the file and the fix) for a file
    that is not (QuPath) GeoJSON, has no features, or holds neither a nucleus nor a point once the
    skipped features are left out. With ``allow_empty`` (cellkd's own predictions for a slide with no
    nucleus), a file with no features gives empty frames instead.
    """
    options = options or AnnotationOptions()
    path = Path(path)
    with gc_paused():
        objects = decode_qupath_geojson(path)
    if objects.n_features == 0:
        if allow_empty:
            empty = np.zeros(0, dtype=np.int64)
            return QuPathAnnotations(
                _frame(np.empty(0, object), empty, empty), _frame(np.empty(0, object), empty, empty)
            )
        raise AnnotationError(f"{path}: no features; {EXPORT_HINT}")
    type_id = shapely.get_type_id(objects.geometry)
    kind = shapely.GeometryType
    polygonal = np.isin(type_id, [kind.POLYGON, kind.MULTIPOLYGON, kind.GEOMETRYCOLLECTION])
    pointlike = np.isin(type_id, [kind.POINT, kind.MULTIPOINT])
    lines = objects.feature_index[~(polygonal | pointlike)].tolist()
    regions = _regions(objects, polygonal, options, mpp)
    used = (polygonal & ~regions) | pointlike
    class_index = _class_indices(objects, used, classes, options)
    known = class_index >= 0

    nucleus_rows = np.flatnonzero(polygonal & ~regions & known)
    shapes, keep = _repair(path, objects.geometry[nucleus_rows], objects.feature_index[nucleus_rows])
    nucleus_rows = nucleus_rows[keep]
    nuclei = _frame(shapes[keep], class_index[nucleus_rows], objects.feature_index[nucleus_rows])

    point_rows = np.flatnonzero(pointlike & known)
    parts, owner = shapely.get_parts(objects.geometry[point_rows], return_index=True)
    point_rows = point_rows[owner]
    points = _frame(parts, class_index[point_rows], objects.feature_index[point_rows])

    _warn_skipped(objects, lines)
    if len(nuclei) == 0 and len(points) == 0:
        msg = (
            f"{path}: no usable nucleus polygon or point among {objects.n_features} features "
            f"({len(lines)} lines, {len(objects.no_geometry)} without geometry, {int(regions.sum())} large regions, "
            f"{int((used & ~known).sum())} unclassified or of unknown class); {EXPORT_HINT}"
        )
        raise AnnotationError(msg)
    counts = Counter(nuclei["class_index"].tolist())
    summary = ", ".join(f"{spec.name} {counts[k]}" for k, spec in enumerate(classes))
    log.info("%s: %d nuclei (%s), %d point labels", path, len(nuclei), summary, len(points))
    return QuPathAnnotations(nuclei, points)


def _warn_skipped(objects: QuPathObjects, lines: list[int]) -> None:
    skipped = (
        (objects.no_geometry, "skipped %d features without geometry: %s"),
        (lines, "skipped %d LineString features (nuclei are polygons or points): %s"),
        (objects.cells_without_nucleus, "%d cell objects have no nucleusGeometry; used their cell boundary: %s"),
    )
    for indices, text in skipped:
        if indices:
            log.warning("%s: " + text, objects.path, len(indices), _indices_text(indices))


def read_qupath_geojson(
    path: str | os.PathLike[str],
    classes: Sequence[ClassSpec],
    *,
    options: AnnotationOptions | None = None,
    mpp: float | None = None,
    allow_empty: bool = False,
) -> gpd.GeoDataFrame:
    """The nucleus polygons of a QuPath GeoJSON export: ``read_qupath_annotations(...).nuclei``.

    Columns ``class_index``, ``feature_index``, ``geometry`` (see ``QuPathAnnotations``). Point
    labels are left out with a warning (masks are drawn from polygons). Raises ``AnnotationError``
    when the file holds no nucleus polygon (unless ``allow_empty`` and it has no features at all).
    """
    annotations = read_qupath_annotations(path, classes, options=options, mpp=mpp, allow_empty=allow_empty)
    if len(annotations.points):
        log.warning(
            "%s: %d point labels are not drawn into masks (only polygons are); they label nuclei in the nuclei stage",
            path,
            len(annotations.points),
        )
    if len(annotations.nuclei) == 0 and len(annotations.points):
        msg = (
            f"{path}: holds {len(annotations.points)} point labels and no nucleus polygon, so no mask can be drawn "
            "from it; export the nuclei as polygons (detections or cells) for this annotation set"
        )
        raise AnnotationError(msg)
    return annotations.nuclei


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
    boundary and ``nucleusGeometry`` are both the nucleus outline. To write more nuclei than fit in
    memory at once, use ``open_qupath_geojson`` (the same file, written chunk by chunk).
    """
    with open_qupath_geojson(path, classes, object_type) as writer:
        writer.write(geometries, class_indices, measurements)


@contextlib.contextmanager
def open_qupath_geojson(
    path: str | os.PathLike[str], classes: Sequence[ClassSpec], object_type: str = "detection"
) -> Iterator[QuPathGeoJSONWriter]:
    """A ``QuPathGeoJSONWriter`` streaming into ``path``, which appears only when the block ends without error.

    The features go straight to a temporary sibling (``cellkd.store.atomic.atomic_path``), so memory holds
    one chunk of them, not the file; an error or a kill mid-write leaves no file at ``path``.
    Raises ``ValueError`` for an ``object_type`` other than ``"detection"`` or ``"cell"``.
    """
    if object_type not in ("detection", "cell"):
        raise ValueError(f"object_type must be 'detection' or 'cell', got {object_type!r}")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        writer = QuPathGeoJSONWriter(file, classes, object_type)
        yield writer
        writer.close()
    log.info("%s: wrote %d detections", path, writer.count)


class QuPathGeoJSONWriter:
    """Writes a QuPath GeoJSON FeatureCollection to an open text file, one chunk of nuclei per ``write``.

    Made by ``open_qupath_geojson`` (which makes the file atomic). The file is the same, byte for byte,
    however the nuclei are split into chunks: one feature per line, in the order written.
    """

    def __init__(self, file: TextIO, classes: Sequence[ClassSpec], object_type: str) -> None:
        self._file = file
        self._classes = len(classes)
        self._classifications = [json.dumps({"name": s.qupath_name, "color": list(s.color)}) for s in classes]
        self._object_type = object_type
        self.count = 0
        """Features written so far."""
        file.write('{"type":"FeatureCollection","features":[\n')

    def write(
        self,
        geometries: Iterable[shapely.Geometry] | gpd.GeoSeries,
        class_indices: npt.ArrayLike,
        measurements: Mapping[str, npt.ArrayLike] | None = None,
    ) -> None:
        """Append N nuclei: the arguments of ``write_qupath_geojson`` (raises its ``ValueError`` for bad input)."""
        shapes = np.asarray(
            list(geometries.values if isinstance(geometries, gpd.GeoSeries) else geometries), dtype=object
        )
        labels = np.asarray(class_indices)
        n = len(shapes)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"class_indices must be {n} integers (one per geometry), got {labels.dtype} {labels.shape}"
            )
        if n and (labels.min() < 0 or labels.max() >= self._classes):
            raise ValueError(f"class_indices must lie in 0..{self._classes - 1}, got {labels.min()}..{labels.max()}")
        if n and (shapely.is_missing(shapes).any() or not np.all(shapely.is_geometry(shapes))):
            raise ValueError("geometries must all be shapely geometries (found None or another type)")
        columns: dict[str, np.ndarray] = {}
        for name, values in (measurements or {}).items():
            array = np.asarray(values, dtype=np.float64)
            if array.shape != (n,):
                raise ValueError(f"measurement {name!r} must have shape ({n},), got {array.shape}")
            columns[name] = array
        if not n:
            return
        names = list(columns)
        values = np.column_stack([columns[k] for k in names]).tolist() if names else [[]] * n
        features = []
        for geometry, label, row in zip(shapely.to_geojson(shapes), labels.tolist(), values, strict=True):
            properties = '{"objectType":"' + self._object_type + '","classification":' + self._classifications[label]
            if names:
                finite = {k: v for k, v in zip(names, row, strict=True) if math.isfinite(v)}
                properties += ',"measurements":' + json.dumps(finite)
            nucleus = ',"nucleusGeometry":' + geometry if self._object_type == "cell" else ""
            features.append('{"type":"Feature","geometry":' + geometry + nucleus + ',"properties":' + properties + "}}")
        # Features are separated by ",\n": the first of the file has none before it.
        self._file.write((",\n" if self.count else "") + ",\n".join(features))
        self.count += n

    def close(self) -> None:
        """End the FeatureCollection (``open_qupath_geojson`` calls it when its block ends without error)."""
        self._file.write("\n]}\n")
