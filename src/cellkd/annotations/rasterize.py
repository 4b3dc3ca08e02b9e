"""Rasterize nucleus polygons into per-class masks aligned with the fragment store.

The GeoJSON is in the slide's level-0 px; ``write_mask_store`` scales it to the fragment store's working
px (``SlideGeometry``) before burning, so masks and fragment pixels share one grid. Below, "level-0" means
working px (the same thing when the slide is not resampled).

Pixel convention: pixel ``(r, c)`` of fragment level ``k`` (downsample ``d``) covers the level-0
square ``[x + d*c, x + d*(c+1)) x [y + d*r, y + d*(r+1))`` where ``(x, y)`` is the fragment origin;
it is set when its **centre** ``(x + d*(c + 0.5), y + d*(r + 0.5))`` lies inside a polygon
(GDAL's rule, ``all_touched=False``). So an axis-aligned square with corners on multiples of
``d`` covers exactly ``(side / d)**2`` pixels at level ``k``.

Each class has its own channel and gets only its own polygons: where polygons of two classes
overlap, the pixel is set in both channels. Holes (interior rings) stay empty, and polygons that
cross the fragment edge are clipped to it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import shapely
from rasterio import features as rio_features
from rasterio.transform import Affine

from cellkd.annotations.qupath import AnnotationOptions, check_annotations_fit, gc_paused, read_qupath_geojson
from cellkd.store.atomic import atomic_h5
from cellkd.store.compression import COMPRESSION
from cellkd.store.fragments import CHUNK, Fragment, FragmentStore
from cellkd.types import DOWNSAMPLES, ClassMask
from cellkd.workflow import progress

if TYPE_CHECKING:
    from cellkd.classes import ClassSpec

log = logging.getLogger(__name__)

BAND_BYTES = 64 * 2**20
"""Memory budget (bytes) of one band of mask rows rasterized at once."""


@dataclass(frozen=True)
class _FragmentShapes:
    """The nuclei near one fragment, ready for rasterio: GeoJSON-like dicts (level-0 pixels) + bounds."""

    shapes: list[dict[str, Any]]
    bounds: np.ndarray  # float64 (N, 4): xmin, ymin, xmax, ymax
    class_index: np.ndarray  # int64 (N,)


def _select(annotations: gpd.GeoDataFrame, x0: float, y0: float, x1: float, y1: float) -> _FragmentShapes:
    """Nuclei whose bounding box meets the level-0 box ``[x0, x1] x [y0, y1]``."""
    # Bounding-box query only: rasterize ignores the few non-overlapping shapes it lets through,
    # which is cheaper than an exact intersects test on every candidate.
    rows = np.sort(annotations.sindex.query(shapely.box(x0, y0, x1, y1)))
    geoms = np.asarray(annotations.geometry.values)[rows]
    # Converted to GeoJSON dicts once: rasterio would otherwise rebuild __geo_interface__ per call (per level).
    with gc_paused():
        shapes = [g.__geo_interface__ for g in geoms]
    return _FragmentShapes(
        shapes=shapes,
        bounds=shapely.bounds(geoms).reshape(-1, 4),
        class_index=annotations["class_index"].to_numpy(dtype=np.int64)[rows],
    )


def _select_for_fragment(annotations: gpd.GeoDataFrame, fragment: Fragment, levels: Sequence[int]) -> _FragmentShapes:
    # ceil() in Fragment.shape_at lets the last row/column of a reduced level reach past the box.
    down = max(DOWNSAMPLES[k] for k in levels)
    x1 = fragment.x + down * math.ceil(fragment.width / down)
    y1 = fragment.y + down * math.ceil(fragment.height / down)
    return _select(annotations, fragment.x, fragment.y, x1, y1)


def _bands(height: int, width: int, n_classes: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``(r0, r1)`` of at most ``BAND_BYTES`` of masks, in whole chunk rows."""
    # Bands bound memory on large fragments (a 30k x 30k level 0 is 2.7 GB of masks) and keep
    # GDAL's canvas in cache: rasterizing 1k-row bands is ~4x faster than one 20k-row canvas.
    rows = max(CHUNK, BAND_BYTES // max(1, width * n_classes) // CHUNK * CHUNK)
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


def _burn(
    selected: _FragmentShapes, fragment: Fragment, level: int, n_classes: int, rows: tuple[int, int]
) -> ClassMask:
    """uint8 (r1 - r0, W_k, C) masks of rows ``r0:r1`` of ``fragment`` at ``level``."""
    r0, r1 = rows
    _, width = fragment.shape_at(level)
    down = DOWNSAMPLES[level]
    top = fragment.y + down * r0
    bottom = fragment.y + down * r1
    transform = Affine(down, 0, fragment.x, 0, down, top)
    out = np.zeros((r1 - r0, width, n_classes), dtype=np.uint8)
    plane = np.empty((r1 - r0, width), dtype=np.uint8)  # reused: rasterio allocating per call costs more
    in_rows = (selected.bounds[:, 3] >= top) & (selected.bounds[:, 1] <= bottom)
    for k in range(n_classes):
        members = np.flatnonzero(in_rows & (selected.class_index == k))
        if members.size == 0:
            continue  # rasterio refuses an empty shape list
        plane.fill(0)
        # One call per class: GDAL burns all polygons of the class in a single pass.
        rio_features.rasterize(
            [selected.shapes[i] for i in members],
            out=plane,
            transform=transform,
            default_value=1,
            all_touched=False,
        )
        out[:, :, k] = plane
    return out


def rasterize_fragment(annotations: gpd.GeoDataFrame, fragment: Fragment, level: int, n_classes: int) -> ClassMask:
    """uint8 (H_k, W_k, C) 0/1 class masks of ``fragment`` at ``level``; (H_k, W_k) = ``fragment.shape_at(level)``.

    ``annotations``: from ``read_qupath_geojson``, in the fragment's pixels (``class_index`` < ``n_classes``).
    See the module docstring for the pixel-centre rule and overlaps.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if len(annotations) and int(annotations["class_index"].max()) >= n_classes:
        raise ValueError(f"class_index {int(annotations['class_index'].max())} is out of range for {n_classes} classes")
    selected = _select_for_fragment(annotations, fragment, [level])
    height, width = fragment.shape_at(level)
    out = np.empty((height, width, n_classes), dtype=np.uint8)
    for r0, r1 in _bands(height, width, n_classes):
        out[r0:r1] = _burn(selected, fragment, level, n_classes, (r0, r1))
    return out


def write_mask_store(
    fragment_store: str | os.PathLike[str],
    annotations: Mapping[str, str | os.PathLike[str]],
    classes: Sequence[ClassSpec],
    out_path: str | os.PathLike[str],
    slide_size: tuple[int, int] | None = None,
    levels: Sequence[int] = (0, 1, 2),
    *,
    options: AnnotationOptions | None = None,
    mpp: float | None = None,
) -> None:
    """Rasterize each annotation set onto every fragment and level of ``fragment_store`` (atomic).

    ``annotations``: set name (e.g. ``ssa``, ``wsa``, ``ea``, ``truth``) -> QuPath GeoJSON path.
    Writes ``/fragments/{name}/{set}/level{k}`` uint8 (H_k, W_k, C) datasets (chunked, compressed) with
    store attrs ``slide``, ``classes``, ``annotation_sets`` (layout: ``cellkd.store``).
    ``slide_size``: level-0 (width, height) of the slide; when given, each GeoJSON is checked to
    belong to it (``check_annotations_fit``). ``options`` (the config's ``annotations:``) and ``mpp``
    (level-0 µm/px, to set large annotation regions aside) are passed to ``read_qupath_geojson``.
    The polygons are then scaled to the fragment store's working px (its ``SlideGeometry``).
    """
    if not annotations:
        raise ValueError("annotations must name at least one annotation set")
    for set_name in annotations:
        if not set_name or "/" in set_name:
            raise ValueError(f"annotation set name {set_name!r} must be non-empty and contain no '/'")
    n_classes = len(classes)
    with FragmentStore(fragment_store) as store, atomic_h5(out_path) as h5:
        geometry = store.geometry
        h5.attrs["slide"] = store.slide
        h5.attrs["classes"] = [spec.name for spec in classes]
        h5.attrs["annotation_sets"] = list(annotations)
        h5.attrs["annotation_files"] = [str(p) for p in annotations.values()]
        h5.attrs["downsamples"] = np.asarray(DOWNSAMPLES, dtype=np.int32)
        # One set in memory at a time: a paper-size slide has ~470k polygons per set, and holding the sets
        # together made the peak grow with their number (~1.5 KB per polygon; 407 -> 353 MB at benchmarks/scale.py 0.2).
        for set_name, path in annotations.items():
            frame = read_qupath_geojson(path, classes, options=options, mpp=mpp)
            if slide_size is not None:
                check_annotations_fit(frame, slide_size[0], slide_size[1], path)
            frame = geometry.frame_to_working(frame)
            for fragment in progress(store.fragments, desc=f"masks {store.slide} {set_name}"):
                group = h5.require_group(f"fragments/{fragment.name}")
                group.attrs.update(
                    {"x": fragment.x, "y": fragment.y, "width": fragment.width, "height": fragment.height}
                )
                selected = _select_for_fragment(frame, fragment, levels)
                for level in levels:
                    _write_level(group, f"{set_name}/level{level}", selected, fragment, level, n_classes)
                del selected
            del frame
    log.info("%s: masks of %d annotation sets written", out_path, len(annotations))


def _write_level(group: Any, name: str, selected: _FragmentShapes, fragment: Fragment, level: int, n: int) -> None:
    """Rasterize one (fragment, set, level) band by band into a new chunked dataset under ``group``."""
    height, width = fragment.shape_at(level)
    ds = group.create_dataset(
        name,
        shape=(height, width, n),
        dtype=np.uint8,
        chunks=(min(CHUNK, height), min(CHUNK, width), n),
        **COMPRESSION,
    )
    for r0, r1 in _bands(height, width, n):
        ds[r0:r1] = _burn(selected, fragment, level, n, (r0, r1))
