"""Per-nucleus image crops and outlines, cut from the fragment images and the instance labels.

Coordinates: QuPath's continuous level-0 frame: pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``,
so a one-pixel instance at level-0 slide pixel (r, c) has centroid (c + 0.5, r + 0.5). The
level-k crop (downsample d = 1, 2, 4) of edge S is cut from the fragment's level-k image so that
the level-k pixel containing the centroid, ``floor((centroid - fragment origin) / d)``, sits at
crop index ``S // 2`` (row and column); pixels outside the fragment are zero.

Outlines: the instance's pixels at the segmentation level, vectorized by ``rasterio.features.shapes``
(8-connectivity, holes kept) and scaled to level 0, so a square instance of k x k mask pixels at
downsample d has an outline of area ``(d k)^2`` with integer vertices on pixel corners. GDAL joins
pixels that touch only diagonally into one ring that touches itself, which is not a valid polygon
(OGC); such an outline is split at the touching corners (``shapely.make_valid``) and its largest
piece kept, as for an instance that vectorizes into several pieces. The outline's area is then
smaller than ``area`` (which always counts every pixel); otherwise the two are equal.

Both run in row bands of ``BAND_PIXELS`` (bounded memory).
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import numpy.typing as npt
import shapely
import shapely.geometry
from rasterio import features as rio_features
from rasterio.transform import Affine

from cellkd.nuclei.instances import BAND_PIXELS, Instances, LabelImage
from cellkd.store.fragments import CHUNK

logger = logging.getLogger(__name__)


def _largest_polygon(geometry: shapely.Geometry) -> shapely.Polygon:
    """The largest-area Polygon among the parts of ``geometry`` (empty Polygon when it has none)."""
    parts = shapely.get_parts(shapely.get_parts(geometry))  # twice: make_valid may nest multipolygons
    polygons = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    if not polygons:
        return shapely.Polygon()
    return max(polygons, key=lambda p: p.area)


def instance_outlines(
    labels: LabelImage, stats: Instances, origin: tuple[float, float], down: int
) -> npt.NDArray[np.object_]:
    """(n,) valid shapely Polygons of labels 1..n (label order), level-0 slide px; layout in the module docstring.

    ``origin``: level-0 slide (x, y) of the corner of ``labels[0, 0]`` (a fragment's or a tile's);
    ``down``: level-0 px per label pixel.

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
        transform = Affine(down, 0, origin[0], 0, down, origin[1] + down * r0)
        for geojson, value in rio_features.shapes(window, mask=selected[window], connectivity=8, transform=transform):
            polygon = shapely.geometry.shape(geojson)
            i = int(value) - 1
            # Several pieces of one id (not 8-connected): keep the largest.
            if polygon.area > best_area[i]:
                out[i], best_area[i] = polygon, polygon.area
    invalid = np.flatnonzero(~shapely.is_valid(out))
    if invalid.size:
        out[invalid] = [_largest_polygon(g) for g in shapely.make_valid(out[invalid])]
        logger.debug("%d outlines touched themselves at a corner; kept their largest piece", invalid.size)
    return out


def cut_crops(image: h5py.Dataset, row: npt.NDArray[np.int64], col: npt.NDArray[np.int64], size: int) -> np.ndarray:
    """uint8 (n, size, size, 3) crops of ``image`` (H, W, 3) with pixel (row, col) at crop index size // 2.

    ``row`` (sorted) and ``col`` lie inside the image. The image is read in row bands (whole chunk
    rows) with a margin, over the columns the crops span only (a tile's nuclei read a tile's width
    of a wide fragment), zero-padded, and the crops of the nuclei centred in a band are gathered
    from it by one fancy index; pixels outside the image are zero.
    """
    n = row.size
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out
    height, width = image.shape[:2]
    half = size // 2
    offsets = np.arange(size)
    left = int(col.min()) - half  # crop columns of centre c: c - half .. c - half + size - 1
    span = int(col.max()) - half + size - left
    a_col, b_col = max(left, 0), min(left + span, width)
    # Bands of whole chunk rows within the memory budget; the padded band is (rows + size - 1, span).
    band_rows = max(CHUNK, BAND_PIXELS // max(1, span * 3) // CHUNK * CHUNK)
    band_rows = min(band_rows, height)  # a small fragment is one band, not a large empty buffer
    for r0 in range(int(row[0]) // band_rows * band_rows, int(row[-1]) + 1, band_rows):
        start, stop = np.searchsorted(row, [r0, r0 + band_rows])
        if stop == start:
            continue
        top = r0 - half  # crop rows of centre r: r - half .. r - half + size - 1
        padded = np.zeros((band_rows + size - 1, span, 3), dtype=np.uint8)
        a, b = max(top, 0), min(top + padded.shape[0], height)
        padded[a - top : b - top, a_col - left : b_col - left] = image[a:b, a_col:b_col]
        rr = (row[start:stop] - r0)[:, None, None] + offsets[None, :, None]
        cc = (col[start:stop] - half - left)[:, None, None] + offsets[None, None, :]
        out[start:stop] = padded[rr, cc]
    return out
