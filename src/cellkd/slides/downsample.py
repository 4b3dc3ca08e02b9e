"""Block means: the exact pyramid arithmetic shared by fragment extraction, thumbnails and dataset import."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from PIL import Image

from cellkd.types import RGBImage


def block_sums(image: npt.NDArray[np.integer], factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``factor`` x ``factor`` blocks of an (H, W, C) integer image.

    Returns sums (ceil(H/f), ceil(W/f), C) and pixel counts (ceil(H/f), ceil(W/f), 1); blocks cut
    by the right/bottom edge sum only the pixels present. uint8 input accumulates in uint16 for
    factor <= 16 (exact: 16 * 16 * 255 < 2**16) and in uint32 above; other input in its own dtype, so the
    caller keeps it from overflowing.
    """
    height, width = image.shape[:2]
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    pad_h, pad_w = out_h * factor - height, out_w * factor - width
    acc = (np.uint16 if factor <= 16 else np.uint32) if image.dtype == np.uint8 else image.dtype
    src = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else image
    # factor² strided adds beat reshape(...).sum(axis=(1, 3)), which numpy runs with poor locality.
    sums = src[0::factor, 0::factor].astype(acc)
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                sums += src[dy::factor, dx::factor]
    rows = np.minimum(factor, height - factor * np.arange(out_h))
    cols = np.minimum(factor, width - factor * np.arange(out_w))
    return sums, (rows[:, None] * cols[None, :]).astype(acc)[..., None]


def mean_of_sums(sums: np.ndarray, counts: np.ndarray) -> RGBImage:
    """uint8 block means from block sums and counts, rounding half up."""
    first = int(counts.flat[0])
    if first & (first - 1) == 0 and (counts == first).all():
        # Whole blocks of 2^k pixels (every tile but the last in a row/column): a shift, not a division.
        shift = first.bit_length() - 1
        return ((sums + (first // 2)) >> shift).astype(np.uint8)
    return ((sums + counts // 2) // counts).astype(np.uint8)


def block_mean(image: RGBImage, factor: int) -> RGBImage:
    """uint8 (ceil(H/f), ceil(W/f), 3): mean of each ``factor``-block of a uint8 (H, W, 3) image.

    Blocks cut by the right/bottom edge average only the pixels present; rounds half up,
    ``(sum + count // 2) // count``.
    """
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1")
    return mean_of_sums(*block_sums(image, factor))


def windowed_block_mean(
    read: Callable[[int, int, int, int], RGBImage], width: int, height: int, factor: int, window: tuple[int, int]
) -> RGBImage:
    """uint8 (ceil(H/f), ceil(W/f), 3) block means of a (height, width) image read window by window.

    ``read(x, y, w, h)`` returns the uint8 (h, w, 3) pixels at (x, y). Windows are at most ``window``
    (width, height) px, rounded down to whole blocks (at least one), so memory stays at one window
    whatever the image size; the result equals ``block_mean`` of the whole image.
    """
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1")
    step_x = max(1, window[0] // factor) * factor
    step_y = max(1, window[1] // factor) * factor
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), 3), dtype=np.uint8)
    for y in range(0, height, step_y):
        for x in range(0, width, step_x):
            block = block_mean(read(x, y, min(step_x, width - x), min(step_y, height - y)), factor)
            out[y // factor : y // factor + block.shape[0], x // factor : x // factor + block.shape[1]] = block
    return out


def halvings(image: RGBImage, levels: int) -> tuple[RGBImage, ...]:
    """``image`` and its first ``levels - 1`` block means by 2, 4, 8, ...: each equal to ``block_mean(image, 2**k)``.

    Every level is the exact mean of ``image``'s pixels (not a mean of means), rounded half up. The part of the
    image made of whole blocks of the coarsest level goes through PIL's ``Image.reduce`` (C, one pass, about
    twice as fast as summing here), which on whole 2^k x 2^k blocks rounds exactly as ``mean_of_sums``; on
    blocks cut by the edge its fixed-point division can be one grey level off, so the cut strips at the right
    and bottom are summed here. The strips start on a coarsest-block boundary, so both parts cut the same blocks.
    """
    if not 1 <= levels <= 5:
        raise ValueError(f"levels={levels} must be in 1..5 (uint16 sums hold the 1/16 level at most)")
    coarsest = 2 ** (levels - 1)
    height, width = image.shape[:2]
    core_h, core_w = height - height % coarsest, width - width % coarsest
    if levels == 1 or image.dtype != np.uint8 or image.shape[2:] != (3,) or not (core_h and core_w):
        return _summed_halvings(image, levels)
    out = [image] + [np.empty((-(-height // 2**k), -(-width // 2**k), 3), dtype=np.uint8) for k in range(1, levels)]
    core = Image.fromarray(np.ascontiguousarray(image[:core_h, :core_w]))
    for k in range(1, levels):
        out[k][: core_h >> k, : core_w >> k] = np.asarray(core.reduce(2**k))
    if core_w < width:  # the right strip, full height
        for k, strip in enumerate(_summed_halvings(image[:, core_w:], levels)):
            out[k][:, core_w >> k :] = strip
    if core_h < height:  # the bottom strip left of it
        for k, strip in enumerate(_summed_halvings(image[core_h:, :core_w], levels)):
            out[k][core_h >> k :, : core_w >> k] = strip
    return tuple(out)


def _summed_halvings(image: npt.NDArray[np.integer], levels: int) -> list[RGBImage]:
    """``halvings`` by block sums: any size; summing each level's sums keeps it the exact mean of the image."""
    out, sums, counts = [image], image, None
    for _ in range(1, levels):
        # uint16 sums hold 256 * 255, enough for the 1/16 level.
        sums, block_counts = block_sums(sums, 2)
        counts = block_counts if counts is None else block_sums(counts, 2)[0]
        out.append(mean_of_sums(sums, counts))
    return out
