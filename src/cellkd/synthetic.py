"""Synthetic H&E whole-slide images with known ground truth, plus simulated noisy annotations.

One call of ``generate_slide`` writes:

* an OpenSlide-readable pyramidal tiled TIFF (levels 1, 1/2, 1/4; 256x256 tiles; mpp in the
  resolution tags) showing 2-4 irregular tissue fragments on a white background, with nuclei of
  three visually distinct kinds (``other``: medium, oval, light and textured; ``immune``: small,
  round, dark; ``muscle``: elongated, aligned, medium);
* QuPath-style GeoJSON: ``truth`` (every nucleus, true class, exact contour), ``ssa`` / ``wsa``
  (strong / weak synthetic annotations: some nuclei missed, some labels flipped, contours jittered)
  and ``ea`` (expert annotations: true labels on a random subset).

Colour follows Beer-Lambert, ``I = 240 * exp(-(c_H * h + c_E * e))`` per RGB channel, with the
H and E optical-density vectors ``h``, ``e`` of Macenko's reference stain matrix, slightly
perturbed per slide (``stain_jitter``) so that stain normalization has something to undo.

Coordinates are level-0 pixels with QuPath's convention: pixel (row r, column c) covers
[c, c+1) x [r, r+1), and a nucleus owns the pixels whose centres lie inside its polygon (the rule
``rasterio.features.rasterize`` applies), so rasterizing ``truth`` reproduces the rendered nuclei
(up to pixel centres that lie exactly on a contour).

The image is rendered in horizontal strips (float work in column blocks) and streamed into the
TIFF; the 1/2 and 1/4 levels go through raw scratch files. Memory therefore stays at a few hundred
MB whatever the slide size, and every pixel is a function of its position only (no strip seams).
A nucleus keeps the same GeoJSON ``id`` in every set, so the sets can be joined on ``id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rasterio.features
import shapely
import tifffile
from affine import Affine
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.store.atomic import atomic_path
from cellkd.types import DOWNSAMPLES

logger = logging.getLogger(__name__)

ANNOTATION_SET_NAMES: tuple[str, ...] = ("truth", "ssa", "wsa", "ea")
"""Keys ``generate_slide`` accepts in ``geojson_paths``."""

BACKGROUND_INTENSITY = 240.0
"""Incident light I0 (and the glass colour): Macenko's customary Io = 240."""

REFERENCE_STAIN_MATRIX: npt.NDArray[np.float64] = np.array(
    [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], dtype=np.float64
)
"""Rows: hematoxylin and eosin optical-density vectors (R, G, B) of Macenko's reference H&E."""

TILE = 256
"""TIFF tile edge in pixels."""

_STRIP_PIXELS = 4_000_000
# Target pixels per strip; a strip holds its uint8 RGB and int32 nucleus labels (~28 MB at this size).
_BLOCK_COLUMNS = 2048
# Columns per float block inside a strip: ~15 float32 planes of (strip rows x 2048) is the float working set.

_NUCLEUS_VERTICES = 24
_NUCLEUS_GAP_PX = 1.0
# Minimum distance between two nuclei: a one-pixel gap keeps instances separable in the truth masks.
_BATCH = 50_000
_MAX_ROUNDS = 12
# Nucleus candidates per placement round (~50 MB of polygons), and rounds before giving up on crowded tissue.


@dataclass(frozen=True)
class NucleusStyle:
    """How one class of nucleus looks. Sizes in micrometres; concentrations in optical-density units."""

    semi_major_um: tuple[float, float]  # uniform range of the semi-major axis
    aspect: tuple[float, float]  # uniform range of major / minor axis ratio
    roughness: float  # relative amplitude of the smooth radial wobble of the contour
    hematoxylin: float  # mean hematoxylin concentration inside the nucleus
    hematoxylin_sd: float  # relative per-nucleus spread of that concentration
    chromatin: float  # relative amplitude of per-pixel chromatin texture
    aligned: bool  # long axis follows the slide's smooth fibre-orientation field


NUCLEUS_STYLES: Mapping[str, NucleusStyle] = {
    "other": NucleusStyle((3.8, 5.0), (1.2, 1.6), 0.05, 0.80, 0.10, 0.45, aligned=False),
    "immune": NucleusStyle((2.5, 3.2), (1.0, 1.15), 0.03, 1.70, 0.07, 0.08, aligned=False),
    "muscle": NucleusStyle((5.0, 8.0), (3.0, 5.0), 0.03, 1.15, 0.10, 0.15, aligned=True),
}
"""Appearance by class name; a class with another name takes the style at its position (mod 3)."""


@dataclass(frozen=True)
class SyntheticSlideParams:
    """What one synthetic slide looks like and how noisy its simulated annotations are.

    ``width``/``height`` are level-0 pixels; ``mpp`` is micrometres per level-0 pixel (nucleus sizes
    are physical, so they shrink in pixels as mpp grows). ``*_flip`` is the fraction of kept nuclei
    whose label moves to another class (uniformly), ``*_miss`` the fraction of nuclei left out,
    ``*_jitter_px`` the RMS displacement of contour vertices in level-0 pixels.
    """

    width: int = 4096
    height: int = 3072
    mpp: float = 0.5
    fragments: tuple[int, int] = (2, 4)
    nuclei_per_mpx: float = 800.0
    # 800 nuclei per 1e6 tissue pixels at 0.5 mpp = 3200 per mm², a moderately cellular stroma.
    class_fractions: tuple[float, ...] = (0.5, 0.3, 0.2)
    ssa_flip: float = 0.10
    ssa_miss: float = 0.05
    ssa_jitter_px: float = 1.5
    wsa_flip: float = 0.18
    wsa_miss: float = 0.08
    wsa_jitter_px: float = 2.5
    ea_count: int = 300
    ea_jitter_px: float = 0.3
    stain_jitter: float = 0.05
    compression: Literal["jpeg", "zlib"] = "jpeg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        def fail(field: str, value: Any, allowed: str) -> None:
            raise ValueError(f"SyntheticSlideParams.{field} = {value!r} is invalid; expected {allowed}")

        for field in ("width", "height"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 256 <= value <= 2**20:
                fail(field, value, "an integer number of level-0 pixels in [256, 1048576]")
        if not 0.05 <= self.mpp <= 10.0:
            fail("mpp", self.mpp, "micrometres per pixel in [0.05, 10]")
        fragments = tuple(self.fragments)
        if (
            len(fragments) != 2
            or not all(isinstance(v, int) for v in fragments)
            or not 1 <= fragments[0] <= fragments[1] <= 16
        ):
            fail("fragments", self.fragments, "(minimum, maximum) integers with 1 <= minimum <= maximum <= 16")
        object.__setattr__(self, "fragments", fragments)
        if not 0.0 <= self.nuclei_per_mpx <= 10_000.0:
            fail("nuclei_per_mpx", self.nuclei_per_mpx, "nuclei per million tissue pixels in [0, 10000]")
        fractions = tuple(float(f) for f in self.class_fractions)
        if not fractions or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            fail("class_fractions", self.class_fractions, "non-negative fractions, one per class, summing to 1")
        object.__setattr__(self, "class_fractions", fractions)
        for field in ("ssa_flip", "ssa_miss", "wsa_flip", "wsa_miss"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, getattr(self, field), "a fraction in [0, 1)")
        for field in ("ssa_jitter_px", "wsa_jitter_px", "ea_jitter_px"):
            if not 0.0 <= getattr(self, field) <= 20.0:
                fail(field, getattr(self, field), "an RMS displacement in [0, 20] level-0 pixels")
        if not isinstance(self.ea_count, int) or self.ea_count < 0:
            fail("ea_count", self.ea_count, "a non-negative integer")
        if not 0.0 <= self.stain_jitter <= 0.3:
            fail("stain_jitter", self.stain_jitter, "a relative perturbation in [0, 0.3]")
        if self.compression not in ("jpeg", "zlib"):
            fail("compression", self.compression, "'jpeg' or 'zlib'")
        if not 1 <= self.jpeg_quality <= 100:
            fail("jpeg_quality", self.jpeg_quality, "an integer in [1, 100]")


@dataclass(frozen=True)
class SlideTruth:
    """What ``generate_slide`` drew.

    ``fragments``: (x, y, width, height) boxes in level-0 pixels that hold every tissue pixel of each
    fragment (including a 2-pixel optical-blur halo); outside them the slide is background.
    ``nuclei_per_class``: nucleus counts in ``class_names`` order. ``annotation_counts``: features
    written per GeoJSON set. ``stain_matrix``: the H and E optical-density rows actually used.
    """

    slide_id: str
    width: int
    height: int
    mpp: float
    fragments: tuple[tuple[int, int, int, int], ...]
    class_names: tuple[str, ...]
    nuclei_per_class: tuple[int, ...]
    annotation_counts: tuple[tuple[str, int], ...]
    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]

    @property
    def n_nuclei(self) -> int:
        return sum(self.nuclei_per_class)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


@dataclass(frozen=True)
class _Nuclei:
    """Accepted nuclei, sorted by centroid (y, x)."""

    rings: npt.NDArray[np.float64]  # (N, K, 2) open rings, level-0 (x, y), rounded to 0.01 px
    centres: npt.NDArray[np.float64]  # (N, 2) (x, y); each contour is star-shaped around its centre
    labels: npt.NDArray[np.int64]  # (N,) class index
    concentration: npt.NDArray[np.float32]  # (N,) hematoxylin concentration
    chromatin: npt.NDArray[np.float32]  # (N,) relative texture amplitude


class _SmoothField:
    """Zero-mean, unit-variance value noise with a correlation length of about ``cell`` pixels.

    Only the coarse grid is stored, so any window of a slide of any size can be evaluated
    identically whichever strip asks for it (no seams between strips).
    """

    def __init__(self, rng: np.random.Generator, width: int, height: int, cell: float) -> None:
        self.cell = float(cell)
        grid = rng.standard_normal((int(height / cell) + 4, int(width / cell) + 4))
        grid = gaussian_filter(grid, 0.8, mode="wrap")
        self.grid = ((grid - grid.mean()) / (grid.std() + 1e-12)).astype(np.float32)

    def _weights(self, coords: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
        pos = coords / self.cell
        index = np.floor(pos).astype(np.intp)
        frac = (pos - index).astype(np.float32)
        # Smoothstep instead of linear weights: no visible creases along the grid lines.
        return index, frac * frac * (3 - 2 * frac)

    def rows(self, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[np.float32]:
        """float32 (y1 - y0, x1 - x0): the field at the pixel centres of rows [y0, y1), columns [x0, x1)."""
        iy, fy = self._weights(np.arange(y0, y1) + 0.5)
        band = self.grid[iy] * (1 - fy)[:, None] + self.grid[iy + 1] * fy[:, None]
        ix, fx = self._weights(np.arange(x0, x1) + 0.5)
        return band[:, ix] * (1 - fx) + band[:, ix + 1] * fx

    def at(self, xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """float32 (N,): the field at points ``xy`` (N, 2) in level-0 (x, y)."""
        ix, fx = self._weights(xy[:, 0])
        iy, fy = self._weights(xy[:, 1])
        g = self.grid
        top = g[iy, ix] * (1 - fx) + g[iy, ix + 1] * fx
        bottom = g[iy + 1, ix] * (1 - fx) + g[iy + 1, ix + 1] * fx
        return top * (1 - fy) + bottom * fy


def _seed_sequence(seed: int, slide_id: str) -> np.random.SeedSequence:
    # Python's hash() is salted per process; a digest keeps slide ids reproducible across runs.
    digest = int.from_bytes(hashlib.sha256(slide_id.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, digest])


def _style_for(spec: ClassSpec, index: int) -> NucleusStyle:
    return NUCLEUS_STYLES.get(spec.name) or list(NUCLEUS_STYLES.values())[index % len(NUCLEUS_STYLES)]


def _largest_remainder(fractions: Sequence[float], total: int) -> npt.NDArray[np.int64]:
    """Integer counts summing to ``total`` and proportional to ``fractions``."""
    raw = np.asarray(fractions, dtype=np.float64) * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def _fragment_polygons(rng: np.random.Generator, params: SyntheticSlideParams) -> list[shapely.Polygon]:
    """Irregular blobs (radially perturbed, rotated ellipses), one per grid cell, separated by white gaps."""
    width, height = params.width, params.height
    n = int(rng.integers(params.fragments[0], params.fragments[1] + 1))
    cols = max(1, round(math.sqrt(n * width / height)))
    rows = math.ceil(n / cols)
    cell_w, cell_h = width / cols, height / rows
    gap = max(16.0, 0.05 * min(cell_w, cell_h))  # margin on each side of a cell => >= 2 * gap between fragments
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    polygons = []
    for cell in np.sort(rng.permutation(rows * cols)[:n]):
        row, col = divmod(int(cell), cols)
        harmonics = np.arange(2, 8)
        # Sum of amplitudes <= 0.4, so the radius stays positive and the blob star-shaped (a valid polygon).
        amplitude = rng.uniform(0, 0.25 / harmonics)
        phase = rng.uniform(0, 2 * np.pi, harmonics.size)
        radius = 1 + (amplitude[:, None] * np.cos(harmonics[:, None] * theta + phase[:, None])).sum(axis=0)
        aspect = rng.uniform(0.55, 1.0)
        angle = rng.uniform(0, np.pi)
        x, y = radius * np.cos(theta), aspect * radius * np.sin(theta)
        x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
        box_w, box_h = cell_w - 2 * gap, cell_h - 2 * gap
        scale = min(box_w / np.ptp(x), box_h / np.ptp(y)) * rng.uniform(0.8, 1.0)
        x, y = (x - x.min()) * scale, (y - y.min()) * scale
        x += col * cell_w + gap + rng.uniform(0, box_w - x.max())
        y += row * cell_h + gap + rng.uniform(0, box_h - y.max())
        polygons.append(shapely.Polygon(np.column_stack([x, y]).round(2)))
    return polygons


def _fragment_box(polygon: shapely.Polygon, width: int, height: int, halo: int = 2) -> tuple[int, int, int, int]:
    minx, miny, maxx, maxy = polygon.bounds
    x0, y0 = max(0, math.floor(minx) - halo), max(0, math.floor(miny) - halo)
    x1, y1 = min(width, math.ceil(maxx) + halo), min(height, math.ceil(maxy) + halo)
    return x0, y0, x1 - x0, y1 - y0


def _nucleus_rings(
    rng: np.random.Generator,
    centres: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    styles: Sequence[NucleusStyle],
    mpp: float,
    orientation: _SmoothField,
    base_angle: float,
) -> npt.NDArray[np.float64]:
    """(N, K, 2) open contours: radially wobbled ellipses around ``centres``, rounded to 0.01 px."""
    n = len(centres)
    semi_lo = np.array([s.semi_major_um[0] for s in styles])[labels]
    semi_hi = np.array([s.semi_major_um[1] for s in styles])[labels]
    aspect_lo = np.array([s.aspect[0] for s in styles])[labels]
    aspect_hi = np.array([s.aspect[1] for s in styles])[labels]
    roughness = np.array([s.roughness for s in styles])[labels]
    aligned = np.array([s.aligned for s in styles])[labels]
    major = rng.uniform(semi_lo, semi_hi) / mpp
    minor = major / rng.uniform(aspect_lo, aspect_hi)
    # Aligned nuclei (smooth muscle) follow a slowly varying direction, like cells in a bundle.
    flow = base_angle + 1.2 * orientation.at(centres) + rng.normal(0, 0.12, n)
    angle = np.where(aligned, flow, rng.uniform(0, np.pi, n))
    t = np.linspace(0, 2 * np.pi, _NUCLEUS_VERTICES, endpoint=False)
    harmonics = np.arange(2, 5)
    coef = rng.normal(0, 1, (n, harmonics.size, 2)) * (roughness[:, None] / harmonics)[:, :, None]
    wobble = 1 + (coef[..., :1] * np.cos(harmonics[:, None] * t) + coef[..., 1:] * np.sin(harmonics[:, None] * t)).sum(
        1
    )
    wobble = np.clip(wobble, 0.6, 1.4)
    x = major[:, None] * np.cos(t) * wobble
    y = minor[:, None] * np.sin(t) * wobble
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rings = np.stack([centres[:, :1] + x * cos - y * sin, centres[:, 1:] + x * sin + y * cos], axis=-1)
    return rings.round(2)


def _geojson_polygon(ring: npt.NDArray[np.float64]) -> dict[str, Any]:
    """GeoJSON Polygon mapping of one open (K, 2) ring (closed on the way out)."""
    coords = ring.tolist()
    coords.append(coords[0])
    return {"type": "Polygon", "coordinates": [coords]}


def _closed(rings: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.concatenate([rings, rings[:, :1]], axis=1)


def _too_close(
    rings_a: npt.NDArray[np.float64],
    rings_b: npt.NDArray[np.float64],
    polygons: npt.NDArray[np.object_] | None = None,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Index pairs (i, j) with contour i of ``rings_a`` closer than ``_NUCLEUS_GAP_PX`` to contour j of ``rings_b``.

    Bounding circles on a k-d tree find the candidates; exact polygon distances decide. Polygons of
    ``rings_b`` are built only for the pairs, so the accepted nuclei are kept as compact coordinate arrays.
    When both arguments are the same array, the result holds the pairs (i, i) too.
    """
    centres_a, centres_b = rings_a.mean(axis=1), rings_b.mean(axis=1)
    radius_a = np.linalg.norm(rings_a - centres_a[:, None], axis=-1).max(axis=1)
    radius_b = np.linalg.norm(rings_b - centres_b[:, None], axis=-1).max(axis=1)
    reach = radius_a.max() + radius_b.max() + _NUCLEUS_GAP_PX
    near = cKDTree(centres_a).sparse_distance_matrix(cKDTree(centres_b), reach, output_type="ndarray")
    i, j = near["i"].astype(np.intp), near["j"].astype(np.intp)
    circles = near["v"] < radius_a[i] + radius_b[j] + _NUCLEUS_GAP_PX
    i, j = i[circles], j[circles]
    if polygons is None:
        polygons = shapely.polygons(_closed(rings_a))
    partners, inverse = np.unique(j, return_inverse=True)
    partner_polygons = polygons[partners] if rings_a is rings_b else shapely.polygons(_closed(rings_b[partners]))
    close = shapely.distance(polygons[i], partner_polygons[inverse]) < _NUCLEUS_GAP_PX
    return i[close], j[close]


def _candidate_centres(
    rng: np.random.Generator, fragments: Sequence[shapely.Polygon], count: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """(count, 2) points uniform over the union of ``fragments`` and (count,) the fragment of each."""
    areas = np.array([f.area for f in fragments])
    owner = rng.choice(len(fragments), size=count, p=areas / areas.sum())
    centres = np.empty((count, 2))
    for index, fragment in enumerate(fragments):
        slots = np.flatnonzero(owner == index)
        minx, miny, maxx, maxy = fragment.bounds
        fill = fragment.area / ((maxx - minx) * (maxy - miny))
        found = np.zeros((0, 2))
        while len(found) < slots.size:
            draw = rng.uniform((minx, miny), (maxx, maxy), (int(1.3 * (slots.size - len(found)) / fill) + 16, 2))
            found = np.concatenate([found, draw[shapely.contains_xy(fragment, draw[:, 0], draw[:, 1])]])
        centres[slots] = found[: slots.size]
    return centres, owner


def _sample_nuclei(
    rng: np.random.Generator,
    fragments: Sequence[shapely.Polygon],
    params: SyntheticSlideParams,
    styles: Sequence[NucleusStyle],
    orientation: _SmoothField,
) -> _Nuclei:
    """Place non-overlapping nuclei fully inside the fragments, with class counts set by ``class_fractions``.

    Candidates come in rounds (at most ``_BATCH`` at a time, so memory stays bounded on huge slides);
    a candidate is accepted greedily unless it leaves its fragment or comes within ``_NUCLEUS_GAP_PX``
    of an accepted nucleus. Each round draws classes in proportion to the still-missing counts, so
    hard-to-place (elongated) classes catch up.
    """
    target = round(params.nuclei_per_mpx * sum(f.area for f in fragments) / 1e6)
    remaining = _largest_remainder(params.class_fractions, target)
    for fragment in fragments:
        shapely.prepare(fragment)
    fragment_array = np.asarray(fragments, dtype=object)
    base_angle = float(rng.uniform(0, np.pi))
    kept_rings, kept_centres = [np.zeros((0, _NUCLEUS_VERTICES, 2))], [np.zeros((0, 2))]
    kept_labels = [np.zeros(0, np.int64)]

    for _ in range(_MAX_ROUNDS):
        if not remaining.any():
            break
        count = min(_BATCH, int(1.5 * remaining.sum()) + 16)
        centres, owner = _candidate_centres(rng, fragments, count)
        labels = rng.choice(len(remaining), size=count, p=remaining / remaining.sum())
        rings = _nucleus_rings(rng, centres, labels, styles, params.mpp, orientation, base_angle)
        polygons = shapely.polygons(_closed(rings))
        usable = shapely.contains(fragment_array[owner], polygons)
        placed = np.concatenate(kept_rings)
        if len(placed):
            blocked, _ = _too_close(rings, placed, polygons=polygons)
            usable[blocked] = False
        # Greedy within the batch: a candidate loses to any earlier accepted candidate it comes close to.
        later, earlier = _too_close(rings, rings, polygons=polygons)
        keep = earlier < later
        order = np.argsort(later[keep], kind="stable")
        later, earlier = later[keep][order], earlier[keep][order]
        starts = np.searchsorted(later, np.arange(count + 1))
        accepted = np.zeros(count, dtype=bool)
        for j in np.flatnonzero(usable):
            if remaining[labels[j]] == 0 or accepted[earlier[starts[j] : starts[j + 1]]].any():
                continue
            accepted[j] = True
            remaining[labels[j]] -= 1
        if not accepted.any():
            break
        kept_rings.append(rings[accepted])
        kept_centres.append(centres[accepted])
        kept_labels.append(labels[accepted])

    if remaining.any():
        logger.warning(
            "placed %d of %d nuclei (per class short by %s): tissue too crowded for nuclei_per_mpx=%s",
            target - int(remaining.sum()),
            target,
            remaining.tolist(),
            params.nuclei_per_mpx,
        )
    rings, centres, labels = np.concatenate(kept_rings), np.concatenate(kept_centres), np.concatenate(kept_labels)
    order = np.lexsort((centres[:, 0], centres[:, 1]))
    rings, labels, centres = rings[order], labels[order], centres[order]
    base = np.array([s.hematoxylin for s in styles])[labels]
    spread = np.array([s.hematoxylin_sd for s in styles])[labels]
    concentration = base * np.clip(1 + spread * rng.standard_normal(len(labels)), 0.6, 1.4)
    chromatin = np.array([s.chromatin for s in styles])[labels]
    return _Nuclei(rings, centres, labels, concentration.astype(np.float32), chromatin.astype(np.float32))


def _stain_matrix(rng: np.random.Generator, jitter: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(2, 3) unit OD rows (H, E) and (2,) concentration scales, perturbed by ``jitter``."""
    matrix = REFERENCE_STAIN_MATRIX * (1 + jitter * rng.standard_normal((2, 3)))
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=1, keepdims=True)
    scales = np.clip(1 + jitter * rng.standard_normal(2), 0.5, 1.5)
    return matrix, scales


class _Renderer:
    """Renders horizontal strips of the level-0 image; the same rows always give the same pixels."""

    def __init__(
        self,
        rng: np.random.Generator,
        params: SyntheticSlideParams,
        fragments: Sequence[shapely.Polygon],
        nuclei: _Nuclei,
        stain: npt.NDArray[np.float64],
        scales: npt.NDArray[np.float64],
    ) -> None:
        self.width, self.height = params.width, params.height
        self.fragments = list(fragments)
        self.nuclei = nuclei
        self.stain = stain.astype(np.float32)
        self.scales = scales.astype(np.float32)
        px_per_um = 1.0 / params.mpp
        self.eosin_field = _SmoothField(rng, self.width, self.height, cell=60 * px_per_um)
        self.hema_field = _SmoothField(rng, self.width, self.height, cell=40 * px_per_um)
        self.warp_field = _SmoothField(rng, self.width, self.height, cell=30 * px_per_um)
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
            shapes = ((_geojson_polygon(self.nuclei.rings[i]), int(i) + 1) for i in hit)
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
        hema = 0.07 + 0.02 * self.hema_field.rows(ya, yb, xa, xb)
        eosin *= tissue
        hema *= tissue

        inside = labels > 0
        which = labels[inside] - 1
        hema[inside] = self.nuclei.concentration[which] * (1 + self.nuclei.chromatin[which] * 0.5 * fine[inside])
        eosin[inside] *= 0.35  # a nucleus displaces most of the eosinophilic cytoplasm and stroma
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


def _write_pyramid(path: Path, renderer: _Renderer, params: SyntheticSlideParams, description: str) -> None:
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


def _uuids(rng: np.random.Generator, n: int) -> list[str]:
    return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


def _jitter_rings(
    rng: np.random.Generator, rings: npt.NDArray[np.float64], centres: npt.NDArray[np.float64], jitter: float
) -> npt.NDArray[np.float64]:
    """Move contour vertices by ``jitter`` px RMS: a smooth radial wobble plus a shift of the whole contour.

    Radial moves keep each contour star-shaped around its centre, so polygons stay valid.
    """
    if jitter == 0 or len(rings) == 0:
        return rings
    n, k = rings.shape[:2]
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    harmonics = np.arange(1, 4)
    coef = rng.standard_normal((n, harmonics.size, 2))
    # Each harmonic adds variance 1/2 * (a^2 + b^2) = 1 on average, hence the sqrt(3) normalisation.
    radial = (coef[..., :1] * np.cos(harmonics[:, None] * t) + coef[..., 1:] * np.sin(harmonics[:, None] * t)).sum(1)
    radial *= 0.8 * jitter / math.sqrt(harmonics.size)
    offset = rings - centres[:, None, :]
    radius = np.linalg.norm(offset, axis=-1)
    scale = np.maximum(radius + radial, 0.3 * radius) / np.maximum(radius, 1e-9)
    shift = rng.normal(0, 0.6 * jitter / math.sqrt(2), (n, 1, 2))  # 0.8^2 + 0.6^2 = 1: total RMS = jitter
    return (centres[:, None, :] + offset * scale[..., None] + shift).round(2)


def _write_feature_collection(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    rings: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    classes: Sequence[ClassSpec],
) -> None:
    """Write a QuPath GeoJSON export atomically: one detection per nucleus, closed rings in level-0 pixels.

    Features are serialised one at a time, so a slide with 10^5 nuclei never holds the whole document.
    """
    classifications = [{"name": c.qupath_name, "color": list(c.color)} for c in classes]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        stream.write('{"type": "FeatureCollection", "features": [')
        for i, (uid, ring, label) in enumerate(zip(ids, rings, labels.tolist(), strict=True)):
            feature = {
                "type": "Feature",
                "id": uid,
                "geometry": _geojson_polygon(ring),
                "properties": {"objectType": "detection", "classification": classifications[label], "isLocked": False},
            }
            stream.write(("\n" if i == 0 else ",\n") + json.dumps(feature))
        stream.write("\n]}\n")


def _noisy_selection(
    rng: np.random.Generator, labels: npt.NDArray[np.int64], n_classes: int, miss: float, flip: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    """Drop round(miss * N) nuclei, then move round(flip * kept) labels to another class uniformly.

    Returns the kept indices (ascending) and their (possibly flipped) labels.
    """
    n = len(labels)
    missed = rng.choice(n, size=round(miss * n), replace=False)
    kept = np.setdiff1d(np.arange(n), missed)
    noisy = labels[kept].copy()
    flipped = rng.choice(len(kept), size=round(flip * len(kept)), replace=False)
    if flipped.size and n_classes > 1:
        noisy[flipped] = (noisy[flipped] + rng.integers(1, n_classes, size=flipped.size)) % n_classes
    return kept, noisy


def generate_slide(
    slide_id: str,
    slide_path: str | os.PathLike[str],
    geojson_paths: Mapping[str, str | os.PathLike[str]],
    params: SyntheticSlideParams,
    classes: Sequence[ClassSpec] = DEFAULT_CLASSES,
    seed: int = 0,
) -> SlideTruth:
    """Write one synthetic slide (pyramidal TIFF) and its annotation GeoJSONs; return what was drawn.

    ``geojson_paths`` maps any of ``truth``, ``ssa``, ``wsa``, ``ea`` to an output path; only those sets
    are written. The output depends only on (``params``, ``classes``, ``seed``, ``slide_id``): the same
    inputs give byte-identical files. All files are written atomically.
    Raises ``ValueError`` for an unknown annotation set, a negative seed, or ``classes`` that do not match
    ``params.class_fractions``.
    """
    unknown = sorted(set(geojson_paths) - set(ANNOTATION_SET_NAMES))
    if unknown:
        raise ValueError(
            f"slide {slide_id}: unknown annotation set(s) {unknown}; expected among {ANNOTATION_SET_NAMES}"
        )
    if len(classes) != len(params.class_fractions):
        msg = (
            f"slide {slide_id}: {len(classes)} classes {[c.name for c in classes]} but class_fractions has "
            f"{len(params.class_fractions)} entries {params.class_fractions}; give one fraction per class"
        )
        raise ValueError(msg)
    if len(classes) < 2 and max(params.ssa_flip, params.wsa_flip) > 0:
        raise ValueError(f"slide {slide_id}: label flips need at least two classes; set ssa_flip and wsa_flip to 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"slide {slide_id}: seed must be a non-negative integer, got {seed!r}")

    started = time.perf_counter()
    # One independent stream per concern: e.g. changing wsa_flip leaves the image and the SSA untouched.
    streams = [np.random.default_rng(s) for s in _seed_sequence(int(seed), slide_id).spawn(8)]
    layout_rng, nuclei_rng, stain_rng, render_rng, id_rng, ssa_rng, wsa_rng, ea_rng = streams
    styles = [_style_for(spec, i) for i, spec in enumerate(classes)]

    fragments = _fragment_polygons(layout_rng, params)
    orientation = _SmoothField(layout_rng, params.width, params.height, cell=80 / params.mpp)
    nuclei = _sample_nuclei(nuclei_rng, fragments, params, styles, orientation)
    stain, scales = _stain_matrix(stain_rng, params.stain_jitter)
    renderer = _Renderer(render_rng, params, fragments, nuclei, stain, scales)

    slide_path = Path(slide_path)
    description = f"cellkd synthetic H&E slide {slide_id} (seed {int(seed)})"
    with atomic_path(slide_path) as tmp:
        _write_pyramid(tmp, renderer, params, description)

    n = len(nuclei.labels)
    ids = np.array(_uuids(id_rng, n), dtype=object)
    set_rngs = {"ssa": ssa_rng, "wsa": wsa_rng}
    counts: list[tuple[str, int]] = []
    for name in ANNOTATION_SET_NAMES:
        if name not in geojson_paths:
            continue
        if name == "truth":
            kept, labels, rings = np.arange(n), nuclei.labels, nuclei.rings
        elif name == "ea":
            kept = np.sort(ea_rng.choice(n, size=min(params.ea_count, n), replace=False))
            labels = nuclei.labels[kept]
            rings = _jitter_rings(ea_rng, nuclei.rings[kept], nuclei.centres[kept], params.ea_jitter_px)
        else:
            rng = set_rngs[name]
            miss, flip, jitter = (getattr(params, f"{name}_{k}") for k in ("miss", "flip", "jitter_px"))
            kept, labels = _noisy_selection(rng, nuclei.labels, len(classes), miss, flip)
            rings = _jitter_rings(rng, nuclei.rings[kept], nuclei.centres[kept], jitter)
        _write_feature_collection(geojson_paths[name], ids[kept].tolist(), rings, labels, classes)
        counts.append((name, len(kept)))

    truth = SlideTruth(
        slide_id=slide_id,
        width=params.width,
        height=params.height,
        mpp=params.mpp,
        fragments=tuple(_fragment_box(f, params.width, params.height) for f in fragments),
        class_names=tuple(c.name for c in classes),
        nuclei_per_class=tuple(int(v) for v in np.bincount(nuclei.labels, minlength=len(classes))),
        annotation_counts=tuple(counts),
        stain_matrix=tuple(tuple(float(v) for v in row) for row in stain),  # type: ignore[arg-type]
    )
    logger.info(
        "slide %s: %dx%d px, %d fragments, %d nuclei %s, written in %.1f s",
        slide_id,
        params.width,
        params.height,
        len(fragments),
        truth.n_nuclei,
        dict(zip(truth.class_names, truth.nuclei_per_class, strict=True)),
        time.perf_counter() - started,
    )
    return truth
