"""Matching nucleus instances to annotated nuclei: the class each annotation set gives each instance.

Labels: class index ``i`` is ``classes[i]``; ``len(classes)`` is background. An instance takes
the class of the annotated nucleus it matches: with ``match="iou"`` the one with the highest IoU
(ties: the earlier feature), if that IoU >= ``min_iou``; with ``match="centroid"`` the one whose
polygon contains the instance's centroid (boundary included). Where annotated polygons overlap,
the later feature in the file wins (in the IoU id map and for the centroid). An unmatched
instance is a nucleus the annotation does not have: **background** for complete sets (ssa, wsa,
truth), but **-1** (``UNLABELLED``, never background) for partial sets (``NucleiParams.partial_sets``,
default ``("ea",)``), where an expert labelled only a subset of the nuclei.

IoU is measured on the raster of the segmentation level, inside the fragment (annotated nuclei
that cross the fragment edge count only their part inside it). The annotation id maps are
rasterized in row bands of ``BAND_PIXELS``.
"""

from __future__ import annotations

from collections.abc import Iterator

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely
from rasterio import features as rio_features
from rasterio.transform import Affine

from cellkd.nuclei.instances import BAND_PIXELS, Instances, LabelImage
from cellkd.nuclei.params import NucleiParams
from cellkd.store.fragments import Fragment
from cellkd.store.nuclei import UNLABELLED


def label_instances(
    set_name: str,
    frame: gpd.GeoDataFrame,
    labels: LabelImage,
    stats: Instances,
    centroids: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
    fragment: Fragment,
    down: int,
    n_classes: int,
    params: NucleiParams,
) -> npt.NDArray[np.int64]:
    """(n,) class index that annotation set ``set_name`` (its polygons ``frame``) gives each instance, label order.

    ``labels``: the fragment's instances at the segmentation level (downsample ``down``) with their
    ``stats``; ``centroids``: their (x, y) in level-0 slide px. Unmatched: see the module docstring.
    """
    if params.match == "iou":
        row = _match_iou(labels, stats, frame, fragment, down, params.min_iou)
    else:
        row = _match_centroid(frame, *centroids)
    unmatched = UNLABELLED if set_name in params.partial_sets else n_classes
    class_index = frame["class_index"].to_numpy(dtype=np.int64)
    return np.where(row >= 0, class_index[np.maximum(row, 0)], unmatched)


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
    labels: LabelImage, stats: Instances, frame: gpd.GeoDataFrame, fragment: Fragment, down: int, min_iou: float
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
