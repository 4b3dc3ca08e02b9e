"""Nucleus instances: connected components of a predicted mask, touching nuclei split by a watershed.

Memory: a fragment's predicted mask is labelled as a whole, so a fragment needs about 5 bytes per
segmentation-level pixel (uint8 mask + int32 labels): 2 GB for a 20k x 20k fragment. The other
passes over the labels (areas, statistics) run in row bands of ``BAND_PIXELS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from cellkd.nuclei.params import NucleiParams

LabelImage = npt.NDArray[np.int32]
"""int32 (H, W) instance labels: 0 background, 1..n the instances."""

BAND_PIXELS = 16 * 2**20
"""Pixels per row band of the banded passes (id maps, statistics, outlines, crop reads)."""
_EIGHT = np.ones((3, 3), dtype=bool)
"""8-connectivity: diagonal neighbours belong to the same nucleus."""


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
class Instances:
    """Per-instance statistics of one fragment, in label order (row i = label i + 1)."""

    area: npt.NDArray[np.int64]  # segmentation-level px
    row_sum: npt.NDArray[np.float64]
    col_sum: npt.NDArray[np.float64]
    boxes: list[tuple[slice, slice] | None] = field(default_factory=list)


def instance_stats(labels: LabelImage, n: int) -> Instances:
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
    return Instances(area[1:], row_sum[1:], col_sum[1:], boxes)
