"""Slide readers: one interface over OpenSlide formats and plain images (TIFF/PNG/JPEG tiles).

Every reader returns uint8 RGB (H, W, 3) pixels in level-0 coordinates; transparent
pixels (OpenSlide's alpha, RGBA PNGs) are composited on white, the colour of an empty glass slide.
Plain TIFFs are read lazily (by strip or tile through tifffile's zarr interface, or memory-mapped when
uncompressed), so a large non-pyramidal TIFF never sits whole in memory.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np
import openslide
import tifffile
import zarr
from PIL import Image

from cellkd.errors import SlideError
from cellkd.slides.downsample import windowed_block_mean
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
"""Plain (single-resolution) images, e.g. MoNuSeg 1000x1000 tiles: TIFFs read lazily, PNG/JPEG whole."""

THUMBNAIL_BAND_PIXELS = THUMBNAIL_READ_EDGE * THUMBNAIL_READ_EDGE
"""Plain-image px per thumbnail read: full-width bands, so each TIFF strip is decoded once."""

LARGE_CHUNK_BYTES = 256 * 2**20
"""A TIFF strip or tile above this is decoded whole for every read that touches it: worth a warning."""

CONVERT_HINT = "convert it to a tiled pyramidal TIFF (e.g. vips tiffsave in.tif out.tif --tile --pyramid)"

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


def _check_not_truncated(path: str, pages: Iterable[tifffile.TiffPage | tifffile.TiffFrame | None]) -> None:
    """Raise when a strip or tile of ``pages`` lies past the end of the file (checked without decoding)."""
    size = os.path.getsize(path)
    for page in pages:
        if page is None:
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
        if ends and max(ends) > size:
            msg = (
                f"{path}: image data runs to byte {max(ends)} but the file has {size} bytes; "
                f"the file is corrupt or truncated: {REREAD_HINT}"
            )
            raise SlideError(msg)


class SlideReader:
    """A slide opened for reading. Use as a context manager; coordinates are level-0 pixels.

    Attributes: ``path`` (str), ``dimensions`` ((width, height) level-0 px), ``mpp``
    (level-0 µm/px, or None when the file does not say; see ``resolve_mpp``).
    """

    path: str
    dimensions: tuple[int, int]
    mpp: float | None
    concurrent_reads: bool = False
    """Whether threads may call ``read_region`` at the same time (see ``extract.iter_tissue_tiles``)."""

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the level-0 box at (x, y); outside the slide reads white."""
        raise NotImplementedError

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 px per pixel of each pyramid level, finest first; a plain image has level 0 only."""
        return (1.0,)

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the box at (x, y) in pyramid-level ``level`` px; outside reads white."""
        if level != 0:
            raise ValueError(f"{self.path}: has no pyramid level {level}")
        return self.read_region(x, y, width, height)

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

    concurrent_reads = True  # OpenSlide handles are thread-safe, and ctypes releases the GIL in its calls

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: OpenSlide cannot open it ({err}); the file may be corrupt or truncated: {REREAD_HINT}"
            ) from err
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)  # type: ignore[assignment]
        # openslide-python recomputes these lists through ctypes on every access: read them once.
        self._level_dimensions: tuple[tuple[int, int], ...] = tuple(self._slide.level_dimensions)
        self._level_downsamples: tuple[float, ...] = tuple(self._slide.level_downsamples)
        props = self._slide.properties
        mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
        mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
        mpp = float(mpp_x) if mpp_x else None
        if mpp is not None and mpp_y and not math.isclose(mpp, float(mpp_y), rel_tol=0.01):
            # Non-square pixels are rare; one scale per slide keeps every µm parameter simple.
            logger.warning("%s: mpp-x %s != mpp-y %s; using mpp-x", self.path, mpp_x, mpp_y)
        self.mpp = _plausible(mpp, self.path)

    def read_region(self, x: int, y: int, width: int, height: int) -> RGBImage:
        return self._read_level(0, x, y, width, height)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBImage:
        if not 0 <= level < len(self._level_downsamples):
            raise ValueError(
                f"{self.path}: has no pyramid level {level} (levels 0..{len(self._level_downsamples) - 1})"
            )
        return self._read_level(level, x, y, width, height)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the box at (x, y) in pyramid-level ``level`` px; outside reads white."""
        location = self._level0_location(level, x, y)
        try:
            rgba = np.asarray(self._slide.read_region(location, level, (int(width), int(height))))
        except openslide.OpenSlideError as err:
            msg = (
                f"{self.path}: cannot read level {level} region x={x} y={y} {width}x{height} ({err}); "
                f"the file may be corrupt: {REREAD_HINT}"
            )
            raise SlideError(msg) from err
        return _composite_on_white(rgba)

    def _level0_location(self, level: int, x: int, y: int) -> tuple[int, int]:
        """Level-0 px of the level-``level`` point (x, y), as OpenSlide's ``read_region`` takes it."""
        down = self._level_downsamples[level]
        return round(int(x) * down), round(int(y) * down)

    def thumbnail(self, max_size: int) -> tuple[RGBImage, tuple[float, float]]:
        """Block means of the pyramid level just finer than the thumbnail, read region by region.

        Not OpenSlide's ``get_thumbnail``: that reads the whole level in one piece, which for a slide whose
        pyramid stops early (a generic TIFF with levels 1, 2, 4) is gigabytes.
        """
        width, height = self.dimensions
        level = self._slide.get_best_level_for_downsample(max(width, height) / max_size)
        level_w, level_h = self._level_dimensions[level]
        factor = max(1, math.ceil(max(level_w, level_h) / max_size))

        def read(x: int, y: int, w: int, h: int) -> RGBImage:
            return self._read_level(level, x, y, w, h)

        edge = THUMBNAIL_READ_EDGE
        image = windowed_block_mean(read, level_w, level_h, factor, (edge, edge))
        return image, (width / image.shape[1], height / image.shape[0])

    def close(self) -> None:
        self._slide.close()


DIRECT_TIFF_VENDORS: tuple[str, ...] = ("aperio", "generic-tiff")
"""OpenSlide vendors whose levels are plain tiled TIFF pages (no overlapping or stitched tiles): read by tifffile."""

_DIRECT_CODINGS: frozenset[tuple[int, int]] = frozenset(
    {
        (tifffile.COMPRESSION.NONE, tifffile.PHOTOMETRIC.RGB),
        (tifffile.COMPRESSION.LZW, tifffile.PHOTOMETRIC.RGB),
        (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.PHOTOMETRIC.RGB),
        (tifffile.COMPRESSION.DEFLATE, tifffile.PHOTOMETRIC.RGB),
        (tifffile.COMPRESSION.ZSTD, tifffile.PHOTOMETRIC.RGB),
        (tifffile.COMPRESSION.JPEG, tifffile.PHOTOMETRIC.RGB),  # Aperio's "JPEG/RGB", tables in JPEGTables
        (tifffile.COMPRESSION.JPEG, tifffile.PHOTOMETRIC.YCBCR),  # e.g. tifffile's and vips' JPEG pyramids
    }
)
"""(compression, photometric) of the TIFF pages whose tiles tifffile + imagecodecs decode straight to RGB.

Lossless codings give OpenSlide's pixels by construction. JPEG tiles (libjpeg-turbo on both sides) were found
equal, not merely within a grey level, on a real Aperio SVS (RGB tiles, tables in JPEGTables) and on tifffile's
YCbCr 4:2:0 and RGB pyramids (tests/test_tiff_tiles.py); so that a future decoder that rounds differently cannot
change the output, ``TiffTileReader`` checks one tile of every level against OpenSlide when it opens a slide.
Anything else (Aperio JPEG 2000, 16-bit, planar, alpha) is left to OpenSlide.
"""


def _directly_decodable(page: tifffile.TiffPage) -> bool:
    """Whether ``page`` is a tiled 8-bit RGB page in one of the ``_DIRECT_CODINGS``."""
    return (
        page.is_tiled
        and page.imagedepth == 1
        and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.sampleformat == tifffile.SAMPLEFORMAT.UINT
        and (page.compression, page.photometric) in _DIRECT_CODINGS
    )


class TiffTileReader(OpenSlideReader):
    """An Aperio SVS or generic tiled TIFF: OpenSlide's levels and metadata, tiles decoded by tifffile + imagecodecs.

    OpenSlide decodes every tile to premultiplied ARGB, which ``read_region`` then turns back into RGB; decoding
    the TIFF tiles straight to RGB (libjpeg-turbo through imagecodecs for JPEG) takes a fraction of that CPU time.
    The levels are OpenSlide's (same sizes, same ``get_best_level_for_downsample`` choice for thumbnails), each
    matched to the tiled TIFF page of its size and tile size. A level is read directly only when its page's coding
    is one of ``_DIRECT_CODINGS`` and a tile of it decodes to exactly OpenSlide's pixels; other levels, and reads
    at a point that OpenSlide would resample (a level-0 location that is not a whole level pixel), go through
    OpenSlide, so the pixels always equal ``OpenSlideReader``'s. Missing tiles (byte count 0), transparent in
    OpenSlide, read white as they do there once composited.

    Reads are thread-safe: tiles are read with ``os.pread`` and decoded by tifffile's decoders, which release
    the GIL, so threads decode tiles in parallel.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._tiff: tifffile.TiffFile | None = None
        self._fd: int | None = None
        self._pages: list[tifffile.TiffPage | None] = [None] * len(self._level_dimensions)
        try:
            self._tiff = tifffile.TiffFile(self.path)
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pages = [self._direct_page(level) for level in range(len(self._level_dimensions))]
        except SlideError:
            self.close()
            raise
        except Exception as err:  # tifffile cannot parse what OpenSlide can: OpenSlide reads every level
            logger.warning("%s: reading every level through OpenSlide (tifffile cannot parse it: %s)", self.path, err)
        direct = [level for level, page in enumerate(self._pages) if page is not None]
        logger.debug("%s: levels %s decoded by tifffile, the others by OpenSlide", self.path, direct)

    @property
    def direct_levels(self) -> tuple[int, ...]:
        """The pyramid levels whose tiles this reader decodes itself (the others go through OpenSlide)."""
        return tuple(level for level, page in enumerate(self._pages) if page is not None)

    def _direct_page(self, level: int) -> tifffile.TiffPage | None:
        """The TIFF page holding ``level`` when its tiles can be decoded here, else None."""
        assert self._tiff is not None
        size = self._level_dimensions[level]
        props = self._slide.properties
        tile = (props.get(f"openslide.level[{level}].tile-width"), props.get(f"openslide.level[{level}].tile-height"))
        for page in self._tiff.pages:
            if (
                isinstance(page, tifffile.TiffPage)
                and page.is_tiled
                and (page.imagewidth, page.imagelength) == size
                and (str(page.tilewidth), str(page.tilelength)) == tile
            ):
                break
        else:
            return None
        if not _directly_decodable(page):
            return None
        _check_not_truncated(self.path, [page])
        if not self._agrees_with_openslide(level, page):
            logger.warning(
                "%s: level %d decodes differently from OpenSlide; reading it through OpenSlide", self.path, level
            )
            return None
        return page

    def _agrees_with_openslide(self, level: int, page: tifffile.TiffPage) -> bool:
        """Whether one stored tile, the central one where it can be, decodes here to exactly OpenSlide's pixels.

        Only tiles that OpenSlide reads without resampling can be compared; the first tile always is one.
        """
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        central = (down // 2) * across + across // 2
        for index in itertools.chain([central], range(len(page.databytecounts))):
            x, y = (index % across) * page.tilewidth, (index // across) * page.tilelength
            if page.databytecounts[index] and self._whole_level_pixel(level, x, y):
                break
        else:  # nothing comparable: trust the level only when it stores no tile at all (both read white)
            return not any(page.databytecounts)
        width, height = min(page.tilewidth, page.imagewidth - x), min(page.tilelength, page.imagelength - y)
        try:
            mine = self._read_tiles(level, page, x, y, width, height)
        except SlideError:
            return False  # OpenSlide may still decode it; if not, its read says the file is corrupt
        return bool(np.array_equal(mine, super()._read_level(level, x, y, width, height)))

    def _whole_level_pixel(self, level: int, x: int, y: int) -> bool:
        """Whether OpenSlide reads level ``level`` at (x, y) without resampling.

        OpenSlide divides the level-0 location by the level's downsample; a fractional result is resampled.
        """
        down = self._level_downsamples[level]
        x0, y0 = self._level0_location(level, x, y)
        return x0 / down == x and y0 / down == y

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> RGBImage:
        page = self._pages[level]
        if page is None or not self._whole_level_pixel(level, x, y):
            return super()._read_level(level, x, y, width, height)
        return self._read_tiles(level, page, x, y, width, height)

    def _read_tiles(self, level: int, page: tifffile.TiffPage, x: int, y: int, width: int, height: int) -> RGBImage:
        """uint8 (height, width, 3) RGB of the box at (x, y) of ``level``'s ``page``, decoding only the tiles it
        touches."""
        assert self._fd is not None
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        tile_w, tile_h = page.tilewidth, page.tilelength
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
        if x1 <= x0 or y1 <= y0:
            return out  # wholly outside the level
        across = -(-page.imagewidth // tile_w)
        decode = page.decode
        for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1):
            for col in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
                index = row * across + col
                count = page.databytecounts[index]
                if not count:
                    continue  # a missing tile: transparent in OpenSlide, so white
                try:
                    data = os.pread(self._fd, count, page.dataoffsets[index])
                    tile = decode(data, index, jpegtables=page.jpegtables)[0]
                    tile = tile.reshape(tile.shape[-3:])  # (1, 1, tile_h, tile_w, 3) -> (tile_h, tile_w, 3)
                except Exception as err:  # imagecodecs raises its own error types for damaged data
                    msg = (
                        f"{self.path}: cannot decode tile {index} of level {level} ({err}); "
                        f"the file may be corrupt: {REREAD_HINT}"
                    )
                    raise SlideError(msg) from err
                top, left = row * tile_h, col * tile_w
                ys, ye = max(y0, top), min(y1, top + tile_h)
                xs, xe = max(x0, left), min(x1, left + tile_w)
                out[ys - y : ye - y, xs - x : xe - x] = tile[ys - top : ye - top, xs - left : xe - left]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        super().close()


class ImageReader(SlideReader):
    """A plain single-resolution image: TIFF via tifffile (lazily), PNG/JPEG via PIL (whole, in memory).

    TIFF pixels are read on demand: uncompressed contiguous data is memory-mapped, anything else goes
    through tifffile's zarr store, which decodes only the strips or tiles a region touches. Only the first
    series' full-resolution level is used. mpp comes from TIFF resolution tags (centimetre or inch units);
    PNG/JPEG carry no trustworthy resolution, so mpp is None.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._tiff: tifffile.TiffFile | None = None
        self._lead: tuple[int, ...] = ()
        self._planar = False
        try:
            if Path(self.path).suffix.lower() in (".tif", ".tiff"):
                pixels, mpp = self._open_tiff()
            else:
                pixels, mpp = self._read_pil(), None
                self._set_layout(pixels.shape, pixels.dtype, "YXS")
        except SlideError:
            self.close()
            raise
        except Exception as err:  # tifffile/PIL/zarr raise many types for damaged files
            self.close()
            msg = f"{self.path}: cannot read image ({err}); the file may be corrupt or truncated: {REREAD_HINT}"
            raise SlideError(msg) from err
        self._pixels = pixels
        self.mpp = _plausible(mpp, self.path)

    def _open_tiff(self) -> tuple[np.ndarray | zarr.Array, float | None]:
        """(H, W[, C]) lazy pixel array of the first series' level 0, and the mpp of its resolution tags."""
        self._tiff = tif = tifffile.TiffFile(self.path)
        series = tif.series[0]
        page = series.pages[0]
        _check_not_truncated(self.path, series.pages)
        if series.dataoffset is not None:  # uncompressed and contiguous: let the OS page it in
            pixels = tifffile.memmap(self.path, series=0, level=0, mode="r")
        else:
            pixels = zarr.open_array(series.aszarr(level=0), mode="r")
            chunk_bytes = math.prod(pixels.chunks) * pixels.dtype.itemsize
            if chunk_bytes > LARGE_CHUNK_BYTES:
                logger.warning(
                    "%s: stores its pixels in %d MiB strips or tiles, each decoded whole for every read that "
                    "touches it; for speed and memory %s",
                    self.path,
                    chunk_bytes // 2**20,
                    CONVERT_HINT,
                )
        self._set_layout(pixels.shape, pixels.dtype, series.axes)
        mpp = None
        res = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if res is not None and unit is not None:
            num, den = res.value
            px_per_unit = num / den if den else 0.0
            um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))  # inch, centimetre
            if um_per_unit and px_per_unit > 0:
                mpp = um_per_unit / px_per_unit
        return pixels, mpp

    def _set_layout(self, shape: tuple[int, ...], dtype: np.dtype, axes: str) -> None:
        """Check the layout and dtype before any pixel is read; set ``dimensions`` and how to index the pixels.

        Accepts (Y, X), (Y, X, C) and planar (C, Y, X) with 1, 3 or 4 channels, after leading singleton
        axes (e.g. a one-page 'IYXS' series), which reads index at 0.
        """
        if dtype not in (np.uint8, np.uint16):
            raise SlideError(f"{self.path}: pixel type {dtype} is not supported; expected 8- or 16-bit RGB")
        lead = 0
        while len(shape) - lead > 2 and shape[lead] == 1 and axes[lead] not in "YX":
            lead += 1
        shape, axes = shape[lead:], axes[lead:]
        self._lead = (0,) * lead
        self._planar = len(shape) == 3 and axes[0] in "CS" and axes[1:] == "YX"
        yx = shape[1:] if self._planar else shape[:2]
        channels = shape[0] if self._planar else (shape[2] if len(shape) == 3 else 1)
        if (
            len(shape) not in (2, 3)
            or channels not in (1, 3, 4)
            or (len(shape) == 3 and not self._planar and axes[:2] != "YX")
        ):
            msg = f"{self.path}: image shape {shape} (axes {axes}) is not supported; expected (H, W, 3) RGB"
            raise SlideError(msg)
        self.dimensions = (int(yx[1]), int(yx[0]))

    def _read_pil(self) -> RGBImage:
        with Image.open(self.path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_white(rgba)

    def _to_rgb(self, data: np.ndarray) -> RGBImage:
        if data.dtype == np.uint16:
            data = (data >> 8).astype(np.uint8)
        if data.ndim == 2:
            data = data[..., None]
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
            rows, cols = slice(y0, y1), slice(x0, x1)
            try:
                if self._planar:
                    part = np.moveaxis(np.asarray(self._pixels[(*self._lead, slice(None), rows, cols)]), 0, -1)
                else:
                    part = np.asarray(self._pixels[(*self._lead, rows, cols)])
            except Exception as err:  # a damaged strip or tile surfaces only when it is decoded
                msg = (
                    f"{self.path}: cannot read region x={x} y={y} {width}x{height} ({err}); "
                    f"the file may be corrupt: {REREAD_HINT}"
                )
                raise SlideError(msg) from err
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._to_rgb(part)
        return out

    def thumbnail(self, max_size: int) -> tuple[RGBImage, tuple[float, float]]:
        """Block means of full-width bands: bounded memory, and each TIFF strip decoded once."""
        width, height = self.dimensions
        factor = max(1, math.ceil(max(width, height) / max_size))
        band = max(1, THUMBNAIL_BAND_PIXELS // (width * factor)) * factor
        image = windowed_block_mean(self.read_region, width, height, factor, (width, band))
        return image, (width / image.shape[1], height / image.shape[0])

    def close(self) -> None:
        self._pixels = np.empty((0, 0, 3), dtype=np.uint8)
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None


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
    vendor = openslide.OpenSlide.detect_format(str(p))
    if vendor in DIRECT_TIFF_VENDORS:
        reader = TiffTileReader(p)
    elif vendor is not None:
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
