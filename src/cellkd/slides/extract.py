"""Stream tissue fragments from a slide into the raw fragment store at the working resolution, with levels 1/2, 1/4."""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from cellkd.slides.downsample import halvings
from cellkd.slides.reader import SlideReader, open_slide
from cellkd.slides.tissue import MPP_FALLBACK, TissueParams, detect_fragments
from cellkd.slides.working import WorkingSlide
from cellkd.store.fragments import Fragment, FragmentStoreWriter, SlideGeometry, iter_windows
from cellkd.types import DOWNSAMPLES, RGBImage
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

TILE = 1024
"""Read tile edge (working px); a multiple of every downsample so level-k tiles land on whole pixels."""

MAX_READ_THREADS = 4
"""Most threads decoding tiles at once: past the cores, more only hold more tiles in memory."""

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def default_read_threads() -> int:
    """Tile-decoding threads when none are given: the cores this process may use, at most ``MAX_READ_THREADS``."""
    return max(1, min(MAX_READ_THREADS, len(os.sched_getaffinity(0))))


def threaded_map(function: Callable[[_Item], _Result], items: Iterable[_Item], threads: int) -> Iterator[_Result]:
    """``map(function, items)`` computed by ``threads`` worker threads, yielded in order.

    At most ``2 * threads`` results are computed ahead of the one the caller holds, so memory stays at a few
    items however many there are. ``threads=0`` computes each item in the calling thread when it is asked for.
    An exception in ``function`` is raised here, at its item; the items not yet started are then dropped.
    """
    if threads < 0:
        raise ValueError(f"threads={threads} must be >= 0")
    if threads == 0:
        yield from map(function, items)
        return
    remaining = iter(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cellkd-tiles") as pool:
        pending: deque[Future[_Result]] = deque(
            pool.submit(function, item) for item in itertools.islice(remaining, 2 * threads)
        )
        try:
            while pending:
                result = pending.popleft().result()
                # Queue the next item before handing this one over, so the workers keep decoding meanwhile.
                pending.extend(pool.submit(function, item) for item in itertools.islice(remaining, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


def iter_tissue_tiles(
    slide: SlideReader | WorkingSlide,
    fragments: list[Fragment],
    *,
    tile: int = TILE,
    levels: int = len(DOWNSAMPLES),
    threads: int | None = None,
) -> Iterator[tuple[Fragment, int, int, tuple[RGBImage, ...]]]:
    """Each fragment's ``tile`` x ``tile`` windows, row-major, fragment by fragment, in ``slide``'s pixels.

    Yields ``(fragment, y, x, tiles)``: the window's offset inside the fragment (``slide`` px) and its pixels at
    the first ``levels`` pyramid levels (downsample 1, 2, 4, ...). ``threads`` worker threads (default
    ``default_read_threads()``) read and reduce the windows ahead of the caller, a few at a time; a reader that
    cannot be read concurrently (``SlideReader.concurrent_reads``) is read in the calling thread.
    """
    if tile <= 0 or tile % 2 ** (levels - 1):
        raise ValueError(f"tile={tile} must be a positive multiple of {2 ** (levels - 1)}")
    windows = [(f, *w) for f in fragments for w in iter_windows(f.height, f.width, tile)]
    threads = default_read_threads() if threads is None else threads
    if not slide.concurrent_reads:
        threads = 0

    def read(window: tuple[Fragment, int, int, int, int]) -> tuple[Fragment, int, int, tuple[RGBImage, ...]]:
        fragment, y, x, h, w = window
        return fragment, y, x, halvings(slide.read_region(fragment.x + x, fragment.y + y, w, h), levels)

    return threaded_map(read, windows, threads)


def extract_fragments(
    slide_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    slide_id: str,
    params: TissueParams | None = None,
    mpp_fallback: float = MPP_FALLBACK,
    *,
    mpp: float | None = None,
    tile: int = TILE,
    threads: int | None = None,
    working_mpp: float | None = None,
) -> list[Fragment]:
    """Detect tissue on ``slide_path`` and write each fragment at levels 0, 1, 2 (downsample 1, 2, 4).

    Level 0 is the slide at ``working_mpp`` µm/px (config ``mpp``): read from its nearest pyramid level and
    resampled (``cellkd.slides.working``); None keeps the slide's own pixels. The store records the
    ``SlideGeometry`` that maps its pixels to the slide's level-0 px. Writes the fragment store
    ``out_path`` (stain "raw"; layout in ``cellkd.store``) atomically, streaming ``tile`` x ``tile``
    tiles: memory stays at a few tiles whatever the slide size. ``threads`` worker threads decode tiles
    and build their reductions while this thread writes (see ``iter_tissue_tiles``); the store is the same
    for any number of threads. The slide's resolution is ``mpp`` when given (the slide sheet's column),
    else the slide's own, else ``mpp_fallback`` (with a warning): it turns the µm parameters into pixels
    and, with ``working_mpp``, sets the scale (without ``working_mpp`` an unknown mpp is stored as NaN).
    Returns the fragments (boxes in working px).
    """
    if tile <= 0 or tile % DOWNSAMPLES[-1]:
        raise ValueError(f"tile={tile} must be a positive multiple of {DOWNSAMPLES[-1]}")
    with open_slide(slide_path) as slide:
        if mpp is not None:
            slide.mpp = mpp
        slide_fragments = detect_fragments(slide, params, mpp_fallback=mpp_fallback)  # warns on a missing mpp
        if working_mpp is None:
            geometry = SlideGeometry.identity(slide.mpp if slide.mpp is not None else float("nan"))
        else:
            slide_mpp = slide.mpp if slide.mpp is not None else mpp_fallback
            geometry = SlideGeometry.for_slide(slide_mpp, working_mpp, assumed=slide.mpp is None)
        fragments = [geometry.box_to_working(f) for f in slide_fragments]
        working = WorkingSlide(slide, geometry)
        logger.info("%s: read as %r", slide_id, working)
        n_windows = sum(1 for f in fragments for _ in iter_windows(f.height, f.width, tile))
        writer = FragmentStoreWriter(
            out_path,
            slide=slide_id,
            source=str(slide_path),
            stain="raw",
            slide_size=slide.dimensions,
            geometry=geometry,
        )
        with writer:
            datasets = {f.name: [writer.create_level(f, k) for k in range(len(DOWNSAMPLES))] for f in fragments}
            tiles = iter_tissue_tiles(working, fragments, tile=tile, threads=threads)
            for fragment, y, x, pyramid in progress(tiles, desc=f"extract {slide_id}", total=n_windows):
                # x, y are multiples of 4 (tile is), so the level-k offsets are exact.
                for dataset, down, pixels in zip(datasets[fragment.name], DOWNSAMPLES, pyramid, strict=True):
                    top, left = y // down, x // down
                    dataset[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    area = sum(f.width * f.height for f in fragments)
    logger.info(
        "%s: wrote %d fragment(s), %.1f MPix at %.4g µm/px, to %s",
        slide_id, len(fragments), area / 1e6, geometry.working_mpp, out_path,
    )  # fmt: skip
    return fragments
