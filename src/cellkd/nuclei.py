"""Nucleus instances from predicted masks: one row per nucleus with image crops and per-set labels.

Every nucleus the segmentation model found (a connected component of the predicted mask, split
further by a watershed when nuclei touch) becomes one row of the nuclei store, labelled by each
annotation set (ssa, wsa, ea, truth; any subset).

Nuclei store ``results/nuclei/{stain}/{slide}.h5`` (written atomically)
    attrs: complete, slide, stain, classes (names, ``"background"`` last), label_sets (the sets
        present), crop_size, multiscale_size, match, min_iou, min_area, split_touching, split_depth,
        split_by, split_ratios, seed, split_names ["train", "val", "test"], segmentation_level,
        predicted_store, fragment_store, annotation_files
    1-D (N,): ``fragment`` (str), ``centroid_x``, ``centroid_y`` (float32, level-0 slide px),
        ``area`` (int32, level-0 px), ``split`` (int8: 0 train, 1 val, 2 test)
    ``bbox`` (N, 4) int32: x0, y0, x1, y1 in level-0 slide px, half-open
    ``crops/level0`` (N, crop_size, crop_size, 3) uint8; ``crops/level1``, ``crops/level2``
        (N, multiscale_size, multiscale_size, 3) uint8; chunked (``CROP_CHUNK`` rows), lzf
    ``labels/{set}`` int8 (N,): class index of the matched annotated nucleus (see below)
    ``geometry`` (N,) variable-length uint8: WKB of the nucleus outline, a shapely Polygon in level-0
        slide px (see Outlines); chunked (``CROP_CHUNK`` rows); read with ``NucleiStore.geometries``

Rows run fragment by fragment (sorted names), and within a fragment by centroid (y, x).

Coordinates: QuPath's continuous level-0 frame: pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``,
so a one-pixel instance at level-0 slide pixel (r, c) has centroid (c + 0.5, r + 0.5). The
level-k crop (downsample d = 1, 2, 4) of edge S is cut from the fragment's level-k image so that
the level-k pixel containing the centroid, ``floor((centroid - fragment origin) / d)``, sits at
crop index ``S // 2`` (row and column); pixels outside the fragment are zero.

Labels: class index ``i`` is ``classes[i]``; ``len(classes)`` is background. An instance takes
the class of the annotated nucleus it matches: with ``match="iou"`` the one with the highest IoU
(ties: the earlier feature), if that IoU >= ``min_iou``; with ``match="centroid"`` the one whose
polygon contains the instance's centroid (boundary included). Where annotated polygons overlap,
the later feature in the file wins (in the IoU id map and for the centroid). An unmatched
instance is a nucleus the annotation does not have: **background** for complete sets (ssa, wsa,
truth), but **-1** (unlabelled, never background) for partial sets (``NucleiParams.partial_sets``,
default ``("ea",)``), where an expert labelled only a subset of the nuclei.

Outlines: the instance's pixels at the segmentation level, vectorized by ``rasterio.features.shapes``
(8-connectivity, holes kept) and scaled to level 0, so a square instance of k x k mask pixels at
downsample d has an outline of area ``(d k)^2`` with integer vertices on pixel corners. GDAL joins
pixels that touch only diagonally into one ring that touches itself, which is not a valid polygon
(OGC); such an outline is split at the touching corners (``shapely.make_valid``) and its largest
piece kept, as for an instance that vectorizes into several pieces. The outline's area is then
smaller than ``area`` (which always counts every pixel); otherwise the two are equal.

IoU is measured on the raster of the segmentation level, inside the fragment (annotated nuclei
that cross the fragment edge count only their part inside it).

Memory: each fragment's predicted mask is labelled as a whole, so a fragment needs about
5 bytes per segmentation-level pixel (uint8 mask + int32 labels): 2 GB for a 20k x 20k fragment.
Everything else (annotation id maps, statistics, outlines, crops) runs in row bands of bounded size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import geopandas as gpd
import h5py
import numpy as np
import numpy.typing as npt
import pandas as pd
import shapely
import shapely.geometry
from rasterio import features as rio_features
from rasterio.transform import Affine
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from cellkd.annotations.qupath import check_annotations_fit, read_qupath_geojson
from cellkd.errors import ConfigError, StoreError
from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.attrs import decode_strings
from cellkd.store.fragments import CHUNK, Fragment, FragmentStore
from cellkd.store.patches import assign_splits
from cellkd.types import DOWNSAMPLES, SPLIT_NAMES, PathLike
from cellkd.workflow import progress

if TYPE_CHECKING:
    from cellkd.classes import ClassSpec

logger = logging.getLogger(__name__)

LabelImage = npt.NDArray[np.int32]

UNLABELLED = -1
"""Label of an instance that a partial annotation set (e.g. ea) does not cover."""
CROP_CHUNK = 1024
"""Rows per HDF5 chunk of the crop datasets."""
BAND_PIXELS = 16 * 2**20
"""Pixels per row band of the banded passes (id maps, statistics, crop reads)."""
_EIGHT = np.ones((3, 3), dtype=bool)
"""8-connectivity: diagonal neighbours belong to the same nucleus."""


@dataclass(frozen=True)
class NucleiParams:
    """How nuclei are found, cropped, labelled and split (``nuclei:`` in workflow_config.yaml)."""

    crop_size: int = 32
    """Level-0 crop edge (px), centred on the centroid, zero-padded outside the fragment."""
    multiscale_size: int = 16
    """Crop edge (px) at levels 1 and 2, centred on centroid / 2 and centroid / 4."""
    min_area: int = 8
    """Instances smaller than this (level-0 px) are dropped."""
    split_touching: bool = True
    """Split touching nuclei by a watershed on the distance transform."""
    split_depth: float = 1.5
    """Distance-transform peaks (segmentation-level px) split a component only when they rise at least
    this much above the saddle between them (h-maxima): smaller bumps of one outline do not split it."""
    match: str = "iou"
    """``"iou"`` (best-overlapping annotated nucleus) or ``"centroid"`` (annotated nucleus containing it)."""
    min_iou: float = 0.1
    """For ``match="iou"``: below this IoU the instance is unmatched."""
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    """train / val / test fractions; each >= 0, summing to 1."""
    split_by: str = "nucleus"
    """``"nucleus"``: each nucleus drawn on its own. ``"fragment"``: whole fragments go to one split, so
    overlapping crops of neighbouring nuclei never straddle train and test; the ratios then count
    fragments (those with nuclei), and the nucleus fractions only approximate them."""
    seed: int = 0
    """Seed of the split; combined with the slide id."""
    partial_sets: tuple[str, ...] = ("ea",)
    """Annotation sets that label only a subset of nuclei: unmatched instances get -1, not background."""

    def __post_init__(self) -> None:
        where = "(see nuclei: in workflow_config.yaml)"

        def fail(name: str, expected: str) -> None:
            raise ConfigError(f"nuclei {name}={getattr(self, name)!r} is invalid; expected {expected} {where}")

        for name, low in (("crop_size", 2), ("multiscale_size", 2), ("min_area", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                fail(name, f"an integer >= {low}")
        if not isinstance(self.split_touching, bool):
            fail("split_touching", "true or false")
        if not (math.isfinite(float(self.split_depth)) and self.split_depth > 0):
            fail("split_depth", "a number > 0 (pixels)")
        if self.match not in ("iou", "centroid"):
            fail("match", "'iou' or 'centroid'")
        if not (math.isfinite(float(self.min_iou)) and 0.0 < self.min_iou <= 1.0):
            fail("min_iou", "a number in (0, 1]")
        split = tuple(float(v) for v in self.split)
        if len(split) != 3 or any(not math.isfinite(v) or v < 0 for v in split) or not math.isclose(sum(split), 1.0):
            fail("split", "three fractions >= 0 (train, val, test) summing to 1")
        object.__setattr__(self, "split", split)
        if self.split_by not in ("nucleus", "fragment"):
            fail("split_by", "'nucleus' or 'fragment'")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            fail("seed", "an integer >= 0")
        object.__setattr__(self, "partial_sets", tuple(str(s) for s in self.partial_sets))


# ----------------------------------------------------------------------------- instances


def find_instances(
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.uint8], params: NucleiParams | None = None, downsample: int = 1
) -> LabelImage:
    """int32 (H, W) instance labels (0 background, 1..N) of a (H, W) nucleus ``mask`` (nonzero = nucleus).

    Instances are 8-connected components; with ``params.split_touching`` a component whose distance
    transform has several h-maxima (``params.split_depth``) is split by a watershed from them.
    ``downsample``: level-0 px per mask px, so that ``params.min_area`` (level-0 px) applies at any level.
    Labels are consecutive, in raster order of the components (split parts follow the last component).
    """
    params = params or NucleiParams()
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    foreground = np.asarray(mask) != 0
    labels, n = ndimage.label(foreground, structure=_EIGHT, output=np.int32)
    min_pixels = math.ceil(params.min_area / downsample**2)
    if params.split_touching and n:
        n = _split_touching(labels, n, params.split_depth, 2 * min_pixels)
    if n == 0:
        return labels
    keep = _areas(labels, n) >= min_pixels
    keep[0] = False
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return _apply_lookup(labels, relabel)


def _areas(labels: LabelImage, n: int) -> npt.NDArray[np.int64]:
    """(n + 1,) pixel count of each label 0..n, in row bands (bincount copies its input to int64)."""
    areas = np.zeros(n + 1, dtype=np.int64)
    rows = max(1, BAND_PIXELS // max(1, labels.shape[1]))
    for r0 in range(0, labels.shape[0], rows):
        areas += np.bincount(labels[r0 : r0 + rows].ravel(), minlength=n + 1)
    return areas


def _apply_lookup(labels: LabelImage, lookup: npt.NDArray[np.int32]) -> LabelImage:
    """``lookup[labels]`` in row bands (a full-size fancy index would need a second int64 temporary)."""
    rows = max(1, BAND_PIXELS // max(1, labels.shape[1]))
    for r0 in range(0, labels.shape[0], rows):
        labels[r0 : r0 + rows] = lookup[labels[r0 : r0 + rows]]
    return labels


def _split_touching(labels: LabelImage, n: int, depth: float, min_pixels: int) -> int:
    """Split components of ``labels`` (in place) at distance-transform saddles deeper than ``depth``; new count."""
    next_id = n + 1
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        view = labels[box]  # a view: writes go to ``labels``
        inside = view == index
        if np.count_nonzero(inside) < min_pixels:
            continue  # both parts would fall below min_area
        # A one-pixel margin: the box edge must count as background for the distance transform.
        padded = np.zeros((inside.shape[0] + 2, inside.shape[1] + 2), dtype=bool)
        padded[1:-1, 1:-1] = inside
        distance = ndimage.distance_transform_edt(padded)
        # Cheap pre-test: one connected set of (non-strict) local maxima means one regional maximum.
        local = (distance == ndimage.maximum_filter(distance, size=3)) & padded
        if ndimage.label(local, structure=_EIGHT)[1] < 2:
            continue
        markers, count = ndimage.label(h_maxima(distance, depth).astype(bool) & padded, structure=_EIGHT)
        if count < 2:
            continue
        parts = watershed(-distance, markers, mask=padded, connectivity=2)[1:-1, 1:-1]
        # Marker 1 keeps the component's id; the others get new ids.
        moved = inside & (parts > 1)
        view[moved] = next_id + parts[moved] - 2
        next_id += count - 1
    return next_id - 1


@dataclass
class _Instances:
    """Per-instance statistics of one fragment, in label order (row i = label i + 1)."""

    area: npt.NDArray[np.int64]  # segmentation-level px
    row_sum: npt.NDArray[np.float64]
    col_sum: npt.NDArray[np.float64]
    boxes: list[tuple[slice, slice] | None] = field(default_factory=list)


def _instance_stats(labels: LabelImage, n: int) -> _Instances:
    """Areas, coordinate sums and bounding boxes of labels 1..n, in row bands (bounded memory)."""
    area = np.zeros(n + 1, dtype=np.int64)
    row_sum = np.zeros(n + 1)
    col_sum = np.zeros(n + 1)
    height, width = labels.shape
    rows = max(1, BAND_PIXELS // max(1, width))
    for r0 in range(0, height, rows):
        band = labels[r0 : r0 + rows]
        r, c = np.nonzero(band)
        ids = band[r, c]
        area += np.bincount(ids, minlength=n + 1)
        row_sum += np.bincount(ids, weights=r + r0, minlength=n + 1)
        col_sum += np.bincount(ids, weights=c, minlength=n + 1)
    boxes = ndimage.find_objects(labels, max_label=n)
    assert all(b is not None for b in boxes), "labels must be consecutive (find_instances relabels them)"
    return _Instances(area[1:], row_sum[1:], col_sum[1:], boxes)


# ----------------------------------------------------------------------------- matching


def _annotation_ids(
    frame: gpd.GeoDataFrame, fragment: Fragment, shape: tuple[int, int], down: int
) -> tuple[npt.NDArray[np.int64], Iterator[tuple[int, npt.NDArray[np.int32]]]]:
    """Rows of ``frame`` near ``fragment`` and a generator of (r0, int32 id-map band) at the segmentation level.

    Id ``j + 1`` is the ``j``-th selected row (file order, so later features overwrite earlier ones).
    """
    height, width = shape
    x1, y1 = fragment.x + down * width, fragment.y + down * height
    rows = np.sort(frame.sindex.query(shapely.box(fragment.x, fragment.y, x1, y1)))
    geoms = np.asarray(frame.geometry.values)[rows]
    bounds = shapely.bounds(geoms).reshape(-1, 4)
    band_rows = max(1, BAND_PIXELS // max(1, width))

    def bands() -> Iterator[tuple[int, npt.NDArray[np.int32]]]:
        for r0 in range(0, height, band_rows):
            r1 = min(height, r0 + band_rows)
            top, bottom = fragment.y + down * r0, fragment.y + down * r1
            out = np.zeros((r1 - r0, width), dtype=np.int32)
            members = np.flatnonzero((bounds[:, 3] >= top) & (bounds[:, 1] <= bottom))
            if members.size:  # rasterio refuses an empty shape list
                rio_features.rasterize(
                    ((geoms[j], int(j) + 1) for j in members),
                    out=out,
                    transform=Affine(down, 0, fragment.x, 0, down, top),
                    all_touched=False,
                )
            yield r0, out

    return rows, bands()


def _match_iou(
    labels: LabelImage, stats: _Instances, frame: gpd.GeoDataFrame, fragment: Fragment, down: int, min_iou: float
) -> npt.NDArray[np.int64]:
    """(n,) row of ``frame`` each instance matches by IoU (-1: none >= ``min_iou``)."""
    n = stats.area.size
    rows, bands = _annotation_ids(frame, fragment, labels.shape, down)
    m = rows.size
    matched = np.full(n, -1, dtype=np.int64)
    if m == 0 or n == 0:
        return matched  # the band generator is lazy: nothing rasterized
    annotated_area = np.zeros(m + 1, dtype=np.int64)
    keys: list[npt.NDArray[np.int64]] = []
    counts: list[npt.NDArray[np.int64]] = []
    for r0, ids in bands:
        annotated_area += np.bincount(ids.ravel(), minlength=m + 1)
        predicted = labels[r0 : r0 + ids.shape[0]]
        both = (predicted > 0) & (ids > 0)
        # One int64 key per overlapping pixel pair; unique() counts them (sparse: n * m may be ~10^9).
        key = predicted[both].astype(np.int64) * (m + 1) + ids[both]
        unique, count = np.unique(key, return_counts=True)
        keys.append(unique)
        counts.append(count)
    key_all = np.concatenate(keys)
    if key_all.size == 0:
        return matched
    unique, inverse = np.unique(key_all, return_inverse=True)
    overlap = np.bincount(inverse, weights=np.concatenate(counts))
    instance, annotated = np.divmod(unique, m + 1)
    union = stats.area[instance - 1] + annotated_area[annotated] - overlap
    iou = overlap / union
    # Best IoU per instance; among equal IoUs the earlier feature (smaller id).
    order = np.lexsort((annotated, -iou, instance))
    first = np.ones(order.size, dtype=bool)
    first[1:] = instance[order][1:] != instance[order][:-1]
    best = order[first]
    good = iou[best] >= min_iou
    matched[instance[best][good] - 1] = rows[annotated[best][good] - 1]
    return matched


def _match_centroid(frame: gpd.GeoDataFrame, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> np.ndarray:
    """(n,) row of ``frame`` whose polygon contains each point (later rows win; -1: none)."""
    matched = np.full(x.size, -1, dtype=np.int64)
    if x.size == 0 or len(frame) == 0:
        return matched
    point, row = frame.sindex.query(shapely.points(x, y), predicate="intersects")
    # Later features win: the maximum row per point.
    np.maximum.at(matched, point, row)
    return matched


# ----------------------------------------------------------------------------- outlines


def _largest_polygon(geometry: shapely.Geometry) -> shapely.Polygon:
    """The largest-area Polygon among the parts of ``geometry`` (empty Polygon when it has none)."""
    parts = shapely.get_parts(shapely.get_parts(geometry))  # twice: make_valid may nest multipolygons
    polygons = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    if not polygons:
        return shapely.Polygon()
    return max(polygons, key=lambda p: p.area)


def _outlines(labels: LabelImage, stats: _Instances, fragment: Fragment, down: int) -> npt.NDArray[np.object_]:
    """(n,) valid shapely Polygons of labels 1..n (label order), level-0 slide px; layout in the module docstring.

    Vectorized in row bands: a band takes the instances whose top row lies in it, extended down to
    their lowest row, with every other instance masked out, so each instance is traced whole once.
    """
    n = stats.area.size
    out = np.empty(n, dtype=object)
    if n == 0:
        return out
    top = np.array([b[0].start for b in stats.boxes], dtype=np.int64)
    bottom = np.array([b[0].stop for b in stats.boxes], dtype=np.int64)
    band_rows = max(1, BAND_PIXELS // max(1, labels.shape[1]))
    selected = np.zeros(n + 1, dtype=bool)
    best_area = np.full(n, -1.0)
    for r0 in range(0, int(top.max()) + 1, band_rows):
        members = np.flatnonzero((top >= r0) & (top < r0 + band_rows))
        if members.size == 0:
            continue
        window = labels[r0 : int(bottom[members].max())]
        selected[:] = False
        selected[members + 1] = True
        transform = Affine(down, 0, fragment.x, 0, down, fragment.y + down * r0)
        for geojson, value in rio_features.shapes(window, mask=selected[window], connectivity=8, transform=transform):
            polygon = shapely.geometry.shape(geojson)
            i = int(value) - 1
            # Several pieces of one id (not 8-connected): keep the largest.
            if polygon.area > best_area[i]:
                out[i], best_area[i] = polygon, polygon.area
    invalid = np.flatnonzero(~shapely.is_valid(out))
    if invalid.size:
        out[invalid] = [_largest_polygon(g) for g in shapely.make_valid(out[invalid])]
        logger.debug(
            "%s: %d outlines touched themselves at a corner; kept their largest piece", fragment.name, invalid.size
        )
    return out


def _wkb_rows(polygons: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
    """(n,) object array of uint8 WKB arrays, the form an h5py variable-length uint8 dataset stores."""
    rows = np.empty(polygons.size, dtype=object)
    rows[:] = [np.frombuffer(b, dtype=np.uint8) for b in shapely.to_wkb(polygons)]
    return rows


# ----------------------------------------------------------------------------- crops


def _cut_crops(image: h5py.Dataset, row: npt.NDArray[np.int64], col: npt.NDArray[np.int64], size: int) -> np.ndarray:
    """uint8 (n, size, size, 3) crops of ``image`` (H, W, 3) with pixel (row, col) at crop index size // 2.

    ``row`` (sorted) and ``col`` lie inside the image. The image is read in row bands (whole chunk
    rows) with a margin, zero-padded, and the crops of the nuclei centred in a band are gathered from
    it by one fancy index; pixels outside the image are zero.
    """
    n = row.size
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out
    height, width = image.shape[:2]
    half = size // 2
    offsets = np.arange(size)
    # Bands of whole chunk rows within the memory budget; the padded band is (rows + size - 1, W + size - 1).
    band_rows = max(CHUNK, BAND_PIXELS // max(1, (width + size) * 3) // CHUNK * CHUNK)
    band_rows = min(band_rows, height)  # a small fragment is one band, not a large empty buffer
    for r0 in range(int(row[0]) // band_rows * band_rows, int(row[-1]) + 1, band_rows):
        start, stop = np.searchsorted(row, [r0, r0 + band_rows])
        if stop == start:
            continue
        top = r0 - half  # crop rows of centre r: r - half .. r - half + size - 1
        padded = np.zeros((band_rows + size - 1, width + size - 1, 3), dtype=np.uint8)
        a, b = max(top, 0), min(top + padded.shape[0], height)
        padded[a - top : b - top, half : half + width] = image[a:b]
        rr = (row[start:stop] - r0)[:, None, None] + offsets[None, :, None]
        cc = col[start:stop][:, None, None] + offsets[None, None, :]
        out[start:stop] = padded[rr, cc]
    return out


class _Appender:
    """Append rows to a resizable chunked dataset, writing whole chunks only (no read-modify-write)."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.chunk = ds.chunks[0]
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        self.buffer.append(rows)
        self.buffered += rows.shape[0]
        if self.buffered >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        count = data.shape[0] // self.chunk * self.chunk if whole_chunks else data.shape[0]
        if count:
            self.ds.resize(self.written + count, axis=0)
            self.ds[self.written : self.written + count] = data[:count]
            self.written += count
        rest = data[count:]
        self.buffer = [rest] if rest.shape[0] else []
        self.buffered = rest.shape[0]

    def close(self) -> None:
        self._flush(whole_chunks=False)


# ----------------------------------------------------------------------------- the store


def _check_predicted(h5: h5py.File, predicted_path: PathLike, store: FragmentStore) -> int:
    """Raise ``StoreError`` unless the predicted store covers exactly the fragments of ``store``; its level."""
    hint = f"rerun the segmentation of {store.path}"
    level = int(h5.attrs.get("level", 0))
    if level not in range(len(DOWNSAMPLES)):
        raise StoreError(f"{predicted_path}: segmentation level {level} is not one of 0, 1, 2; {hint}")
    for attr, expected in (("slide", store.slide), ("stain", store.stain)):
        found = h5.attrs.get(attr)
        if found is not None and str(found) != expected:
            msg = (
                f"{predicted_path}: {attr} {str(found)!r} differs from {attr} {expected!r} of fragment store "
                f"{store.path}; pass the predicted masks of the same slide and stain"
            )
            raise StoreError(msg)
    group = h5.get("fragments")
    names = sorted(group) if group is not None else []
    expected_names = [f.name for f in store.fragments]
    if names != expected_names:
        msg = (
            f"{predicted_path}: fragments {names} do not match fragments {expected_names} of fragment store "
            f"{store.path}; the stores are from different fragment extractions: {hint}"
        )
        raise StoreError(msg)
    for fragment in store.fragments:
        node = group[fragment.name]
        box = tuple(int(node.attrs.get(k, -1)) for k in ("x", "y", "width", "height"))
        expected_box = (fragment.x, fragment.y, fragment.width, fragment.height)
        key = f"level{level}"
        shape = tuple(node[key].shape) if key in node else None
        if box != expected_box or shape != fragment.shape_at(level):
            msg = (
                f"{predicted_path}: fragment {fragment.name} has box (x, y, w, h) {box} and {key} shape {shape}, "
                f"but fragment store {store.path} has {expected_box} and {fragment.shape_at(level)}; "
                f"the stores are from different fragment extractions: {hint}"
            )
            raise StoreError(msg)
    return level


def _open_predicted(path: PathLike, store: FragmentStore) -> tuple[h5py.File, int]:
    """Open the predicted mask store and check it against ``store``; returns (file, segmentation level)."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        msg = f"{path}: cannot open the predicted mask store ({err}); rerun the segmentation of {store.path}"
        raise StoreError(msg) from err
    try:
        require_complete(h5)
        return h5, _check_predicted(h5, path, store)
    except BaseException:
        h5.close()
        raise


@dataclass
class _FragmentNuclei:
    """The nuclei of one fragment, sorted by centroid (y, x)."""

    centroid_x: npt.NDArray[np.float64]  # level-0 slide px
    centroid_y: npt.NDArray[np.float64]
    area: npt.NDArray[np.int64]  # level-0 px
    bbox: npt.NDArray[np.int64]  # (n, 4) x0, y0, x1, y1, level-0 slide px, half-open
    labels: dict[str, npt.NDArray[np.int64]]
    outline: npt.NDArray[np.object_]  # (n,) shapely Polygons, level-0 slide px


def _fragment_nuclei(
    mask: npt.NDArray[np.uint8],
    fragment: Fragment,
    down: int,
    frames: Mapping[str, gpd.GeoDataFrame],
    n_classes: int,
    params: NucleiParams,
) -> _FragmentNuclei:
    """Instances of one fragment's predicted ``mask`` (segmentation level, downsample ``down``) and their labels."""
    labels = find_instances(mask, params, downsample=down)
    n = int(labels.max(initial=0))
    stats = _instance_stats(labels, n)
    # Continuous level-0 slide coordinates: mask pixel c covers [x + down*c, x + down*(c+1)).
    cx = fragment.x + down * (stats.col_sum / np.maximum(stats.area, 1) + 0.5)
    cy = fragment.y + down * (stats.row_sum / np.maximum(stats.area, 1) + 0.5)
    order = np.lexsort((cx, cy))
    matched: dict[str, npt.NDArray[np.int64]] = {}
    for set_name, frame in frames.items():
        if params.match == "iou":
            row = _match_iou(labels, stats, frame, fragment, down, params.min_iou)
        else:
            row = _match_centroid(frame, cx, cy)
        unmatched = UNLABELLED if set_name in params.partial_sets else n_classes
        class_index = frame["class_index"].to_numpy(dtype=np.int64)
        matched[set_name] = np.where(row >= 0, class_index[np.maximum(row, 0)], unmatched)[order]
    boxes = np.array([(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in stats.boxes], dtype=np.int64)
    origin = np.array([fragment.x, fragment.y, fragment.x, fragment.y], dtype=np.int64)
    return _FragmentNuclei(
        centroid_x=cx[order],
        centroid_y=cy[order],
        area=stats.area[order] * down * down,
        bbox=boxes.reshape(-1, 4)[order] * down + origin,
        labels=matched,
        outline=_outlines(labels, stats, fragment, down)[order],
    )


def _cat(parts: list[np.ndarray], dtype: type, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype=dtype)


def extract_nuclei(
    predicted_store: PathLike,
    fragment_store: PathLike,
    annotations: Mapping[str, PathLike],
    classes: Sequence[ClassSpec],
    out_path: PathLike,
    params: NucleiParams | None = None,
) -> int:
    """Write the nuclei store ``out_path`` (layout: module docstring) for one slide; return N, the nucleus count.

    ``predicted_store``: predicted nucleus masks (``cellkd.inference.segment_fragment_store``) of the
    fragments of ``fragment_store`` (same slide and stain). ``annotations``: set name -> QuPath GeoJSON
    path (level-0 slide px), any subset of ssa, wsa, ea, truth; may be empty. Raises ``StoreError``
    when the two stores do not describe the same fragments.
    """
    params = params or NucleiParams()
    n_classes = len(classes)
    if not 1 <= n_classes < 127:
        raise ConfigError(f"{n_classes} classes given; int8 labels need 1..126 classes (see classes:)")
    for set_name in annotations:
        if not set_name or "/" in set_name:
            raise ConfigError(f"annotation set name {set_name!r} must be non-empty and contain no '/'")
    sizes = (params.crop_size, params.multiscale_size, params.multiscale_size)

    with FragmentStore(fragment_store) as store:
        predicted, level = _open_predicted(predicted_store, store)
        down = DOWNSAMPLES[level]
        with predicted, atomic_h5(out_path) as h5:
            frames: dict[str, gpd.GeoDataFrame] = {}
            for set_name, path in annotations.items():
                frame = read_qupath_geojson(path, classes)  # once per slide; fragments query its sindex
                if store.slide_size is not None:
                    check_annotations_fit(frame, *store.slide_size, path)
                frames[set_name] = frame
            crops = [
                _Appender(
                    h5.create_dataset(
                        f"crops/level{k}",
                        shape=(0, size, size, 3),
                        maxshape=(None, size, size, 3),
                        dtype=np.uint8,
                        chunks=(CROP_CHUNK, size, size, 3),
                        compression="lzf",
                    )
                )
                for k, size in enumerate(sizes)
            ]
            # Appended fragment by fragment, so that the outlines of a whole slide are never all in memory.
            geometry = h5.create_dataset(
                "geometry",
                shape=(0,),
                maxshape=(None,),
                dtype=h5py.vlen_dtype(np.uint8),
                chunks=(CROP_CHUNK,),
            )
            parts: list[_FragmentNuclei] = []
            names: list[str] = []
            for fragment in progress(store.fragments, desc=f"nuclei {store.slide}", total=len(store.fragments)):
                mask = predicted[f"fragments/{fragment.name}/level{level}"][:]
                nuclei = _fragment_nuclei(mask, fragment, down, frames, n_classes, params)
                del mask
                for k, size in enumerate(sizes):
                    d = DOWNSAMPLES[k]
                    row = np.floor((nuclei.centroid_y - fragment.y) / d).astype(np.int64)
                    col = np.floor((nuclei.centroid_x - fragment.x) / d).astype(np.int64)
                    crops[k].append(_cut_crops(store.level(fragment, k), row, col, size))
                start = geometry.shape[0]
                geometry.resize(start + nuclei.area.size, axis=0)
                if nuclei.area.size:
                    # write_direct: h5py's __setitem__ stacks equal-length vlen rows into 2-D and fails.
                    geometry.write_direct(_wkb_rows(nuclei.outline), dest_sel=np.s_[start:])
                nuclei.outline = np.empty(0, dtype=object)
                parts.append(nuclei)
                names.extend([fragment.name] * nuclei.area.size)
                matched = "".join(
                    f", {s} matched {np.mean((v >= 0) & (v < n_classes)) if v.size else 0:.0%}"
                    for s, v in nuclei.labels.items()
                )
                logger.info("%s %s: %d nuclei%s", store.slide, fragment.name, nuclei.area.size, matched)
            for appender in crops:
                appender.close()

            split = _split(names, store, params)
            h5.create_dataset("fragment", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
            h5.create_dataset("centroid_x", data=_cat([p.centroid_x for p in parts], np.float32))
            h5.create_dataset("centroid_y", data=_cat([p.centroid_y for p in parts], np.float32))
            h5.create_dataset("area", data=_cat([p.area for p in parts], np.int32))
            h5.create_dataset("bbox", data=_cat([p.bbox for p in parts], np.int32, (4,)))
            h5.create_dataset("split", data=split)
            h5.require_group("labels")
            for set_name in frames:
                h5.create_dataset(f"labels/{set_name}", data=_cat([p.labels[set_name] for p in parts], np.int8))
            h5.attrs.update(
                {
                    "slide": store.slide,
                    "stain": store.stain,
                    "classes": [spec.name for spec in classes] + ["background"],
                    "label_sets": list(frames),
                    "crop_size": params.crop_size,
                    "multiscale_size": params.multiscale_size,
                    "match": params.match,
                    "min_iou": params.min_iou,
                    "min_area": params.min_area,
                    "split_touching": params.split_touching,
                    "split_depth": params.split_depth,
                    "split_by": params.split_by,
                    "split_ratios": np.asarray(params.split),
                    "seed": params.seed,
                    "split_names": list(SPLIT_NAMES),
                    "partial_sets": [s for s in params.partial_sets if s in frames],
                    "segmentation_level": level,
                    "predicted_store": str(predicted_store),
                    "fragment_store": str(fragment_store),
                    "annotation_files": [str(p) for p in annotations.values()],
                }
            )
    counts = np.bincount(split, minlength=3)
    summary = ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True))
    logger.info("%s: %d nuclei (%s) -> %s", store.slide, len(names), summary, out_path)
    return len(names)


def _split(fragments: list[str], store: FragmentStore, params: NucleiParams) -> npt.NDArray[np.int8]:
    """int8 (N,) split codes, per nucleus or per fragment (only fragments holding nuclei are drawn)."""
    if params.split_by == "nucleus":
        return assign_splits(len(fragments), params.split, params.seed, store.slide)
    if not fragments:
        return np.zeros(0, dtype=np.int8)
    names, index = np.unique(np.asarray(fragments, dtype=str), return_inverse=True)
    codes = assign_splits(len(names), params.split, params.seed, store.slide)
    return codes[index.ravel()]


class NucleiStore:
    """Read-only view of a nuclei store (layout: module docstring). Use as a context manager."""

    def __init__(self, path: PathLike) -> None:
        try:
            self._h5 = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path}: cannot open nuclei store ({err}); rerun the extract_nuclei rule") from err
        try:
            require_complete(self._h5)
            attrs = self._h5.attrs
            self.path = str(path)
            self.slide: str = str(attrs["slide"])
            self.stain: str = str(attrs["stain"])
            self.classes: list[str] = decode_strings(attrs["classes"])
            """Class names, ``"background"`` last (its index is ``len(classes) - 1``)."""
            self.label_sets: list[str] = decode_strings(attrs["label_sets"]) if len(attrs["label_sets"]) else []
            self.crop_size: int = int(attrs["crop_size"])
            self.multiscale_size: int = int(attrs["multiscale_size"])
            self.split_names: list[str] = decode_strings(attrs["split_names"])
        except KeyError as err:
            self._h5.close()
            raise StoreError(f"{path}: not a nuclei store (missing {err}); rerun the extract_nuclei rule") from err
        except BaseException:
            self._h5.close()
            raise

    def __len__(self) -> int:
        return int(self._h5["split"].shape[0])

    def crops(self, level: int = 0) -> h5py.Dataset:
        """uint8 (N, S, S, 3) RGB crops at ``level`` (S = crop_size at 0, multiscale_size at 1, 2); index to read."""
        if level not in (0, 1, 2):
            raise StoreError(f"{self.path}: no crops at level {level!r}; expected 0, 1 or 2")
        return self._h5[f"crops/level{level}"]

    def labels(self, annotation_set: str) -> npt.NDArray[np.int8]:
        """int8 (N,) class indices from ``annotation_set``; background = len(classes) - 1, -1 = unlabelled."""
        if annotation_set not in self.label_sets:
            msg = f"{self.path}: no labels from annotation set {annotation_set!r}; available: {self.label_sets}"
            raise StoreError(msg)
        return self._h5[f"labels/{annotation_set}"][:]

    @property
    def split(self) -> npt.NDArray[np.int8]:
        """int8 (N,) split codes: 0 train, 1 val, 2 test."""
        return self._h5["split"][:]

    def split_indices(self, split: str | int) -> npt.NDArray[np.int64]:
        """Sorted indices of the nuclei in ``split`` ("train", "val", "test" or its code 0, 1, 2)."""
        if isinstance(split, str):
            if split not in self.split_names:
                raise StoreError(f"{self.path}: unknown split {split!r}; expected one of {self.split_names}")
            split = self.split_names.index(split)
        return np.flatnonzero(self.split == split).astype(np.int64)

    def geometries(self) -> list[shapely.Polygon]:
        """The (N,) nucleus outlines as shapely Polygons in level-0 slide px, in row order."""
        if "geometry" not in self._h5:
            msg = f"{self.path}: the nuclei store has no outlines (written by an older cellkd); rerun extract_nuclei"
            raise StoreError(msg)
        rows = self._h5["geometry"][:]
        wkb = np.empty(rows.size, dtype=object)
        wkb[:] = [row.tobytes() for row in rows]
        return list(shapely.from_wkb(wkb))

    def table(self) -> pd.DataFrame:
        """One row per nucleus: fragment, centroid_x, centroid_y, area, x0, y0, x1, y1, split, label_{set}."""
        h5 = self._h5
        bbox = h5["bbox"][:]
        data: dict[str, np.ndarray] = {
            "fragment": h5["fragment"].asstr()[:],
            "centroid_x": h5["centroid_x"][:],
            "centroid_y": h5["centroid_y"][:],
            "area": h5["area"][:],
            "x0": bbox[:, 0],
            "y0": bbox[:, 1],
            "x1": bbox[:, 2],
            "y1": bbox[:, 3],
            "split": h5["split"][:],
        }
        for set_name in self.label_sets:
            data[f"label_{set_name}"] = h5[f"labels/{set_name}"][:]
        return pd.DataFrame(data)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> NucleiStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["UNLABELLED", "NucleiParams", "NucleiStore", "extract_nuclei", "find_instances"]
