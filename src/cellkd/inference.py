"""Tiled segmentation of whole tissue fragments with seamless stitching and bounded memory.

Tiling: the image is cut into output blocks of ``stride = tile - overlap`` pixels; each block is
predicted from the ``tile`` x ``tile`` window centred on it (``overlap / 2`` extra context on each
side, zeros outside the image) and only the block is kept. A model whose receptive field reaches at
most ``overlap / 2`` pixels therefore gives exactly the prediction of one forward pass over the
whole (zero-padded) image, with no seams. Tiles are read window by window from the HDF5 dataset in
a background thread while the model runs, and results are written one row of blocks at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from cellkd.device import resolve_device
from cellkd.errors import ConfigError
from cellkd.models.checkpoint import load_segmentation_model
from cellkd.models.segmentation import preprocess
from cellkd.store.atomic import atomic_h5
from cellkd.store.compression import COMPRESSION
from cellkd.store.fragments import CHUNK, FragmentStore
from cellkd.types import PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | h5py.Dataset


def _check_tiling(tile: int, overlap: int, batch_size: int) -> None:
    if overlap < 0 or overlap % 2:
        raise ConfigError(f"overlap={overlap} must be an even number >= 0 (half of it is context on each side)")
    if tile <= overlap:
        raise ConfigError(f"tile={tile} must be larger than overlap={overlap}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")


def read_window(image: ArrayLike, y: int, x: int, tile: int) -> np.ndarray:
    """uint8 (tile, tile, 3) window of ``image`` with origin (y, x) (may be negative); zeros outside."""
    height, width = image.shape[:2]
    window = np.zeros((tile, tile, 3), dtype=np.uint8)
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + tile, height), min(x + tile, width)
    if y1 > y0 and x1 > x0:
        window[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
    return window


def tile_origins(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(y, x) of the output blocks that cover a (height, width) image, in raster order: one forward tile each."""
    stride = tile - overlap
    return [(y, x) for y in range(0, height, stride) for x in range(0, width, stride)]


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_fragment(
    model: nn.Module,
    image: ArrayLike,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    out: ArrayLike | None = None,
    threshold: float | None = None,
    desc: str | None = None,
) -> ArrayLike:
    """Nucleus probability of every pixel of ``image``: uint8 (H, W, 3) RGB, an array or h5py dataset.

    ``model`` maps float (B, 3, tile, tile) (``preprocess``-ed) to logits (B, 1, tile, tile).
    The result goes to ``out`` ((H, W) array or h5py dataset; allocated when None) as:
    probabilities in [0, 1] when ``out`` is floating point (the default without ``threshold``);
    0/1 where probability >= ``threshold`` when ``threshold`` is given; round(255 * probability)
    for an integer ``out`` without ``threshold``. Returns ``out``.
    ``device`` None keeps the model where it is. ``desc``: log a progress bar of the tile batches under
    this name (a large fragment takes minutes, and the log should show it moving).
    """
    _check_tiling(tile, overlap, batch_size)
    height, width = image.shape[:2]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"image must be (H, W, 3) RGB; got shape {tuple(image.shape)}")
    if out is None:
        out = np.zeros((height, width), dtype=np.float32 if threshold is None else np.uint8)
    if tuple(out.shape) != (height, width):
        raise ConfigError(f"out has shape {tuple(out.shape)}; expected {(height, width)} to match the image")
    as_float = np.issubdtype(out.dtype, np.floating) and threshold is None

    if device is not None:
        model = model.to(resolve_device(device))
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    model.eval()

    stride, margin = tile - overlap, overlap // 2
    origins = tile_origins(height, width, tile, overlap)
    tiles_per_row = len(range(0, width, stride))
    rows: dict[int, tuple[np.ndarray, int]] = {}  # block row y -> (strip buffer, blocks still missing)

    def load(batch: list[tuple[int, int]]) -> torch.Tensor:
        windows = np.stack([read_window(image, y - margin, x - margin, tile) for y, x in batch])
        return preprocess(windows)

    def store(y: int, x: int, prob: np.ndarray) -> None:
        h, w = min(stride, height - y), min(stride, width - x)
        strip, missing = rows.get(y) or (np.zeros((h, width), dtype=out.dtype), tiles_per_row)
        block = prob[margin : margin + h, margin : margin + w]
        if threshold is not None:
            strip[:, x : x + w] = block >= threshold
        elif as_float:
            strip[:, x : x + w] = block
        else:
            strip[:, x : x + w] = np.rint(block * 255.0)
        if missing == 1:
            out[y : y + h] = strip  # one write per block row: whole chunk rows, no read-modify-write
            rows.pop(y, None)
        else:
            rows[y] = (strip, missing - 1)

    batches = list(_batches(origins, batch_size))
    steps = enumerate(batches)
    if desc is not None:
        steps = progress(steps, desc=f"{desc}: {len(origins)} tiles, batches of {batch_size}", total=len(batches))
    # One reader thread: h5py serializes I/O anyway, and one batch ahead is enough to hide it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellkd-tiles") as pool, torch.inference_mode():
        pending = pool.submit(load, batches[0]) if batches else None
        for index, batch in steps:
            x_batch = pending.result()
            pending = pool.submit(load, batches[index + 1]) if index + 1 < len(batches) else None
            logits = model(x_batch.to(dev, non_blocking=True))
            probs = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
            for (y, x), prob in zip(batch, probs, strict=True):
                store(y, x, prob)
    return out


def segment_fragment_store(
    model_path: PathLike,
    fragment_store: PathLike,
    out_path: PathLike,
    level: int = 0,
    threshold: float = 0.5,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> None:
    """Segment every fragment of ``fragment_store`` at ``level`` with the model in ``model_path``.

    Writes ``out_path`` atomically (``results/segmentation/{stain}/masks/{slide}.h5``,
    or ``{stain}/{arch}/masks/`` for Figure 4): attrs
    complete, slide, stain, level, threshold, model, tile, overlap; per fragment a group
    ``/fragments/{name}`` (attrs x, y, width, height: level-0 bounding box) holding ``level{k}``,
    uint8 (H_k, W_k) 0/1 nucleus mask in level-k fragment pixels.
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold={threshold} must be in (0, 1)")
    _check_tiling(tile, overlap, batch_size)
    model = load_segmentation_model(model_path, device)
    with FragmentStore(fragment_store) as store, atomic_h5(out_path) as h5:
        h5.attrs.update(
            {
                "slide": store.slide,
                "stain": store.stain,
                "level": level,
                "threshold": threshold,
                "model": str(Path(model_path)),
                "tile": tile,
                "overlap": overlap,
            }
        )
        fragments = h5.require_group("fragments")
        images = [store.level(fragment, level) for fragment in store.fragments]
        tiles = [len(tile_origins(*image.shape[:2], tile, overlap)) for image in images]
        logger.info(
            "segmenting %s at level %d on %s: %d fragments, %d tiles of %d px",
            store.slide,
            level,
            next(model.parameters()).device,
            len(images),
            sum(tiles),
            tile,
        )
        done = 0
        for number, (fragment, image) in enumerate(zip(store.fragments, images, strict=True), start=1):
            height, width = image.shape[:2]
            group = fragments.require_group(fragment.name)
            group.attrs.update({"x": fragment.x, "y": fragment.y, "width": fragment.width, "height": fragment.height})
            mask = group.create_dataset(
                f"level{level}",
                shape=(height, width),
                dtype=np.uint8,
                chunks=(min(CHUNK, height), min(CHUNK, width)),
                **COMPRESSION,
            )
            desc = f"segment {store.slide} {fragment.name} ({number}/{len(images)})"
            predict_fragment(model, image, tile, overlap, batch_size, out=mask, threshold=threshold, desc=desc)
            done += tiles[number - 1]
            logger.info(
                "%s %s: %dx%d px, %.1f%% nucleus; %d/%d tiles of the slide done",
                store.slide,
                fragment.name,
                width,
                height,
                _percent(mask),
                done,
                sum(tiles),
            )
    logger.info("wrote %s", out_path)


def _percent(mask: h5py.Dataset) -> float:
    # Row strips keep this bounded in memory for large fragments.
    total = sum(int(np.count_nonzero(mask[y : y + CHUNK])) for y in range(0, mask.shape[0], CHUNK))
    return 100.0 * total / max(mask.size, 1)
