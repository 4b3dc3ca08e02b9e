"""Simulated annotators: which nuclei an annotation set holds, with which labels and contours.

Two kinds of annotator label the SSA and WSA sets. ``flips`` moves a fixed fraction of labels to
another class uniformly at random (errors no classifier inherits, since averaging removes them).
``rules`` is a weak classifier, the way a parametric QuPath classifier errs: it measures each
nucleus on the annotator's own contour (area, elongation, circularity, mean hematoxylin OD after
colour deconvolution with the reference stain vectors, chromatin texture) and applies a short
decision list of deliberately mis-set thresholds, so its errors are systematic: by size, shape and
by the slide's stain strength and hue. A ``random_share`` of its labels then moves to a random other
class: a trained QuPath classifier's errors are part systematic, part noise, and only the noise is
what a network trained on the labels averages away.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cellkd.classes import ClassSpec
from cellkd.synthetic.layout import Nuclei
from cellkd.synthetic.render import MEAN_TISSUE_EOSIN, REFERENCE_STAIN_MATRIX, TEXTURE_AFTER_BLUR
from cellkd.synthetic.spec import EOSIN_KEPT_IN_NUCLEUS, RULE_FEATURES, SyntheticSlideParams, WeakRule

MEASUREMENT_NOISE = 0.05
"""Relative per-nucleus noise of the stain measurements (pixel sampling, out-of-focus light)."""


@dataclass(frozen=True)
class Stain:
    """A slide's stain: (2, 3) unit H and E optical-density rows and (2,) concentration scales."""

    matrix: npt.NDArray[np.float64]
    scales: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Annotation:
    """One simulated annotation set: the nuclei it holds (ascending indices), their labels and contours.

    ``centres`` are points each contour is star-shaped around. ``features`` holds the measured features
    (``RULE_FEATURES``) of the kept nuclei where the annotator measured them (the ``rules`` annotator), else None.
    """

    kept: npt.NDArray[np.intp]
    labels: npt.NDArray[np.int64]
    rings: npt.NDArray[np.float64]
    centres: npt.NDArray[np.float64]  # (N, 2): each ring is star-shaped around its centre
    features: Mapping[str, npt.NDArray[np.float64]] | None = None


def uuids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` random version-4 UUID strings drawn from ``rng`` (QuPath object ids)."""
    return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


def jitter_rings(
    rng: np.random.Generator, rings: npt.NDArray[np.float64], centres: npt.NDArray[np.float64], jitter: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Move contour vertices by ``jitter`` px RMS: a smooth radial wobble plus a shift of the whole contour.

    Radial moves keep each contour star-shaped around its (shifted) centre, so polygons stay valid.
    Returns the moved rings and those shifted centres.
    """
    if jitter == 0 or len(rings) == 0:
        return rings, centres
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
    return (centres[:, None, :] + offset * scale[..., None] + shift).round(2), centres + shift[:, 0]


def kept_selection(rng: np.random.Generator, n: int, miss: float) -> npt.NDArray[np.intp]:
    """Ascending indices of the nuclei an annotator keeps after missing round(miss * n) of ``n`` at random."""
    missed = rng.choice(n, size=round(miss * n), replace=False)
    return np.setdiff1d(np.arange(n), missed)


def noisy_selection(
    rng: np.random.Generator, labels: npt.NDArray[np.int64], n_classes: int, miss: float, flip: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    """Drop round(miss * N) nuclei, then move round(flip * kept) labels to another class uniformly.

    Returns the kept indices (ascending) and their (possibly flipped) labels.
    """
    kept = kept_selection(rng, len(labels), miss)
    return kept, flip_labels(rng, labels[kept], n_classes, flip)


def flip_labels(
    rng: np.random.Generator, labels: npt.NDArray[np.int64], n_classes: int, share: float
) -> npt.NDArray[np.int64]:
    """A copy of ``labels`` with round(share * N) of them, chosen at random, each moved to another class uniformly."""
    flipped_labels = labels.copy()
    flipped = rng.choice(len(labels), size=round(share * len(labels)), replace=False)
    if flipped.size and n_classes > 1:
        flipped_labels[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=flipped.size)) % n_classes
    return flipped_labels


def polygon_moments(
    rings: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Area (px²), perimeter (px) and the two principal second moments (px², descending) of open (N, K, 2) rings.

    Exact polygon integrals (Green's theorem), taken about each ring's vertex mean for precision at
    large slide coordinates; the moments are central (about the polygon centroid), per unit area.
    """
    local = rings - rings.mean(axis=1, keepdims=True)
    x, y = local[..., 0], local[..., 1]
    x1, y1 = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    cross = x * y1 - x1 * y
    signed = cross.sum(axis=1) / 2
    area = np.abs(signed)
    safe = np.where(signed == 0, 1.0, signed)
    cx = ((x + x1) * cross).sum(axis=1) / (6 * safe)
    cy = ((y + y1) * cross).sum(axis=1) / (6 * safe)
    xx = ((x * x + x * x1 + x1 * x1) * cross).sum(axis=1) / (12 * safe) - cx * cx
    yy = ((y * y + y * y1 + y1 * y1) * cross).sum(axis=1) / (12 * safe) - cy * cy
    xy = ((x * y1 + 2 * x * y + 2 * x1 * y1 + x1 * y) * cross).sum(axis=1) / (24 * safe) - cx * cy
    half_trace, spread = (xx + yy) / 2, np.sqrt(((xx - yy) / 2) ** 2 + xy**2)
    perimeter = np.hypot(x1 - x, y1 - y).sum(axis=1)
    return area, perimeter, np.stack([half_trace + spread, np.maximum(half_trace - spread, 1e-12)], axis=1)


def deconvolved(concentrations: npt.NDArray[np.floating], stain: Stain) -> npt.NDArray[np.float64]:
    """(N, 2) H and E amounts as colour deconvolution with the *reference* vectors reads true (N, 2) ones.

    The slide's real vectors and strengths differ from the reference, so the reading is off by a per-slide
    factor, and each stain leaks into the other: the stain bias a fixed threshold inherits.
    """
    reference = REFERENCE_STAIN_MATRIX / np.linalg.norm(REFERENCE_STAIN_MATRIX, axis=1, keepdims=True)
    optical_density = np.asarray(concentrations, np.float64) * stain.scales @ stain.matrix
    return optical_density @ np.linalg.pinv(reference)


def measured_hematoxylin(concentration: npt.NDArray[np.floating], stain: Stain) -> npt.NDArray[np.float64]:
    """Mean hematoxylin OD read inside nuclei of true hematoxylin ``concentration`` (with their eosin)."""
    eosin = np.full(len(concentration), EOSIN_KEPT_IN_NUCLEUS * MEAN_TISSUE_EOSIN)
    return deconvolved(np.stack([np.asarray(concentration, np.float64), eosin], axis=1), stain)[:, 0]


def measure_nuclei(
    rng: np.random.Generator,
    rings: npt.NDArray[np.float64],
    concentration: npt.NDArray[np.floating],
    chromatin: npt.NDArray[np.floating],
    stain: Stain,
    mpp: float,
) -> dict[str, npt.NDArray[np.float64]]:
    """The ``RULE_FEATURES`` of nuclei with contours ``rings`` (N, K, 2), as an annotator's software measures them.

    Shape comes from the given (possibly jittered) contours; stain readings from the nuclei's true
    concentrations through ``measured_hematoxylin``, with ``MEASUREMENT_NOISE`` relative noise.
    """
    area, perimeter, moments = polygon_moments(rings)
    hematoxylin = measured_hematoxylin(concentration, stain)
    noise = 1 + MEASUREMENT_NOISE * rng.standard_normal((2, len(rings)))
    texture = hematoxylin * np.asarray(chromatin, np.float64) * 0.5 * TEXTURE_AFTER_BLUR
    features = {
        "area_um2": area * mpp * mpp,
        "elongation": np.sqrt(moments[:, 0] / moments[:, 1]),
        "circularity": np.clip(4 * math.pi * area / np.maximum(perimeter, 1e-9) ** 2, 0, 1),
        "hematoxylin": hematoxylin * noise[0],
        "texture": texture * noise[1],
    }
    assert tuple(features) == RULE_FEATURES
    return features


def rule_labels(
    features: Mapping[str, npt.NDArray[np.float64]], rules: Sequence[WeakRule], classes: Sequence[ClassSpec]
) -> npt.NDArray[np.int64]:
    """Class index per nucleus: the class of the first rule whose bounds all hold (bounds are inclusive).

    ``rules`` must end with a catch-all (no bounds), so every nucleus gets a class.
    """
    index = {spec.name: i for i, spec in enumerate(classes)}
    n = len(next(iter(features.values())))
    labels = np.full(n, -1, np.int64)
    for rule in rules:
        match = labels < 0
        for name, bound in rule.minimum:
            match &= features[name] >= bound
        for name, bound in rule.maximum:
            match &= features[name] <= bound
        labels[match] = index[rule.class_name]
    if (labels < 0).any():
        raise ValueError(f"rules {rules} leave {(labels < 0).sum()} nuclei unlabelled; end them with a catch-all")
    return labels


def weak_annotation(
    rng: np.random.Generator,
    nuclei: Nuclei,
    params: SyntheticSlideParams,
    set_name: str,
    classes: Sequence[ClassSpec],
    stain: Stain,
) -> Annotation:
    """The ``ssa`` or ``wsa`` set: ``params.annotator`` labels, ``{set}_miss`` nuclei left out, contours jittered.

    Under ``rules``, ``{set}_random_share`` of the rule labels then move to another class at random (drawn last
    from ``rng``, so share 0 leaves the pure rule labels and every other draw unchanged).
    """
    miss, flip, jitter, random_share = (
        getattr(params, f"{set_name}_{k}") for k in ("miss", "flip", "jitter_px", "random_share")
    )
    if params.annotator == "flips":
        kept, labels = noisy_selection(rng, nuclei.labels, len(classes), miss, flip)
        rings, centres = jitter_rings(rng, nuclei.rings[kept], nuclei.centres[kept], jitter)
        return Annotation(kept, labels, rings, centres)
    kept = kept_selection(rng, len(nuclei.labels), miss)
    rings, centres = jitter_rings(rng, nuclei.rings[kept], nuclei.centres[kept], jitter)
    features = measure_nuclei(rng, rings, nuclei.concentration[kept], nuclei.chromatin[kept], stain, params.mpp)
    labels = flip_labels(
        rng, rule_labels(features, getattr(params, f"{set_name}_rules"), classes), len(classes), random_share
    )
    return Annotation(kept, labels, rings, centres, features)


def expert_annotation(rng: np.random.Generator, nuclei: Nuclei, params: SyntheticSlideParams) -> Annotation:
    """The ``ea`` set: true labels on ``ea_count`` random nuclei (fewer if the slide has fewer), barely jittered."""
    kept = np.sort(rng.choice(len(nuclei.labels), size=min(params.ea_count, len(nuclei.labels)), replace=False))
    rings, centres = jitter_rings(rng, nuclei.rings[kept], nuclei.centres[kept], params.ea_jitter_px)
    return Annotation(kept, nuclei.labels[kept], rings, centres)
