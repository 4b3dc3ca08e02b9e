"""Macenko stain normalization: one stain model fitted per slide, applied tile by tile.

Follows Macenko et al. 2009 ("A method for normalizing histology slides for quantitative
analysis", ISBI) as torchstain and staintools implement it:

1. optical density ``OD = -log((I + 1) / io)`` per RGB channel;
2. drop background: pixels with any OD channel below ``beta``;
3. eigenvectors of the OD covariance; project OD onto the plane of the two largest;
4. the ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane give the two
   stain vectors; H is the one with the larger red (first) OD component;
5. concentrations ``C = pinv(HE) @ OD`` (= least squares), ``maxC`` = their 99th percentile;
6. normalize: ``I' = io * exp(-HE_ref @ (C * maxC_ref / maxC_src))``.

Speed: steps 5-6 for a fitted source and a target collapse into one fixed 3x3 matrix
``M = HE_ref @ diag(maxC_ref / maxC_src) @ pinv(HE_src)``, and since the input is uint8,
``exp(-M @ OD(I))`` factorizes per input channel into 256-entry lookup tables:
``I'_i = io * T_0[R, i] * T_1[G, i] * T_2[B, i]`` with ``T_j[v, i] = exp(-M_ij * OD(v))``.
A tile then costs three table gathers and two multiplies per pixel (float32), no log and
no exp, and equals the float64 formula up to float32 rounding (< 1e-3 grey levels).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cellkd.errors import StainError
from cellkd.params import check_parameters
from cellkd.store.fragments import CHUNK, FragmentStore, FragmentStoreWriter, iter_windows
from cellkd.types import DOWNSAMPLES, RGBImage
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

MIN_TISSUE_PIXELS = 1000
"""Fewer tissue pixels than this (after the ``beta`` threshold) and the fit falls back to the reference."""

_MAX_COND = 1e4
"""Condition number of the fitted stain matrix above which H and E count as collinear (degenerate fit)."""

_MAX_FACTOR_EXPONENT = 40.0
"""Largest |M_ij * OD| for the product-of-tables path: three float32 factors of at most e^40 never give 0 * inf."""

_REFERENCE_RESOURCE = "macenko_reference.json"


@dataclass(frozen=True)
class MacenkoParams:
    """Settings of the ``macenko:`` section of workflow_config.yaml.

    io: transmitted light intensity (background grey level), 0 < io <= 255.
    alpha: percentile (0 <= alpha < 50) of the angle distribution taken as the stain extremes.
    beta: OD threshold; pixels with any OD channel below it are background and not used for fitting.
    max_samples: tissue pixels sampled across the slide for fitting (>= MIN_TISSUE_PIXELS).
    reference: JSON file ``{"stain_matrix": 3x2, "max_concentrations": [2]}``; None = the shipped default.
    """

    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    max_samples: int = 200_000
    reference: str | None = None

    def __post_init__(self) -> None:
        # beta's bound is the OD of a black pixel, -log(1 / io); io's own check comes first.
        max_od = -math.log(1.0 / self.io) if self.io > 0 else 0.0
        checks = [
            (0.0 < self.io <= 255.0, "io", "in (0, 255]"),
            (0.0 <= self.alpha < 50.0, "alpha", "in [0, 50) (a percentile)"),
            (0.0 <= self.beta < max_od, "beta", f"in [0, {max_od:.2f})"),
            (
                int(self.max_samples) == self.max_samples and self.max_samples >= MIN_TISSUE_PIXELS,
                "max_samples",
                f"an integer >= {MIN_TISSUE_PIXELS}",
            ),
        ]
        check_parameters(self, checks, "macenko", " (see macenko: in workflow_config.yaml)")


@dataclass(frozen=True, eq=False)
class StainModel:
    """Stain model of a slide (fitted) or of the reference (loaded).

    stain_matrix: float64 (3, 2); columns are the H and E optical-density vectors over (R, G, B), H first.
    max_concentrations: float64 (2,); 99th percentile of the H and E concentrations.
    """

    stain_matrix: npt.NDArray[np.float64]
    max_concentrations: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        he = np.array(self.stain_matrix, dtype=np.float64)
        max_c = np.array(self.max_concentrations, dtype=np.float64)
        if he.shape != (3, 2) or max_c.shape != (2,):
            raise StainError(
                f"stain model needs stain_matrix of shape (3, 2) and max_concentrations of shape (2,), "
                f"got {he.shape} and {max_c.shape}"
            )
        if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
            raise StainError(f"stain model must be finite with positive max_concentrations, got {he.tolist()}, {max_c}")
        # Frozen means frozen: the arrays are private read-only copies.
        he.flags.writeable = False
        max_c.flags.writeable = False
        object.__setattr__(self, "stain_matrix", he)
        object.__setattr__(self, "max_concentrations", max_c)


def _od_table(io: float) -> npt.NDArray[np.float64]:
    """float64 (256,): OD of each uint8 grey level, ``-log((v + 1) / io)`` (the +1 keeps black finite)."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / io)


def _as_pixels(pixels: np.ndarray, what: str) -> npt.NDArray[np.uint8]:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.shape[-1] != 3:
        raise StainError(f"{what}: expected uint8 RGB pixels of shape (N, 3) or (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr.reshape(-1, 3)


def load_reference(path: str | os.PathLike[str] | None = None) -> StainModel:
    """Load a reference stain model from JSON ``{"stain_matrix": 3x2, "max_concentrations": [2]}``.

    ``path=None`` loads the shipped default (torchstain's / Macenko's HERef and maxCRef).
    """
    if path is None:
        source = resources.files("cellkd").joinpath("data", _REFERENCE_RESOURCE)
        name = f"cellkd/data/{_REFERENCE_RESOURCE}"
        text = source.read_text(encoding="utf-8")
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise StainError(f"{name}: cannot read the Macenko reference ({err}); fix macenko: reference:") from err
    try:
        data = json.loads(text)
        he, max_c = data["stain_matrix"], data["max_concentrations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        msg = f'{name}: not a Macenko reference ({err!r}); expected {{"stain_matrix": 3x2, "max_concentrations": [2]}}'
        raise StainError(msg) from err
    try:
        model = StainModel(np.asarray(he, dtype=np.float64), np.asarray(max_c, dtype=np.float64))
    except (StainError, ValueError) as err:
        raise StainError(f"{name}: invalid Macenko reference: {err}") from err
    if np.linalg.cond(model.stain_matrix) > _MAX_COND:
        raise StainError(
            f"{name}: the H and E columns of stain_matrix are (nearly) collinear; use distinct stain vectors"
        )
    return model


def fit_macenko(pixels: np.ndarray, params: MacenkoParams, *, name: str = "<pixels>") -> StainModel:
    """Fit a Macenko stain model to ``pixels``: uint8 (N, 3) or (H, W, 3) RGB.

    ``max_concentrations`` is the 99th percentile over all given pixels (torchstain's convention;
    ``sample_tissue_pixels`` hands over tissue pixels only). With fewer than ``MIN_TISSUE_PIXELS``
    pixels above ``beta``, or a degenerate fit (collinear H/E, non-finite), logs a warning naming
    ``name`` and returns the reference model, so normalization becomes identity-like.
    """
    px = _as_pixels(pixels, name)
    od = _od_table(params.io)[px]  # (N, 3) float64; the fit runs once per slide, precision is cheap
    tissue = od[(od >= params.beta).all(axis=1)]

    def fallback(reason: str) -> StainModel:
        logger.warning("%s: %s; using the reference stain model instead (identity-like normalization)", name, reason)
        return load_reference(params.reference)

    if len(tissue) < MIN_TISSUE_PIXELS:
        return fallback(
            f"only {len(tissue)} of {len(od)} pixels are tissue (every OD channel >= beta={params.beta}), "
            f"fewer than the {MIN_TISSUE_PIXELS} needed for a Macenko fit"
        )
    _, eigvecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    # Principal axis first, turned to point into positive OD: for H&E its components are all positive,
    # so tissue (OD > 0) projects onto it positively and the angles stay in (-pi/2, pi/2), away from
    # the +-pi wrap. The percentiles equal torchstain's (they are equivariant under its axis order).
    plane = eigvecs[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [params.alpha, 100.0 - params.alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    if not np.isfinite(he).all() or np.linalg.cond(he) > _MAX_COND:
        return fallback(
            f"degenerate stain matrix {np.round(he, 4).tolist()} (H and E collinear: single-colour tissue?)"
        )
    conc = np.linalg.pinv(he) @ od.T  # (2, N), identical to lstsq for a full-rank (3, 2) matrix
    max_c = np.percentile(conc, 99, axis=1)
    if not (np.isfinite(max_c).all() and (max_c > 1e-6).all()):
        return fallback(f"degenerate 99th-percentile concentrations {max_c.tolist()}")
    model = StainModel(he, max_c)
    logger.info("%s: Macenko fit on %d tissue pixels: HE=%s maxC=%s", name, len(tissue), he.round(4).tolist(), max_c)
    return model


class TileNormalizer:
    """Precomputed Macenko mapping from ``source`` stains to ``target`` stains; call it on tiles.

    Build it once per slide and call it for every tile: construction costs a 3x3 matrix and three
    (256, 3) lookup tables, a call costs three table gathers and two multiplies per pixel.
    """

    def __init__(self, source: StainModel, target: StainModel, io: float = 240.0) -> None:
        scale = target.max_concentrations / source.max_concentrations
        # OD_out = M @ OD_in: unmix with the source stains, rescale, remix with the target stains.
        matrix = target.stain_matrix @ np.diag(scale) @ np.linalg.pinv(source.stain_matrix)
        # exponents[j, v, i] = -M_ij * OD(v): contribution of input channel j at grey level v to output i.
        exponents = -_od_table(io)[None, :, None] * matrix.T[:, None, :]
        self.io = float(io)
        self.matrix = matrix
        # Product path when no single factor can overflow; else sum exponents and exp once (rare:
        # only a near-degenerate source gives |M_ij| > ~7).
        self._use_product = bool(np.abs(exponents).max() <= _MAX_FACTOR_EXPONENT)
        if self._use_product:
            tables = np.exp(exponents)
            tables[0] *= io  # fold the light intensity into the red-channel table
        else:
            tables = exponents.copy()
            tables[0] += math.log(io)  # io * exp(x) = exp(x + log io): one exp, no overflowing multiply
        self._tables = tuple(np.ascontiguousarray(t, dtype=np.float32) for t in tables)

    def __call__(self, tile: RGBImage) -> RGBImage:
        """Normalize ``tile``: uint8 (H, W, 3) RGB -> uint8 (H, W, 3) RGB (rounded, clipped to [0, 255])."""
        flat = _as_pixels(tile, "normalize_tile")
        t_r, t_g, t_b = self._tables
        # np.take on uint8 indices is a fast L1-resident gather of (N, 3) float32 rows.
        out = np.take(t_r, flat[:, 0], axis=0)
        if self._use_product:
            out *= np.take(t_g, flat[:, 1], axis=0)
            out *= np.take(t_b, flat[:, 2], axis=0)
        else:
            out += np.take(t_g, flat[:, 1], axis=0)
            out += np.take(t_b, flat[:, 2], axis=0)
            with np.errstate(over="ignore"):  # exp overflow -> inf -> clipped to 255 below
                np.exp(out, out=out)
        np.clip(out, 0.0, 255.0, out=out)  # inf -> 255; values are products/exps of finite numbers, never NaN
        np.rint(out, out=out)
        return out.astype(np.uint8).reshape(np.shape(tile))


def normalize_tile(tile: RGBImage, source: StainModel, target: StainModel, io: float = 240.0) -> RGBImage:
    """Macenko-normalize one tile: uint8 (H, W, 3) RGB with ``source`` stains -> uint8 (H, W, 3) with ``target``'s.

    For many tiles build a ``TileNormalizer`` once instead (same result, no per-call setup).
    """
    return TileNormalizer(source, target, io)(tile)


def _tissue_mask(pixels: npt.NDArray[np.uint8], params: MacenkoParams) -> npt.NDArray[np.bool_]:
    # Same rule as the fit: every OD channel >= beta <=> every channel value <= io * exp(-beta) - 1.
    od = _od_table(params.io)
    allowed = od >= params.beta  # (256,) bool, monotone in the grey level
    return allowed[pixels].all(axis=1)


def _sample_level(store: FragmentStore, level: int, params: MacenkoParams, seed: int) -> npt.NDArray[np.uint8]:
    """Uniform sample (without replacement) of at most max_samples tissue pixels of one level.

    Bottom-k sampling: every tissue pixel gets a uniform random key and the k smallest keys are
    kept, so memory stays at k + one window however large the slide.
    """
    rng = np.random.default_rng(seed)
    k = int(params.max_samples)
    kept = np.empty((0, 3), dtype=np.uint8)
    keys = np.empty(0, dtype=np.float64)
    threshold = np.inf
    for fragment in store.fragments:
        ds = store.level(fragment, level)
        for y, x, h, w in iter_windows(ds.shape[0], ds.shape[1], CHUNK):
            window = ds[y : y + h, x : x + w].reshape(-1, 3)
            tissue = window[_tissue_mask(window, params)]
            new_keys = rng.random(len(tissue))
            below = new_keys < threshold
            kept = np.concatenate([kept, tissue[below]])
            keys = np.concatenate([keys, new_keys[below]])
            if len(keys) > k:
                order = np.argpartition(keys, k - 1)[:k]
                kept, keys = kept[order], keys[order]
                threshold = keys.max()
    return kept


def sample_tissue_pixels(fragment_store: FragmentStore, params: MacenkoParams, seed: int) -> npt.NDArray[np.uint8]:
    """uint8 (N, 3): at most ``params.max_samples`` tissue RGB pixels sampled uniformly over all fragments.

    Tissue = every OD channel >= beta (the fitting rule). Reads level 2 (1/4) window by window;
    when level 2 holds fewer than ``MIN_TISSUE_PIXELS`` tissue pixels (a tiny slide), moves on to
    level 1, then level 0. Deterministic for a given ``seed``.
    """
    pixels = np.empty((0, 3), dtype=np.uint8)
    for level in range(len(DOWNSAMPLES) - 1, -1, -1):
        pixels = _sample_level(fragment_store, level, params, seed)
        if len(pixels) >= MIN_TISSUE_PIXELS:
            break
    logger.info("%s: sampled %d tissue pixels at level %d", fragment_store.path, len(pixels), level)
    return pixels


def normalize_fragment_store(
    raw_store: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    params: MacenkoParams,
    seed: int = 0,
) -> StainModel:
    """Macenko-normalize every fragment at every level of ``raw_store`` into a new store at ``out_path``.

    Fits one stain model per slide on sampled tissue pixels, then maps each chunk-aligned window to
    the reference stains. The output has ``stain="macenko"`` and the attrs ``stain_matrix`` (3, 2),
    ``max_concentrations`` (2,) of the fitted source model, ``reference_stain_matrix``,
    ``reference_max_concentrations`` and ``macenko_io/alpha/beta``. Returns the fitted source model.
    """
    target = load_reference(params.reference)
    with FragmentStore(raw_store) as store:
        if store.stain != "raw":
            raise StainError(f"{raw_store}: has stain={store.stain!r}; Macenko normalization needs a stain='raw' store")
        if not store.fragments:
            raise StainError(f"{raw_store}: holds no fragments; rerun extract_fragments (it should have found tissue)")
        pixels = sample_tissue_pixels(store, params, seed)
        source = fit_macenko(pixels, params, name=f"{raw_store} (slide {store.slide})")
        normalizer = TileNormalizer(source, target, params.io)
        jobs = [(fragment, level) for fragment in store.fragments for level in range(len(DOWNSAMPLES))]
        attrs = {
            "stain_matrix": source.stain_matrix,
            "max_concentrations": source.max_concentrations,
            "reference_stain_matrix": target.stain_matrix,
            "reference_max_concentrations": target.max_concentrations,
            "macenko_io": params.io,
            "macenko_alpha": params.alpha,
            "macenko_beta": params.beta,
        }
        writer = FragmentStoreWriter(
            out_path,
            slide=store.slide,
            source=store.source,
            stain="macenko",
            slide_size=store.slide_size,
            geometry=store.geometry,
        )
        with writer as w:
            w.attrs.update(attrs)
            for fragment, level in progress(jobs, desc=f"macenko {store.slide}"):
                src = store.level(fragment, level)
                dst = w.create_level(fragment, level)
                for y, x, h, wd in iter_windows(src.shape[0], src.shape[1], CHUNK):
                    dst[y : y + h, x : x + wd] = normalizer(src[y : y + h, x : x + wd])
    return source
