"""Nucleus instances: connected components of a predicted mask, touching nuclei split by a watershed.

Memory: the functions here label whatever mask they are given, about 5 bytes per pixel (uint8 mask +
int32 labels); ``cellkd.nuclei.extract`` hands them one tile (plus halo) of a fragment at a time, so a
job's peak does not grow with the fragment. The passes over the labels (areas, statistics) run in row
bands of ``BAND_PIXELS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.morphology import convex_hull_image, h_maxima
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

    Instances are 8-connected components; with ``params.split_touching`` a component that is clearly
    several nuclei (several h-maxima of its distance transform and a waist between them) is split by a
    watershed: see :func:`_split_touching`.
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
        n = _split_touching(labels, n, params, 2 * min_pixels)
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


def _split_touching(labels: LabelImage, n: int, params: NucleiParams, min_pixels: int) -> int:
    """Split components of ``labels`` (in place) that are clearly several nuclei; the new label count.

    Markers are the h-maxima (``params.split_depth``) of the distance transform, parts the watershed
    from them. Pixel staircases and contour wobble put several such maxima on one thin elongated
    nucleus, so the markers alone over-split it; a shape test decides instead (``params.split_waist``):
    a component without a waist is never split, and two adjacent parts whose union has no waist are
    joined again (see :func:`_waist_depth`).
    """
    next_id = n + 1
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        view = labels[box]  # a view: writes go to ``labels``
        inside = view == index
        if np.count_nonzero(inside) < min_pixels:
            continue  # both parts would fall below min_area
        # A one-pixel margin: the box edge must count as background for the distance transforms.
        padded = np.zeros((inside.shape[0] + 2, inside.shape[1] + 2), dtype=bool)
        padded[1:-1, 1:-1] = inside
        distance = ndimage.distance_transform_edt(padded)
        # Cheap pre-test: one connected set of (non-strict) local maxima means one regional maximum.
        local = (distance == ndimage.maximum_filter(distance, size=3)) & padded
        if ndimage.label(local, structure=_EIGHT)[1] < 2:
            continue
        markers, count = ndimage.label(h_maxima(distance, params.split_depth).astype(bool) & padded, structure=_EIGHT)
        if count < 2 or _waist_depth(padded) < params.split_waist:
            continue
        parts = watershed(-distance, markers, mask=padded, connectivity=2)
        parts, count = _join_parts_without_waist(parts, count, params.split_waist)
        if count < 2:
            continue
        parts = parts[1:-1, 1:-1]
        # Part 1 keeps the component's id; the others get new ids.
        moved = inside & (parts > 1)
        view[moved] = next_id + parts[moved] - 2
        next_id += count - 1
    return next_id - 1


def _waist_depth(mask: npt.NDArray[np.bool_]) -> float:
    """Depth (px) of the deepest concavity of ``mask``: how far its convex-hull deficit reaches into the hull.

    The hull is that of the pixel corners, so the staircase of any convex outline leaves a deficit
    exactly 1 px deep; two touching round nuclei leave a notch on each side of their neck, as deep as
    the neck is narrower than the nuclei. ``mask`` needs a background margin of one pixel.
    """
    hull = convex_hull_image(mask)
    deficit = hull & ~mask
    if not deficit.any():
        return 0.0
    return float(ndimage.distance_transform_edt(hull)[deficit].max())


def _join_parts_without_waist(
    parts: npt.NDArray[np.int32], count: int, waist: float
) -> tuple[npt.NDArray[np.int32], int]:
    """Join adjacent watershed ``parts`` (1..count) whose union has no waist; relabelled parts and their count.

    Each 8-adjacent pair is tested on its own and joins are transitive, so a long nucleus cut into
    three pieces becomes whole again while a waist between two nuclei keeps them apart.
    """
    group = np.arange(count + 1)

    def root(part: int) -> int:
        while group[part] != part:
            part = group[part]
        return part

    for a, b in _adjacent_pairs(parts):
        if _waist_depth((parts == a) | (parts == b)) < waist:
            group[max(root(a), root(b))] = min(root(a), root(b))
    roots = np.array([root(part) for part in range(count + 1)])
    # Consecutive ids in order of each group's first part: the group holding part 1 stays 1.
    _, lookup = np.unique(roots, return_inverse=True)
    return lookup.astype(np.int32)[parts], int(lookup.max())


def _adjacent_pairs(parts: npt.NDArray[np.int32]) -> list[tuple[int, int]]:
    """Sorted (a, b), a < b, of the nonzero parts that touch (8-connectivity)."""
    pairs: set[tuple[int, int]] = set()
    shifted = (
        (parts[:, :-1], parts[:, 1:]),
        (parts[:-1], parts[1:]),
        (parts[:-1, :-1], parts[1:, 1:]),
        (parts[:-1, 1:], parts[1:, :-1]),
    )
    for a, b in shifted:
        touching = (a != b) & (a > 0) & (b > 0)
        pairs.update(zip(np.minimum(a, b)[touching].tolist(), np.maximum(a, b)[touching].tolist(), strict=True))
    return sorted(pairs)


@dataclass
class Instances:
    """Per-instance statistics of one labelled tile, in label order (row i = label i + 1)."""

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
