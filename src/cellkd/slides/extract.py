"""Stream tissue fragments from a slide into the raw fragment store, building levels 1/2 and 1/4."""

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
from cellkd.store.fragments import Fragment, FragmentStoreWriter, iter_windows
from cellkd.types import DOWNSAMPLES, RGBImage
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

TILE = 1024
"""Level-0 read tile edge (px); a multiple of every downsample so level-k tiles land on whole pixels."""

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
    slide: SlideReader,
    fragments: list[Fragment],
    *,
    tile: int = TILE,
    levels: int = len(DOWNSAMPLES),
    threads: int | None = None,
) -> Iterator[tuple[Fragment, int, int, tuple[RGBImage, ...]]]:
    """Each fragment's ``tile`` x ``tile`` level-0 windows, row-major, fragment by fragment.

    Yields ``(fragment, y, x, tiles)``: the window's offset inside the fragment (level-0 px) and its pixels at
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
) -> list[Fragment]:
    """Detect tissue on ``slide_path`` and write each fragment at levels 0, 1, 2 (downsample 1, 2, 4).

    Writes the fragment store ``out_path`` (stain "raw"; layout in ``cellkd.store``) atomically,
    streaming ``tile`` x ``tile`` level-0 tiles: memory stays at a few tiles whatever the slide size.
    ``threads`` worker threads decode tiles and build their reductions while this thread writes (see
    ``iter_tissue_tiles``); the store is the same for any number of threads.
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
        n_windows = sum(1 for f in fragments for _ in iter_windows(f.height, f.width, tile))
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
            tiles = iter_tissue_tiles(slide, fragments, tile=tile, threads=threads)
            for fragment, y, x, pyramid in progress(tiles, desc=f"extract {slide_id}", total=n_windows):
                # x, y are multiples of 4 (tile is), so the level-k offsets are exact.
                for dataset, down, pixels in zip(datasets[fragment.name], DOWNSAMPLES, pyramid, strict=True):
                    top, left = y // down, x // down
                    dataset[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
    area = sum(f.width * f.height for f in fragments)
    logger.info("%s: wrote %d fragment(s), %.1f MPix at level 0, to %s", slide_id, len(fragments), area / 1e6, out_path)
    return fragments
