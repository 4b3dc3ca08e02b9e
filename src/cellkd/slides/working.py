"""A slide read at the working resolution: the nearest pyramid level, resampled by the remaining factor.

Pixel ``(r, c)`` of the working grid covers the level-0 square ``scale * [c, c + 1) x scale * [r, r + 1)``
(``SlideGeometry``: one scale, origin shared). It is read from the coarsest pyramid level that is not coarser
than the working resolution (beyond ``LEVEL_TOLERANCE``), so a 0.25 µm/px slide read at 0.5 uses its 2x level
when it has one and block means of nothing, and the rest of the way is resampled:

- down (the level is finer): a Gaussian pre-filter of sigma ``(f - 1) / 2`` level px (the anti-aliasing of
  ``skimage.transform.rescale``), then bilinear sampling at each working pixel's centre;
- up (the working grid is finer than level 0): bilinear sampling;
- a whole-pixel match (the factor snapped to 1): the level's pixels as they are.

Every window is read with a margin that covers the filter and the interpolation, so a working pixel's value
does not depend on the window it was read in: tiles join without seams, whatever the tiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from cellkd.slides.reader import SlideReader
from cellkd.store.fragments import SlideGeometry
from cellkd.types import RGBImage

LEVEL_TOLERANCE = 0.01
"""A pyramid level up to 1% coarser than the working resolution still counts as fine enough (scanner rounding)."""


def nearest_level(downsamples: tuple[float, ...], scale: float) -> int:
    """The pyramid level to read for ``scale`` level-0 px per working px: the coarsest one not coarser than it.

    ``downsamples`` are the levels' level-0 px per level px, finest first (level 0 is 1). A level up to
    ``LEVEL_TOLERANCE`` coarser still qualifies; level 0 when none does (the working grid is finer).
    """
    fine_enough = [k for k, down in enumerate(downsamples) if down <= scale * (1 + LEVEL_TOLERANCE)]
    return max(fine_enough, key=lambda k: downsamples[k], default=0)


def resample_window(
    read: Callable[[int, int, int, int], RGBImage],
    factor: float,
    x: int,
    y: int,
    width: int,
    height: int,
) -> RGBImage:
    """uint8 (height, width, 3): the working-px box at (x, y) of an image ``factor`` source px per working px.

    ``read(x, y, w, h)`` returns the source's uint8 (h, w, 3) pixels at (x, y) (outside reads white). Working
    pixel ``c`` is sampled at source position ``(c + 0.5) * factor`` (pixel corners on whole numbers); the
    module docstring gives the filter. ``factor == 1``: the source box itself.
    """
    if factor == 1.0:
        return read(x, y, width, height)
    sigma = (factor - 1) / 2 if factor > 1 else 0.0
    margin = math.ceil(4 * sigma) + 2
    # Source pixel-index coordinates (centres on whole numbers) of the first and last working centres.
    first_x, first_y = (x + 0.5) * factor - 0.5, (y + 0.5) * factor - 0.5
    last_x, last_y = (x + width - 0.5) * factor - 0.5, (y + height - 0.5) * factor - 0.5
    x0, y0 = math.floor(first_x) - margin, math.floor(first_y) - margin
    x1, y1 = math.ceil(last_x) + margin + 1, math.ceil(last_y) + margin + 1
    source = read(x0, y0, x1 - x0, y1 - y0)
    if sigma > 0:
        source = cv2.GaussianBlur(source, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    # dst (u, v) samples source (factor * u + first_x - x0, factor * v + first_y - y0).
    matrix = np.array([[factor, 0.0, first_x - x0], [0.0, factor, first_y - y0]], dtype=np.float64)
    out = cv2.warpAffine(
        source,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.ascontiguousarray(out)


class WorkingSlide:
    """``slide`` seen at the working resolution of ``geometry``: ``read_region`` takes working px.

    ``level``: the pyramid level the pixels come from (``nearest_level``); ``factor``: level px per working px.
    """

    def __init__(self, slide: SlideReader, geometry: SlideGeometry) -> None:
        self.slide = slide
        self.geometry = geometry
        self.path = slide.path
        self.dimensions = geometry.size_to_working(slide.dimensions)
        self.concurrent_reads = slide.concurrent_reads
        downsamples = slide.level_downsamples
        self.level = nearest_level(downsamples, geometry.scale)
        factor = geometry.scale / downsamples[self.level]
        # OpenSlide's downsamples of odd-sized levels are a hair off whole numbers (2.0003): read those as whole.
        self.factor = 1.0 if abs(factor - 1) <= 1e-3 else factor

    def _read_level(self, x: int, y: int, width: int, height: int) -> RGBImage:
        return self.slide.read_level(self.level, x, y, width, height)

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the working-px box at (x, y); outside the slide reads white."""
        return resample_window(self._read_level, self.factor, x, y, width, height)

    def __repr__(self) -> str:
        return (
            f"WorkingSlide({self.path!r}, {self.geometry.working_mpp:.4g} µm/px from level {self.level} "
            f"x {self.factor:.4g})"
        )
