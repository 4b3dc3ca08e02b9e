"""Where tissue and nuclei lie: fragment outlines, non-overlapping nucleus contours, smooth random fields.

Coordinates are level-0 pixels with QuPath's convention: pixel (row r, column c) covers
[c, c+1) x [r, r+1), and a nucleus owns the pixels whose centres lie inside its polygon.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from cellkd.synthetic.spec import EOSIN_KEPT_IN_NUCLEUS, NucleusStyle, SyntheticSlideParams

logger = logging.getLogger(__name__)

_NUCLEUS_VERTICES = 24
_NUCLEUS_GAP_PX = 1.0
# Minimum distance between two nuclei: a one-pixel gap keeps instances separable in the truth masks.
_BATCH = 50_000
_MAX_ROUNDS = 12
# Nucleus candidates per placement round (~50 MB of polygons), and rounds before giving up on crowded tissue.


@dataclass(frozen=True)
class Nuclei:
    """Accepted nuclei (or nucleus-like background objects), sorted by centroid (y, x)."""

    rings: npt.NDArray[np.float64]  # (N, K, 2) open rings, level-0 (x, y), rounded to 0.01 px
    centres: npt.NDArray[np.float64]  # (N, 2) (x, y); each contour is star-shaped around its centre
    labels: npt.NDArray[np.int64]  # (N,) class index
    concentration: npt.NDArray[np.float32]  # (N,) hematoxylin concentration
    chromatin: npt.NDArray[np.float32]  # (N,) relative texture amplitude
    eosin: npt.NDArray[np.float32] | None = field(default=None)
    # (N,) eosin kept inside, relative to the tissue's; None: EOSIN_KEPT_IN_NUCLEUS for every object

    def __post_init__(self) -> None:
        if self.eosin is None:
            object.__setattr__(self, "eosin", np.full(len(self.labels), EOSIN_KEPT_IN_NUCLEUS, np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: npt.NDArray[np.intp]) -> Nuclei:
        """The objects at ``index``, in that order."""
        assert self.eosin is not None
        return Nuclei(
            self.rings[index],
            self.centres[index],
            self.labels[index],
            self.concentration[index],
            self.chromatin[index],
            self.eosin[index],
        )

    def concatenate(self, other: Nuclei) -> Nuclei:
        """These objects followed by ``other``'s."""
        assert self.eosin is not None and other.eosin is not None
        return Nuclei(
            np.concatenate([self.rings, other.rings]),
            np.concatenate([self.centres, other.centres]),
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.concentration, other.concentration]),
            np.concatenate([self.chromatin, other.chromatin]),
            np.concatenate([self.eosin, other.eosin]),
        )


class SmoothField:
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


def _largest_remainder(fractions: Sequence[float], total: int) -> npt.NDArray[np.int64]:
    """Integer counts summing to ``total`` and proportional to ``fractions``."""
    raw = np.asarray(fractions, dtype=np.float64) * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def fragment_polygons(rng: np.random.Generator, params: SyntheticSlideParams) -> list[shapely.Polygon]:
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
        aspect = rng.uniform(*params.fragment_aspect)
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


def fragment_box(polygon: shapely.Polygon, width: int, height: int, halo: int = 2) -> tuple[int, int, int, int]:
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
    orientation: SmoothField,
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


def geojson_polygon(ring: npt.NDArray[np.float64]) -> dict[str, Any]:
    """GeoJSON Polygon mapping of one open (K, 2) ring (closed on the way out)."""
    coords = ring.tolist()
    coords.append(coords[0])
    return {"type": "Polygon", "coordinates": [coords]}


def closed(rings: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """(N, K + 1, 2) closed rings from (N, K, 2) open ones."""
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
        polygons = shapely.polygons(closed(rings_a))
    partners, inverse = np.unique(j, return_inverse=True)
    partner_polygons = polygons[partners] if rings_a is rings_b else shapely.polygons(closed(rings_b[partners]))
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


def sample_nuclei(
    rng: np.random.Generator,
    fragments: Sequence[shapely.Polygon],
    params: SyntheticSlideParams,
    styles: Sequence[NucleusStyle],
    orientation: SmoothField,
    debris_style: NucleusStyle | None = None,
) -> tuple[Nuclei, Nuclei]:
    """Place non-overlapping nuclei fully inside the fragments, with class counts set by ``class_fractions``.

    Returns the nuclei and the background objects (``debris_per_nucleus`` per nucleus, drawn in
    ``debris_style``, label -1): they are placed together, as one more kind, so neither overlaps the
    other. Candidates come in rounds (at most ``_BATCH`` at a time, so memory stays bounded on huge
    slides); a candidate is accepted greedily unless it leaves its fragment or comes within
    ``_NUCLEUS_GAP_PX`` of an accepted object. Each round draws kinds in proportion to the still-missing
    counts, so hard-to-place (elongated) classes catch up.
    """
    if params.nuclei_total is None:
        target = round(params.nuclei_per_mpx * sum(f.area for f in fragments) / 1e6)
    else:
        target = params.nuclei_total
    n_debris = round(params.debris_per_nucleus * target) if debris_style is not None else 0
    # The background kind comes last: with none to place, its zero weight leaves every draw as before.
    remaining = np.append(_largest_remainder(params.class_fractions, target), n_debris)
    styles = [*styles, debris_style or styles[0]]
    target += n_debris
    for fragment in fragments:
        shapely.prepare(fragment)
    fragment_array = np.asarray(fragments, dtype=object)
    base_angle = float(rng.uniform(0, np.pi))
    kept_rings, kept_centres = [np.zeros((0, _NUCLEUS_VERTICES, 2))], [np.zeros((0, 2))]
    kept_labels = [np.zeros(0, np.int64)]

    # Huge slides need more rounds than _MAX_ROUNDS, since a round holds at most _BATCH candidates.
    for _ in range(max(_MAX_ROUNDS, 3 * math.ceil(1.5 * target / _BATCH))):
        if not remaining.any():
            break
        count = min(_BATCH, int(1.5 * remaining.sum()) + 16)
        centres, owner = _candidate_centres(rng, fragments, count)
        labels = rng.choice(len(remaining), size=count, p=remaining / remaining.sum())
        # A nucleus_size factor on every axis is the same as drawing at a proportionally finer mpp.
        rings = _nucleus_rings(rng, centres, labels, styles, params.mpp / params.nucleus_size, orientation, base_angle)
        polygons = shapely.polygons(closed(rings))
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
            "placed %d of %d nuclei (per class short by %s): tissue too crowded for %s",
            target - int(remaining.sum()),
            target,
            remaining.tolist(),
            f"nuclei_per_mpx={params.nuclei_per_mpx}"
            if params.nuclei_total is None
            else f"nuclei_total={params.nuclei_total}",
        )
    rings, centres, labels = np.concatenate(kept_rings), np.concatenate(kept_centres), np.concatenate(kept_labels)
    order = np.lexsort((centres[:, 0], centres[:, 1]))
    rings, labels, centres = rings[order], labels[order], centres[order]
    base = np.array([s.hematoxylin for s in styles])[labels]
    spread = np.array([s.hematoxylin_sd for s in styles])[labels]
    concentration = base * np.clip(1 + spread * rng.standard_normal(len(labels)), 0.6, 1.4)
    chromatin = np.array([s.chromatin for s in styles])[labels]
    debris = labels == len(styles) - 1
    eosin = np.full(len(labels), EOSIN_KEPT_IN_NUCLEUS)
    if debris.any():  # drawn only when there is debris: the nuclei's stream stays as without it
        lo, hi = styles[-1].eosin_kept
        eosin[debris] = rng.uniform(lo, hi, int(debris.sum()))
    labels = np.where(debris, -1, labels)
    everything = Nuclei(
        rings, centres, labels, concentration.astype(np.float32), chromatin.astype(np.float32), eosin.astype(np.float32)
    )
    if not debris.any():  # no copy of the (possibly paper-scale) arrays
        return everything, everything.take(np.zeros(0, np.intp))
    return everything.take(np.flatnonzero(~debris)), everything.take(np.flatnonzero(debris))
