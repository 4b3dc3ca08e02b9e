"""Tissue detection: Otsu on HSV saturation at thumbnail scale -> fragment bounding boxes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from cellkd.errors import SlideError
from cellkd.params import check_parameters
from cellkd.slides.reader import SlideReader, resolve_mpp
from cellkd.store.fragments import Fragment, fragment_name
from cellkd.types import RGBImage

logger = logging.getLogger(__name__)

MPP_FALLBACK = 0.5
"""µm/px assumed for slides without a resolution (a 20x scan); each use logs a warning."""


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection parameters (``tissue:`` in workflow_config.yaml); lengths in µm."""

    detection_level_size: int = 2048
    """Long side (px) of the thumbnail tissue is detected on."""
    min_area_um2: float = 20_000.0
    """Connected components smaller than this (after closing and hole filling) are dropped as specks."""
    closing_um: float = 20.0
    """Radius of the morphological closing that joins nearby tissue bits into one fragment."""
    margin_um: float = 10.0
    """Padding added on each side of a fragment box (clipped to the slide)."""
    saturation_floor: float = 0.05
    """Lowest saturation threshold: Otsu on a blank slide would otherwise split noise into 'tissue'."""

    def __post_init__(self) -> None:
        checks = [
            (self.detection_level_size >= 32, "detection_level_size", ">= 32"),
            (self.min_area_um2 >= 0, "min_area_um2", ">= 0"),
            (self.closing_um >= 0, "closing_um", ">= 0"),
            (self.margin_um >= 0, "margin_um", ">= 0"),
            (0 <= self.saturation_floor < 1, "saturation_floor", "in [0, 1)"),
        ]
        check_parameters(self, checks, "tissue", " (see tissue: in workflow_config.yaml)")


def saturation(image: RGBImage) -> npt.NDArray[np.float32]:
    """float32 (h, w) HSV saturation in [0, 1] of a uint8 (h, w, 3) image ((max - min) / max, 0 on black)."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    # Element-wise over the three channel planes: numpy's max/min along a length-3 last axis is ~5x slower.
    high = np.maximum(np.maximum(red, green), blue).astype(np.float32)
    low = np.minimum(np.minimum(red, green), blue).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(high > 0, (high - low) / high, np.float32(0)).astype(np.float32)


def close_disk(mask: npt.NDArray[np.bool_], radius: float) -> npt.NDArray[np.bool_]:
    """Binary closing of ``mask`` by a disk of ``radius`` px, treating everything beyond the image edge as empty.

    Uses Euclidean distance transforms, so the cost does not grow with the radius, on the bounding box of
    ``mask`` only: a closing never reaches past it (any pixel outside lies within ``radius`` of one farther than
    ``radius`` from the mask), so the glass around the tissue costs nothing.
    """
    if radius < 1 or not mask.any():
        return mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    # Zero padding: the erosion sees empty glass beyond the box, as the dilation did.
    pad = math.ceil(radius) + 1
    padded = np.pad(mask[box], pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    out = mask.copy()
    out[box] |= closed[pad:-pad, pad:-pad]
    return out


def tissue_mask(thumbnail: RGBImage, params: TissueParams, pixel_um: float) -> npt.NDArray[np.bool_]:
    """bool (h, w) tissue mask of a uint8 (h, w, 3) thumbnail whose pixels are ``pixel_um`` µm wide.

    Saturation > max(Otsu, ``saturation_floor``), then closing and hole filling.
    """
    sat = saturation(thumbnail)
    if sat.max() <= params.saturation_floor:  # blank slide: Otsu would threshold noise
        return np.zeros(sat.shape, dtype=bool)
    threshold = max(float(threshold_otsu(sat)), params.saturation_floor)
    mask = close_disk(sat > threshold, params.closing_um / pixel_um)
    # Fill holes after the closing, so gaps the closing sealed count as tissue too.
    return ndimage.binary_fill_holes(mask)


Box = tuple[int, int, int, int]
"""(y0, x0, y1, x1) in level-0 px, end exclusive."""


def merge_boxes(boxes: list[Box]) -> list[Box]:
    """Merge overlapping or touching boxes into their bounding boxes until no two overlap or touch; sorted.

    Touching includes sharing only an edge or a corner. One pass merges the connected groups of
    touching boxes (an R-tree finds the pairs); a merged box can reach boxes none of its parts touched
    (an L-shaped piece's box swallows a blob in its crook), so passes repeat until nothing changes.
    """
    merged = np.array(sorted(set(boxes)), dtype=np.int64).reshape(-1, 4)
    while len(merged) > 1:
        y0, x0, y1, x1 = merged.T
        # shapely's closed boxes intersect when they merely share an edge (x1 == other x0: adjacent pixels).
        polygons = shapely.box(x0, y0, x1, y1)
        first, second = shapely.STRtree(polygons).query(polygons, predicate="intersects")
        graph = coo_array((np.ones(len(first), dtype=bool), (first, second)), shape=(len(merged),) * 2)
        n_groups, group = connected_components(graph, directed=False)
        if n_groups == len(merged):
            break
        merged = np.stack(
            [
                ndimage.minimum(y0, group, range(n_groups)),
                ndimage.minimum(x0, group, range(n_groups)),
                ndimage.maximum(y1, group, range(n_groups)),
                ndimage.maximum(x1, group, range(n_groups)),
            ],
            axis=1,
        ).astype(np.int64)
    return sorted((int(a), int(b), int(c), int(d)) for a, b, c, d in merged)


def detect_fragments(
    slide: SlideReader, params: TissueParams | None = None, *, mpp_fallback: float = MPP_FALLBACK
) -> list[Fragment]:
    """Tissue fragments of ``slide`` as boxes in level-0 px, ordered top-to-bottom, then left-to-right.

    Boxes are the smallest axis-aligned boxes around each component at thumbnail scale
    (rounded outwards to level-0 px, so accurate to one thumbnail pixel: a thumbnail pixel only
    partly on tissue may fall below the threshold), grown by ``margin_um`` and clipped to the slide.
    Boxes that then overlap or touch are merged (``merge_boxes``): a nucleus in two boxes would be
    predicted twice and could land in two splits, so every level-0 pixel belongs to at most one fragment.
    Specks below ``min_area_um2`` are dropped; µm become px with the slide's mpp, or ``mpp_fallback``
    (with a warning) when the file has none.
    Raises ``SlideError`` when no component is large enough.
    """
    params = params or TissueParams()
    mpp = resolve_mpp(slide, mpp_fallback)
    width, height = slide.dimensions
    thumb, (down_x, down_y) = slide.thumbnail(params.detection_level_size)
    mask = tissue_mask(thumb, params, pixel_um=mpp * math.sqrt(down_x * down_y))
    pixel_area_um2 = (mpp * down_x) * (mpp * down_y)
    margin = round(params.margin_um / mpp)

    boxes: list[Box] = []
    regions = regionprops(label(mask, connectivity=2))
    for region in regions:
        if region.area * pixel_area_um2 < params.min_area_um2:
            continue
        r0, c0, r1, c1 = region.bbox  # thumbnail px, end exclusive
        x0 = max(math.floor(c0 * down_x) - margin, 0)
        y0 = max(math.floor(r0 * down_y) - margin, 0)
        x1 = min(math.ceil(c1 * down_x) + margin, width)
        y1 = min(math.ceil(r1 * down_y) + margin, height)
        boxes.append((y0, x0, y1, x1))
    if not boxes:
        msg = (
            f"{slide.path}: no tissue found ({len(regions)} candidate region(s), none >= min_area_um2="
            f"{params.min_area_um2:g} µm² at {mpp:.3g} µm/px); check that the slide holds stained tissue, "
            "or lower tissue.min_area_um2 / saturation_floor in workflow_config.yaml"
        )
        raise SlideError(msg)
    kept = len(boxes)
    boxes = merge_boxes(boxes)
    fragments = [Fragment(fragment_name(i), x0, y0, x1 - x0, y1 - y0) for i, (y0, x0, y1, x1) in enumerate(boxes)]
    logger.info(
        "%s: %d fragment(s) from %d region(s) (%d above min_area_um2, merged where their boxes overlap or touch) "
        "on a %dx%d thumbnail",
        slide.path,
        len(fragments),
        len(regions),
        kept,
        thumb.shape[1],
        thumb.shape[0],
    )
    return fragments
