"""Slide readers: one interface over OpenSlide formats and plain images (TIFF/PNG/JPEG tiles).

Every reader returns uint8 RGB (H, W, 3) pixels in level-0 coordinates; transparent
pixels (OpenSlide's alpha, RGBA PNGs) are composited on white, the colour of an empty glass slide.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from types import TracebackType

import numpy as np
import openslide
import tifffile
from PIL import Image

from cellkd.errors import SlideError
from cellkd.slides.downsample import block_mean
from cellkd.types import RGBImage

logger = logging.getLogger(__name__)

OPENSLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)
"""File suffixes OpenSlide reads (Aperio, Hamamatsu, Leica, Mirax, Sakura, Ventana, DICOM, generic tiled TIFF)."""

THUMBNAIL_READ_EDGE = 2048
"""Edge (pyramid-level px) of the regions a thumbnail is built from: bounds its memory whatever the slide."""

PLAIN_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""Plain (single-resolution) images read whole into memory, e.g. MoNuSeg 1000x1000 tiles."""

SUPPORTED = ", ".join(sorted(set(OPENSLIDE_SUFFIXES) | set(PLAIN_SUFFIXES)))

REREAD_HINT = "copy the file again from its source and check that it opens in QuPath"
"""What to do about a damaged slide file: part of every 'corrupt or truncated' message."""

MIN_SLIDE_SIZE = 16
"""Smallest slide side (px) accepted: anything smaller cannot hold a nucleus-scale patch."""

_PLAUSIBLE_MPP = (0.01, 50.0)
"""µm/px outside this range is a placeholder (e.g. 72 dpi = 352 µm/px), not a microscope scan."""


def _composite_on_white(rgba: np.ndarray) -> RGBImage:
    """uint8 (H, W, 4) straight-alpha RGBA -> uint8 (H, W, 3) RGB over a white background."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the common case inside tissue: skip the arithmetic
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _plausible(mpp: float | None, path: str) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    if not _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
        logger.warning("%s: ignoring implausible resolution %.4g µm/px (outside %s)", path, mpp, _PLAUSIBLE_MPP)
        return None
    return mpp


class SlideReader:
    """A slide opened for reading. Use as a context manager; coordinates are level-0 pixels.

    Attributes: ``path`` (str), ``dimensions`` ((width, height) level-0 px), ``mpp``
    (level-0 µm/px, or None when the file does not say; see ``resolve_mpp``).
    """

    path: str
    dimensions: tuple[int, int]
    mpp: float | None

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the level-0 box at (x, y); outside the slide reads white."""
        raise NotImplementedError

    def thumbnail(self, max_size: int) -> tuple[RGBImage, tuple[float, float]]:
        """uint8 (h, w, 3) RGB of the whole slide, long side <= ``max_size`` (never upscaled).

        Returns the image and its (x, y) downsample: level-0 px per thumbnail px.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, dimensions={self.dimensions}, mpp={self.mpp})"


class OpenSlideReader(SlideReader):
    """Any format OpenSlide detects (``openslide.OpenSlide.detect_format``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open it ({err}); the file may be corrupt or truncated: {REREAD_HINT}"
            ) from err
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)  # type: ignore[assignment]
        props = self._slide.properties
        mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
        mpp = float(mpp_x) if mpp_x else None
        if mpp is not None and mpp_y and not math.isclose(mpp, float(mpp_y), rel_tol=0.01):
            # Non-square pixels are rare; one scale per slide keeps every µm parameter simple.
            logger.warning("%s: mpp-x %s != mpp-y %s; using mpp-x", self.path, mpp_x, mpp_y)
        self.mpp = _plausible(mpp, self.path)

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        try:
            rgba = np.asarray(self._slide.read_region((int(x), int(y)), 0, (int(width), int(height))))
        except openslide.OpenSlideError as err:
            msg = (
                f"{self.path}: cannot read region x={x} y={y} {width}x{height} ({err}); "
                f"the file may be corrupt: {REREAD_HINT}"
            )
            raise SlideError(msg) from err
        return _composite_on_white(rgba)

    def thumbnail(self, max_size: int) -> tuple[RGBImage, tuple[float, float]]:
        """Block means of the pyramid level just finer than the thumbnail, read region by region.

        Not OpenSlide's ``get_thumbnail``: that reads the whole level in one piece, which for a slide whose
        pyramid stops early (a generic TIFF with levels 1, 2, 4) is gigabytes.
        """
        width, height = self.dimensions
        level = self._slide.get_best_level_for_downsample(max(width, height) / max_size)
        level_w, level_h = self._slide.level_dimensions[level]
        level_down = self._slide.level_downsamples[level]
        factor = max(1, math.ceil(max(level_w, level_h) / max_size))
        image = np.empty((math.ceil(level_h / factor), math.ceil(level_w / factor), 3), dtype=np.uint8)
        step = max(1, THUMBNAIL_READ_EDGE // factor) * factor  # level px per read: whole blocks only
        for y in range(0, level_h, step):
            for x in range(0, level_w, step):
                w, h = min(step, level_w - x), min(step, level_h - y)
                try:
                    rgba = np.asarray(
                        self._slide.read_region((round(x * level_down), round(y * level_down)), level, (w, h))
                    )
                except openslide.OpenSlideError as err:
                    msg = f"{self.path}: cannot read a thumbnail ({err}); the file may be corrupt: {REREAD_HINT}"
                    raise SlideError(msg) from err
                block = block_mean(_composite_on_white(rgba), factor)
                image[y // factor : y // factor + block.shape[0], x // factor : x // factor + block.shape[1]] = block
        return image, (width / image.shape[1], height / image.shape[0])

    def close(self) -> None:
        self._slide.close()


class ImageReader(SlideReader):
    """A plain single-resolution image (TIFF via tifffile, PNG/JPEG via PIL), held in memory.

    Meant for tiles (MoNuSeg 1000x1000, Lizard crops); whole-slide images should be
    pyramidal files that OpenSlide reads lazily. mpp comes from TIFF resolution tags
    (centimetre or inch units); PNG/JPEG carry no trustworthy resolution, so mpp is None.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            if Path(self.path).suffix.lower() in (".tif", ".tiff"):
                image, mpp = self._read_tiff()
            else:
                image, mpp = self._read_pil()
        except SlideError:
            raise
        except Exception as err:  # tifffile/PIL raise many types for damaged files
            msg = f"{self.path}: cannot read image ({err}); the file may be corrupt or truncated: {REREAD_HINT}"
            raise SlideError(msg) from err
        self._image = image
        self.dimensions = (int(image.shape[1]), int(image.shape[0]))
        self.mpp = _plausible(mpp, self.path)

    def _read_tiff(self) -> tuple[RGBImage, float | None]:
        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            data = series.levels[0].asarray()
            axes = series.axes
            page = tif.pages[0]
            mpp = None
            res = page.tags.get("XResolution")
            unit = page.tags.get("ResolutionUnit")
            if res is not None and unit is not None:
                num, den = res.value
                px_per_unit = num / den if den else 0.0
                um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))  # inch, centimetre
                if um_per_unit and px_per_unit > 0:
                    mpp = um_per_unit / px_per_unit
        if axes[-3:] in ("CYX", "SYX") and data.ndim == 3:
            data = np.moveaxis(data, 0, -1)
        return self._to_rgb(data), mpp

    def _read_pil(self) -> tuple[RGBImage, None]:
        with Image.open(self.path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_white(rgba), None

    def _to_rgb(self, data: np.ndarray) -> RGBImage:
        if data.dtype == np.uint16:
            data = (data >> 8).astype(np.uint8)
        elif data.dtype != np.uint8:
            raise SlideError(f"{self.path}: pixel type {data.dtype} is not supported; expected 8- or 16-bit RGB")
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=2)
        if data.ndim != 3 or data.shape[2] not in (1, 3, 4):
            raise SlideError(f"{self.path}: image shape {data.shape} is not supported; expected (H, W, 3) RGB")
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
        if data.shape[2] == 4:
            return _composite_on_white(data)
        return np.ascontiguousarray(data)

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        full_w, full_h = self.dimensions
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, full_w), min(y + height, full_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_size: int) -> tuple[RGBImage, tuple[float, float]]:
        im = Image.fromarray(self._image)
        im.thumbnail((max_size, max_size), Image.Resampling.BOX)
        image = np.asarray(im)
        width, height = self.dimensions
        return image, (width / image.shape[1], height / image.shape[0])

    def close(self) -> None:
        self._image = np.empty((0, 0, 3), dtype=np.uint8)


def open_slide(path: str | os.PathLike[str], *, min_size: int = MIN_SLIDE_SIZE) -> SlideReader:
    """Open ``path`` with OpenSlide when it detects the format, else as a plain image.

    Raises ``SlideError`` for a missing file, an unsupported or corrupt file, and a
    slide whose shorter side is below ``min_size`` px.
    """
    p = Path(path)
    if not p.exists():
        raise SlideError(f"{p}: slide file does not exist; check the slide path in the slide sheet")
    if not p.is_file():
        raise SlideError(f"{p}: is not a file; check the slide path in the slide sheet")
    suffix = p.suffix.lower()
    reader: SlideReader
    if openslide.OpenSlide.detect_format(str(p)) is not None:
        reader = OpenSlideReader(p)
    elif suffix in PLAIN_SUFFIXES:
        # Non-tiled TIFFs and PNG/JPEG tiles; a damaged OpenSlide TIFF also ends up here and
        # gets a "corrupt or truncated" error from tifffile.
        reader = ImageReader(p)
    elif suffix in OPENSLIDE_SUFFIXES:
        msg = f"{p}: OpenSlide does not recognise this {suffix} file; it may be corrupt or truncated: {REREAD_HINT}"
        raise SlideError(msg)
    else:
        msg = (
            f"{p}: unsupported slide format {suffix or '(no suffix)'!r}; supported: {SUPPORTED}; "
            "convert the slide to a pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) or fix the sheet's path"
        )
        raise SlideError(msg)
    width, height = reader.dimensions
    if min(width, height) < min_size:
        reader.close()
        msg = f"{p}: slide is {width}x{height} px, smaller than {min_size} px on a side; check the slide file"
        raise SlideError(msg)
    logger.info("opened %r", reader)
    return reader


def resolve_mpp(slide: SlideReader, mpp_fallback: float) -> float:
    """Level-0 µm/px of ``slide``, or ``mpp_fallback`` (with a warning) when the file does not say."""
    if slide.mpp is not None:
        return slide.mpp
    if not (math.isfinite(mpp_fallback) and mpp_fallback > 0):
        raise SlideError(f"{slide.path}: has no resolution and mpp_fallback={mpp_fallback!r} is not a positive number")
    logger.warning(
        "%s: no resolution (openslide.mpp-x / TIFF resolution tags) in the file; assuming %.3g µm/px",
        slide.path,
        mpp_fallback,
    )
    return float(mpp_fallback)
