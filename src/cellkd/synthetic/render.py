"""Pixels of a synthetic slide: Beer-Lambert H&E colour, rendered in strips and streamed into a pyramidal TIFF.

Colour follows Beer-Lambert, ``I = 240 * exp(-(c_H * h + c_E * e))`` per RGB channel, with the
H and E optical-density vectors ``h``, ``e`` of Macenko's reference stain matrix, perturbed per
slide (``stain_jitter``: hue and strength) so that stain normalization has something to undo.

The image is rendered in horizontal strips (float work in column blocks) and streamed into the
TIFF; the 1/2 and 1/4 levels go through raw scratch files. Memory therefore stays at a few hundred
MB whatever the slide size, and every pixel is a function of its position only (no strip seams).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio.features
import shapely
import tifffile
from affine import Affine
from scipy.ndimage import gaussian_filter

from cellkd.synthetic.layout import Nuclei, SmoothField, geojson_polygon
from cellkd.synthetic.spec import SyntheticSlideParams
from cellkd.types import DOWNSAMPLES

BACKGROUND_INTENSITY = 240.0
"""Incident light I0 (and the glass colour): Macenko's customary Io = 240."""

REFERENCE_STAIN_MATRIX: npt.NDArray[np.float64] = np.array(
    [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], dtype=np.float64
)
"""Rows: hematoxylin and eosin optical-density vectors (R, G, B) of Macenko's reference H&E."""

MEAN_TISSUE_EOSIN = 0.48 + 0.22 * 0.375
"""Mean eosin concentration of the tissue: the base plus the fibres' mean, E[(0.5 + 0.5 sin)^2] = 3/8."""

TISSUE_HEMATOXYLIN = 0.07
"""Hematoxylin concentration of tissue outside nuclei (before the slide's stain strength)."""

TEXTURE_AFTER_BLUR = 0.8
"""About how much of the chromatin texture's standard deviation survives the optical blur."""

TILE = 256
"""TIFF tile edge in pixels."""

_STRIP_PIXELS = 4_000_000
# Target pixels per strip; a strip holds its uint8 RGB and int32 nucleus labels (~28 MB at this size).
_BLOCK_COLUMNS = 2048
# Columns per float block inside a strip: ~15 float32 planes of (strip rows x 2048) is the float working set.


def stain_matrix(rng: np.random.Generator, jitter: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(2, 3) unit OD rows (H, E) and (2,) concentration scales, perturbed by ``jitter``."""
    matrix = REFERENCE_STAIN_MATRIX * (1 + jitter * rng.standard_normal((2, 3)))
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=1, keepdims=True)
    scales = np.clip(1 + jitter * rng.standard_normal(2), 0.5, 1.5)
    return matrix, scales


class Renderer:
    """Renders horizontal strips of the level-0 image; the same rows always give the same pixels.

    ``nuclei`` are every dark object drawn: the nuclei, then any background objects (``Nuclei.concatenate``).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        params: SyntheticSlideParams,
        fragments: Sequence[shapely.Polygon],
        nuclei: Nuclei,
        stain: npt.NDArray[np.float64],
        scales: npt.NDArray[np.float64],
    ) -> None:
        self.width, self.height = params.width, params.height
        self.fragments = list(fragments)
        self.nuclei = nuclei
        self.stain = stain.astype(np.float32)
        self.scales = scales.astype(np.float32)
        px_per_um = 1.0 / params.mpp
        self.eosin_field = SmoothField(rng, self.width, self.height, cell=60 * px_per_um)
        self.hema_field = SmoothField(rng, self.width, self.height, cell=40 * px_per_um)
        self.warp_field = SmoothField(rng, self.width, self.height, cell=30 * px_per_um)
        self.fibre_angle = float(rng.uniform(0, np.pi))
        self.fibre_period = 7.0 * px_per_um  # collagen bundles a few micrometres apart
        self.noise_seed = int(rng.integers(0, 2**63))
        self.blur = 0.6  # optical point spread, pixels
        # Rows/columns rendered beyond the strip so the blurs (radius 4 + 2) have no seams.
        self.margin = 6
        self.miny = nuclei.rings[:, :, 1].min(axis=1, initial=np.inf)
        self.maxy = nuclei.rings[:, :, 1].max(axis=1, initial=-np.inf)

    def strip(self, y0: int, y1: int) -> npt.NDArray[np.uint8]:
        """uint8 (y1 - y0, width, 3) RGB of level-0 rows [y0, y1); a pixel's value does not depend on the strip."""
        ya, yb = max(0, y0 - self.margin), min(self.height, y1 + self.margin)
        # Masks over full-width rows with an integer row offset: GDAL then sees exactly the same
        # pixel-centre coordinates whatever the window, so boundary pixels never depend on the cut.
        transform = Affine.translation(0, ya)
        tissue = rasterio.features.rasterize(
            [(f, 1) for f in self.fragments], out_shape=(yb - ya, self.width), transform=transform
        ).astype(bool)
        labels = np.zeros((yb - ya, self.width), np.int32)
        hit = np.flatnonzero((self.maxy > ya) & (self.miny < yb))
        if hit.size:
            shapes = ((geojson_polygon(self.nuclei.rings[i]), int(i) + 1) for i in hit)
            rasterio.features.rasterize(shapes, out=labels, transform=transform)
        has_tissue = tissue.any(axis=0)

        out = np.empty((y1 - y0, self.width, 3), np.uint8)
        # Float work in column blocks bounds memory on very wide slides (a few float planes per block).
        for xa in range(0, self.width, _BLOCK_COLUMNS):
            xb = min(self.width, xa + _BLOCK_COLUMNS)
            camera = np.stack([self._white_noise(channel, y0, y1, xa, xb) for channel in range(3)], axis=-1)
            light = np.full(camera.shape, BACKGROUND_INTENSITY, np.float32)
            if has_tissue[max(0, xa - self.margin) : xb + self.margin].any():
                # The stain model runs on the block plus a margin, so the blurs see their neighbours.
                wa, wb = max(0, xa - self.margin), min(self.width, xb + self.margin)
                od = self._optical_density(tissue[:, wa:wb], labels[:, wa:wb], ya, yb, wa, wb)
                light = BACKGROUND_INTENSITY * np.exp(-od[y0 - ya : y1 - ya, xa - wa : xb - wa])
            light += 1.5 * camera
            out[:, xa:xb] = np.clip(np.rint(light), 0, 255)
        return out

    def _white_noise(self, stream: int, ya: int, yb: int, xa: int, xb: int) -> npt.NDArray[np.float32]:
        """float32 (yb - ya, xb - xa) standard normal noise of a window, a function of the slide position only.

        Drawn tile by tile from per-tile seeds, so overlapping windows of neighbouring strips agree
        and the image does not depend on how it is cut into strips (no seams).
        """
        ty0, ty1, tx0, tx1 = ya // TILE, (yb - 1) // TILE + 1, xa // TILE, (xb - 1) // TILE + 1
        noise = np.empty(((ty1 - ty0) * TILE, (tx1 - tx0) * TILE), np.float32)
        for ty in range(ty0, ty1):
            for tx in range(tx0, tx1):
                tile_rng = np.random.default_rng([self.noise_seed, stream, ty, tx])
                noise[(ty - ty0) * TILE : (ty - ty0 + 1) * TILE, (tx - tx0) * TILE : (tx - tx0 + 1) * TILE] = (
                    tile_rng.standard_normal((TILE, TILE), dtype=np.float32)
                )
        return noise[ya - ty0 * TILE : yb - ty0 * TILE, xa - tx0 * TILE : xb - tx0 * TILE]

    def _optical_density(
        self,
        tissue: npt.NDArray[np.bool_],
        labels: npt.NDArray[np.int32],
        ya: int,
        yb: int,
        xa: int,
        xb: int,
    ) -> npt.NDArray[np.float32]:
        """float32 (yb - ya, xb - xa, 3) optical density of the window rows [ya, yb), columns [xa, xb).

        ``tissue`` and ``labels`` (nucleus index + 1, 0 = none) are the window's masks.
        """
        # Unit-variance fine texture: white noise blurred by sigma 1 has std 1 / (2 sqrt(pi)).
        fine = gaussian_filter(self._white_noise(3, ya, yb, xa, xb), 1.0) * np.float32(2 * math.sqrt(math.pi))
        cols = np.arange(xa, xb, dtype=np.float32) + 0.5
        rows = np.arange(ya, yb, dtype=np.float32)[:, None] + 0.5
        phase = (cols * math.cos(self.fibre_angle) + rows * math.sin(self.fibre_angle)) * np.float32(
            2 * math.pi / self.fibre_period
        )
        fibres = (0.5 + 0.5 * np.sin(phase + 4.0 * self.warp_field.rows(ya, yb, xa, xb))) ** 2
        eosin = 0.48 + 0.10 * self.eosin_field.rows(ya, yb, xa, xb) + 0.22 * fibres + 0.05 * fine
        hema = TISSUE_HEMATOXYLIN + 0.02 * self.hema_field.rows(ya, yb, xa, xb)
        eosin *= tissue
        hema *= tissue

        inside = labels > 0
        which = labels[inside] - 1
        hema[inside] = self.nuclei.concentration[which] * (1 + self.nuclei.chromatin[which] * 0.5 * fine[inside])
        eosin[inside] *= self.nuclei.eosin[which]
        hema = gaussian_filter(np.clip(hema, 0, None), self.blur) * self.scales[0]
        eosin = gaussian_filter(np.clip(eosin, 0, None), self.blur) * self.scales[1]
        return hema[..., None] * self.stain[0] + eosin[..., None] * self.stain[1]


def _halve(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """2x2 block mean of uint8 (H, W, 3) -> (ceil(H/2), ceil(W/2), 3); odd edges are padded by replication."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    total = image[0::2, 0::2].astype(np.uint16)
    total += image[1::2, 0::2]
    total += image[0::2, 1::2]
    total += image[1::2, 1::2]
    total += 2  # round half up
    return (total >> 2).astype(np.uint8)


def _tiles(band: npt.NDArray[np.uint8]) -> Iterator[npt.NDArray[np.uint8]]:
    """Row-major 256x256 tiles of ``band`` (rows a multiple of 256 except at the image end), padded with glass."""
    for y in range(0, band.shape[0], TILE):
        for x in range(0, band.shape[1], TILE):
            piece = band[y : y + TILE, x : x + TILE]
            if piece.shape[:2] != (TILE, TILE):
                tile = np.full((TILE, TILE, 3), int(BACKGROUND_INTENSITY), np.uint8)
                tile[: piece.shape[0], : piece.shape[1]] = piece
                piece = tile
            yield np.ascontiguousarray(piece)


def _strip_rows(width: int) -> int:
    # Whole tile rows, so each strip yields complete level-0 tiles; TILE is a multiple of 4, so the
    # 1/2 and 1/4 levels of consecutive strips line up too.
    return max(1, _STRIP_PIXELS // (width * TILE)) * TILE


def write_pyramid(path: Path, renderer: Renderer, params: SyntheticSlideParams, description: str) -> None:
    """Stream the level-0 strips into a tiled TIFF, then add the 1/2 and 1/4 levels as reduced pages."""
    width, height = params.width, params.height
    options: dict[str, Any] = {
        "photometric": "rgb",
        "tile": (TILE, TILE),
        "resolutionunit": "CENTIMETER",
        "compression": params.compression,
        "compressionargs": {"level": params.jpeg_quality if params.compression == "jpeg" else 6},
        "metadata": None,
    }
    step = _strip_rows(width)
    shapes = [(-(-height // down), -(-width // down), 3) for down in DOWNSAMPLES]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synthetic-") as scratch:
        # The reduced levels go to raw scratch files, appended strip by strip (rows arrive in order) and
        # read back one tile row at a time: a 40000x20000 slide needs 750 MB for them, none of it in RAM.
        raw = [Path(scratch) / "level1.raw", Path(scratch) / "level2.raw"]

        def level0_tiles() -> Iterator[npt.NDArray[np.uint8]]:
            with open(raw[0], "wb") as half_file, open(raw[1], "wb") as quarter_file:
                for y0 in range(0, height, step):
                    strip = renderer.strip(y0, min(height, y0 + step))
                    half = _halve(strip)
                    half_file.write(half.tobytes())
                    quarter_file.write(_halve(half).tobytes())
                    yield from _tiles(strip)

        def band_tiles(source: Path, shape: tuple[int, int, int]) -> Iterator[npt.NDArray[np.uint8]]:
            with open(source, "rb") as stream:
                for y in range(0, shape[0], TILE):
                    rows = min(TILE, shape[0] - y)
                    band = np.frombuffer(stream.read(rows * shape[1] * 3), np.uint8).reshape(rows, shape[1], 3)
                    yield from _tiles(band)

        bigtiff = width * height * 3 > 2**31  # classic TIFF offsets overflow at 4 GiB; zlib can get close
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
            for k, down in enumerate(DOWNSAMPLES):
                tiles = level0_tiles() if k == 0 else band_tiles(raw[k - 1], shapes[k])
                tif.write(
                    tiles,
                    shape=shapes[k],
                    dtype=np.uint8,
                    subfiletype=int(k > 0),
                    resolution=(1e4 / (params.mpp * down), 1e4 / (params.mpp * down)),
                    description=description if k == 0 else None,
                    **options,
                )
