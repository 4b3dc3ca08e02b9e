"""Stream tissue fragments from a slide into the raw fragment store, building levels 1/2 and 1/4."""

from __future__ import annotations

import logging
import os

from cellkd.slides.downsample import block_sums, mean_of_sums
from cellkd.slides.reader import open_slide
from cellkd.slides.tissue import MPP_FALLBACK, TissueParams, detect_fragments
from cellkd.store.fragments import Fragment, FragmentStoreWriter, iter_windows
from cellkd.types import DOWNSAMPLES, RGBImage
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

TILE = 1024
"""Level-0 read tile edge (px); a multiple of every downsample so level-k tiles land on whole pixels."""


def _pyramid_tiles(tile0: RGBImage) -> tuple[RGBImage, RGBImage]:
    """Level-1 and level-2 tiles of a level-0 tile; level 2 is the exact mean of level-0 pixels."""
    sums1, counts1 = block_sums(tile0, 2)
    # Summing level-1 sums (not means) keeps level 2 the exact mean of the level-0 pixels;
    # uint16 holds 16 * 255.
    sums2, _ = block_sums(sums1, 2)
    counts2, _ = block_sums(counts1, 2)
    return mean_of_sums(sums1, counts1), mean_of_sums(sums2, counts2)


def extract_fragments(
    slide_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    slide_id: str,
    params: TissueParams | None = None,
    mpp_fallback: float = MPP_FALLBACK,
    *,
    mpp: float | None = None,
    tile: int = TILE,
) -> list[Fragment]:
    """Detect tissue on ``slide_path`` and write each fragment at levels 0, 1, 2 (downsample 1, 2, 4).

    Writes the fragment store ``out_path`` (stain "raw"; layout in ``cellkd.store``) atomically,
    streaming ``tile`` x ``tile`` level-0 tiles: memory stays at a few tiles whatever the slide size.
    The store's ``mpp`` attribute is the slide's own (NaN when unknown; ``mpp_fallback`` is only
    used to turn the µm parameters into pixels); ``mpp``, when given (the slide sheet's column),
    overrides the slide's own value. Returns the fragments (boxes in level-0 px).
    """
    if tile <= 0 or tile % DOWNSAMPLES[-1]:
        raise ValueError(f"tile={tile} must be a positive multiple of {DOWNSAMPLES[-1]}")
    with open_slide(slide_path) as slide:
        if mpp is not None:
            slide.mpp = mpp
        fragments = detect_fragments(slide, params, mpp_fallback=mpp_fallback)
        windows = [(f, *w) for f in fragments for w in iter_windows(f.height, f.width, tile)]
        writer = FragmentStoreWriter(
            out_path,
            slide=slide_id,
            source=str(slide_path),
            stain="raw",
            mpp=slide.mpp if slide.mpp is not None else float("nan"),
            slide_size=slide.dimensions,
        )
        with writer:
            datasets = {f.name: [writer.create_level(f, k) for k in range(len(DOWNSAMPLES))] for f in fragments}
            for fragment, y, x, h, w in progress(windows, desc=f"extract {slide_id}", total=len(windows)):
                tile0 = slide.read_region(fragment.x + x, fragment.y + y, w, h)
                level0, level1, level2 = datasets[fragment.name]
                level0[y : y + h, x : x + w] = tile0
                tile1, tile2 = _pyramid_tiles(tile0)
                # x, y are multiples of 4 (tile is), so the level-k offsets are exact.
                level1[y // 2 : y // 2 + tile1.shape[0], x // 2 : x // 2 + tile1.shape[1]] = tile1
                level2[y // 4 : y // 4 + tile2.shape[0], x // 4 : x // 4 + tile2.shape[1]] = tile2
    area = sum(f.width * f.height for f in fragments)
    logger.info("%s: wrote %d fragment(s), %.1f MPix at level 0, to %s", slide_id, len(fragments), area / 1e6, out_path)
    return fragments
