"""Matching nucleus instances to annotated nuclei: the class each annotation set gives each instance.

Labels: class index ``i`` is ``classes[i]``; ``len(classes)`` is background. An annotation set
(one QuPath GeoJSON) holds nucleus **polygons** and **point labels** (an expert's clicks).

- **Polygons** first: an instance takes the class of the annotated nucleus it matches: with
  ``match="iou"`` the one with the highest IoU (ties: the earlier feature), if that IoU >= ``min_iou``;
  with ``match="centroid"`` the one whose polygon contains the instance's centroid (boundary included).
  Where annotated polygons overlap, the later feature in the file wins (in the IoU id map and for the
  centroid).
- **Points** then label the instances the polygons left unmatched: an instance whose outline holds
  points of one class takes that class (``cellkd.annotations.points.label_nuclei_by_points``); one
  holding points of several classes stays unmatched. A point on the shared edge of two instances
  labels the first in row order only. Points in no instance are counted per set and logged once per
  slide (``SetLabeller.report``).
- An instance matched by neither is a nucleus the annotation does not have: **background** for
  complete sets (ssa, wsa, truth), but **-1** (``UNLABELLED``, never background) for partial sets
  (``NucleiParams.partial_sets``, default ``("ea",)``), where an expert labelled only a subset.

IoU is measured on the raster of the segmentation level, inside the fragment (annotated nuclei that
cross the fragment edge count only their part inside it). Instances come tile by tile
(``cellkd.nuclei.extract``), each whole inside its tile's window; an annotated nucleus that runs past
the window's edge has its area counted over the fragment instead, so the IoU does not depend on the
tiling. Annotation id maps are rasterized in row bands of ``BAND_PIXELS``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely
from rasterio import features as rio_features
from rasterio.transform import Affine

from cellkd.annotations.points import label_nuclei_by_points
from cellkd.nuclei.instances import BAND_PIXELS, Instances, LabelImage
from cellkd.nuclei.params import NucleiParams
from cellkd.store.fragments import Fragment
from cellkd.store.nuclei import UNLABELLED

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationSet:
    """One annotation set of a slide, as read from its QuPath GeoJSON (level-0 slide px)."""

    name: str
    path: str
    nuclei: gpd.GeoDataFrame
    """Nucleus polygons: ``geometry``, ``class_index`` (``QuPathAnnotations.nuclei``)."""
    points: gpd.GeoDataFrame
    """Point labels: ``geometry``, ``class_index`` (``QuPathAnnotations.points``)."""


@dataclass(frozen=True)
class Window:
    """A tile's window of a fragment at the segmentation level: rows r0..r1, cols c0..c1 (half-open)."""

    r0: int
    r1: int
    c0: int
    c1: int

    def slide_box(self, fragment: Fragment, down: int) -> shapely.Polygon:
        """The window in level-0 slide px."""
        x, y = fragment.x, fragment.y
        return shapely.box(x + down * self.c0, y + down * self.r0, x + down * self.c1, y + down * self.r1)


class SetLabeller:
    """Labels a slide's instances with one annotation set, fragment by fragment and tile by tile.

    Keeps the slide-wide tally of the set's point labels: which fell in an instance, and how many
    instances held points of several classes.
    """

    def __init__(self, annotations: AnnotationSet, n_classes: int, params: NucleiParams) -> None:
        self.annotations = annotations
        self.params = params
        self.unmatched = UNLABELLED if annotations.name in params.partial_sets else n_classes
        self.class_index = annotations.nuclei["class_index"].to_numpy(dtype=np.int64)
        self._point_used = np.zeros(len(annotations.points), dtype=bool)
        self._conflicting = 0

    def for_fragment(self, fragment: Fragment, shape: tuple[int, int], down: int) -> FragmentMatcher:
        """The matcher of ``fragment`` (segmentation-level ``shape``, downsample ``down``)."""
        return FragmentMatcher(self, fragment, shape, down)

    def label_by_points(self, outlines: npt.NDArray[np.object_], box: shapely.Polygon) -> npt.NDArray[np.int64]:
        """(n,) class the point labels give each outline (-1: none, or points of several classes).

        ``box``: the level-0 window holding the outlines. A point labels one instance only: points
        already used by an earlier tile are left out.
        """
        points = self.annotations.points
        out = np.full(outlines.size, -1, dtype=np.int64)
        if outlines.size == 0 or len(points) == 0:
            return out
        near = points.sindex.query(box, predicate="intersects")
        near = np.sort(near[~self._point_used[near]])
        if near.size == 0:
            return out
        found = label_nuclei_by_points(points.iloc[near], outlines, self.annotations.path, warn=False)
        self._point_used[near[found.point_nucleus >= 0]] = True
        self._conflicting += found.conflicting
        return found.nucleus_class

    def report(self, slide: str) -> tuple[int, int]:
        """Log and return (points in no instance, instances with points of several classes) for the slide."""
        total = self._point_used.size
        outside = int(total - self._point_used.sum())
        path = self.annotations.path
        if outside:
            logger.warning(
                "%s %s (%s): %d of %d point labels lie in no segmented nucleus and label nothing",
                slide, self.annotations.name, path, outside, total,
            )  # fmt: skip
        if self._conflicting:
            logger.warning(
                "%s %s (%s): %d nuclei hold point labels of different classes and stay unlabelled by points",
                slide, self.annotations.name, path, self._conflicting,
            )  # fmt: skip
        return outside, self._conflicting


class FragmentMatcher:
    """The annotated nuclei of one set near one fragment, ready to label the fragment's instances per tile."""

    def __init__(self, owner: SetLabeller, fragment: Fragment, shape: tuple[int, int], down: int) -> None:
        self.owner = owner
        self.fragment = fragment
        self.shape = shape
        self.down = down
        frame = owner.annotations.nuclei
        height, width = shape
        x1, y1 = fragment.x + down * width, fragment.y + down * height
        self.rows = np.sort(frame.sindex.query(shapely.box(fragment.x, fragment.y, x1, y1)))
        """Rows of the polygon frame near the fragment; id ``j + 1`` in the id maps is ``rows[j]``."""
        self.geoms = np.asarray(frame.geometry.values)[self.rows]
        self.bounds = shapely.bounds(self.geoms).reshape(-1, 4)
        # Segmentation-level pixel box (r0, r1, c0, c1) around each polygon, clipped to the fragment.
        scaled = (self.bounds - [fragment.x, fragment.y, fragment.x, fragment.y]) / down
        self.pixel_boxes = np.stack(
            [
                np.clip(np.floor(scaled[:, 1]), 0, height),
                np.clip(np.ceil(scaled[:, 3]), 0, height),
                np.clip(np.floor(scaled[:, 0]), 0, width),
                np.clip(np.ceil(scaled[:, 2]), 0, width),
            ],
            axis=1,
        ).astype(np.int64)

    def label(
        self,
        labels: LabelImage,
        stats: Instances,
        window: Window,
        centroids: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
        outlines: npt.NDArray[np.object_],
    ) -> npt.NDArray[np.int64]:
        """(n,) class index of each instance of a tile (module docstring), in label order.

        ``labels``: the tile's instances 1..n over ``window`` (each whole inside it), with their
        ``stats``, level-0 ``centroids`` (x, y) and ``outlines``.
        """
        owner = self.owner
        if owner.params.match == "iou":
            row = self._match_iou(labels, stats, window)
        else:
            row = _match_centroid(owner.annotations.nuclei, *centroids)
        out = np.full(row.size, -1, dtype=np.int64)
        out[row >= 0] = owner.class_index[row[row >= 0]]
        # Always: the points inside polygon-matched instances are used too (not "in no nucleus").
        by_points = owner.label_by_points(outlines, window.slide_box(self.fragment, self.down))
        out = np.where(out >= 0, out, by_points)
        out[out < 0] = owner.unmatched
        return out

    def _id_bands(self, window: Window) -> Iterator[tuple[int, npt.NDArray[np.int32]]]:
        """(row offset in ``window``, int32 id-map band over the window's columns), band by band.

        Id ``j + 1`` is ``rows[j]`` (file order, so later features overwrite earlier ones); 0 is none.
        """
        down, fragment = self.down, self.fragment
        width = window.c1 - window.c0
        band_rows = max(1, BAND_PIXELS // max(1, width))
        left, right = fragment.x + down * window.c0, fragment.x + down * window.c1
        in_columns = (self.bounds[:, 2] >= left) & (self.bounds[:, 0] <= right)
        for r0 in range(window.r0, window.r1, band_rows):
            r1 = min(window.r1, r0 + band_rows)
            top, bottom = fragment.y + down * r0, fragment.y + down * r1
            out = np.zeros((r1 - r0, width), dtype=np.int32)
            members = np.flatnonzero(in_columns & (self.bounds[:, 3] >= top) & (self.bounds[:, 1] <= bottom))
            if members.size:  # rasterio refuses an empty shape list
                rio_features.rasterize(
                    ((self.geoms[j], int(j) + 1) for j in members),
                    out=out,
                    transform=Affine(down, 0, left, 0, down, top),
                    all_touched=False,
                )
            yield r0 - window.r0, out

    def _area_in_fragment(self, j: int) -> int:
        """Segmentation-level pixels of id ``j + 1`` in the fragment's id map (later features win over it)."""
        r0, r1, c0, c1 = (int(v) for v in self.pixel_boxes[j])
        if r1 <= r0 or c1 <= c0:
            return 0
        return sum(int(np.count_nonzero(ids == j + 1)) for _, ids in self._id_bands(Window(r0, r1, c0, c1)))

    def _match_iou(self, labels: LabelImage, stats: Instances, window: Window) -> npt.NDArray[np.int64]:
        """(n,) row of the polygon frame each instance matches by IoU (-1: none >= ``min_iou``)."""
        n = stats.area.size
        m = self.rows.size
        matched = np.full(n, -1, dtype=np.int64)
        if m == 0 or n == 0:
            return matched  # the band generator is lazy: nothing rasterized
        annotated_area = np.zeros(m + 1, dtype=np.int64)
        keys: list[npt.NDArray[np.int64]] = []
        counts: list[npt.NDArray[np.int64]] = []
        for r0, ids in self._id_bands(window):
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
        # The instances lie whole in the window, but an annotated nucleus may run past its edge: count
        # those over the fragment, so that the IoU is the untiled one.
        box = self.pixel_boxes[annotated - 1]
        cut = (box[:, 0] < window.r0) | (box[:, 1] > window.r1) | (box[:, 2] < window.c0) | (box[:, 3] > window.c1)
        for j in np.unique(annotated[cut]):
            annotated_area[j] = self._area_in_fragment(int(j) - 1)
        union = stats.area[instance - 1] + annotated_area[annotated] - overlap
        iou = overlap / union
        # Best IoU per instance; among equal IoUs the earlier feature (smaller id).
        order = np.lexsort((annotated, -iou, instance))
        first = np.ones(order.size, dtype=bool)
        first[1:] = instance[order][1:] != instance[order][:-1]
        best = order[first]
        good = iou[best] >= self.owner.params.min_iou
        matched[instance[best][good] - 1] = self.rows[annotated[best][good] - 1]
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
