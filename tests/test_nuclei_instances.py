"""Shape-aware splitting of touching nuclei (cellkd.nuclei.instances), scored against known outlines.

Masks are rasterized from known polygons (``rasterio.features.rasterize``, the pipeline's rule), the
instances vectorized by the nuclei store's outline code, and both compared with
``cellkd.metrics.instance_counts``, so each test reads as the instance table would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.affinity
from rasterio.features import rasterize
from scipy import ndimage

from cellkd.annotations.qupath import read_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES
from cellkd.errors import ConfigError
from cellkd.metrics import InstanceCounts, instance_counts, instance_counts_by_class
from cellkd.nuclei import NucleiParams, find_instances
from cellkd.nuclei.crops import instance_outlines
from cellkd.nuclei.instances import _waist_depth, instance_stats
from cellkd.synthetic import SyntheticSlideParams, generate_slide

SHAPE = (380, 500)
"""(H, W) of the mask that holds both layouts: ellipses in the top rows, disc pairs below."""
MARKERS_ONLY = NucleiParams(split_waist=0.5)
"""The rule before the waist test: every staircase counts as a waist, so any two h-maxima split."""


def ellipse(cx: float, cy: float, semi_major: float, semi_minor: float, degrees: float) -> shapely.Polygon:
    return shapely.affinity.rotate(
        shapely.affinity.scale(shapely.Point(cx, cy).buffer(1, 32), semi_major, semi_minor), degrees
    )


def muscle_like_ellipses() -> list[shapely.Polygon]:
    """27 elongated nuclei: aspect 3, 4, 5 x semi-minor 2.5, 3.5, 4.5 px x three angles, 55 px apart."""
    shapes = [(aspect, minor) for aspect in (3, 4, 5) for minor in (2.5, 3.5, 4.5)]
    return [
        ellipse(30 + 55 * i, 30 + 55 * j, aspect * minor, minor, degrees + 7 * i)
        for i, (aspect, minor) in enumerate(shapes)
        for j, degrees in enumerate((0, 35, 70))
    ]


def touching_disc_pairs() -> list[shapely.Polygon]:
    """12 pairs of discs (radius 5-8 px) whose centres lie 1.7-1.9 radii apart: one blob with a neck each.

    Closer pairs of small discs rasterize without a notch (radius 5, 1.6 radii: a rounded box), so
    nothing in the mask says they are two.
    """
    discs = []
    for i, radius in enumerate((5, 6, 7, 8)):
        for j, spacing in enumerate((1.7, 1.8, 1.9)):
            angle = np.deg2rad(25 * j + 10 * i)
            half = spacing * radius / 2
            cx, cy = 40 + 50 * j, 200 + 50 * i
            for sign in (-1, 1):
                centre = shapely.Point(cx + sign * half * np.cos(angle), cy + sign * half * np.sin(angle))
                discs.append(centre.buffer(radius, 32))
    return discs


def instance_polygons(mask: np.ndarray, params: NucleiParams) -> np.ndarray:
    """Outlines of ``find_instances(mask)`` as the nuclei store writes them (level 0, one fragment at 0, 0)."""
    labels = find_instances(mask, params)
    n = int(labels.max())
    return instance_outlines(labels, instance_stats(labels, n), (0.0, 0.0), 1)


def scored(params: NucleiParams) -> tuple[InstanceCounts, InstanceCounts]:
    """Instance counts of the ellipses and of the disc pairs, found together in one mask."""
    ellipses, pairs = muscle_like_ellipses(), touching_disc_pairs()
    mask = rasterize([*ellipses, *pairs], out_shape=SHAPE, dtype=np.uint8)
    predicted = instance_polygons(mask, params)
    return instance_counts(predicted, ellipses), instance_counts(predicted, pairs)


def test_the_synthetic_layout_holds_one_blob_per_ellipse_and_per_pair() -> None:
    mask = rasterize([*muscle_like_ellipses(), *touching_disc_pairs()], out_shape=SHAPE, dtype=np.uint8)
    assert ndimage.label(mask, structure=np.ones((3, 3)))[1] == 27 + 12


def test_elongated_nuclei_stay_whole_and_touching_pairs_are_split() -> None:
    ellipses, pairs = scored(NucleiParams())
    assert ellipses.metrics()["matched"] == 1.0
    assert ellipses.split == 0
    assert pairs.metrics()["matched"] == 1.0
    assert pairs.merged == 0


def test_markers_alone_over_split_elongated_nuclei_and_no_split_merges_pairs() -> None:
    """The two failure modes the waist test sits between (the metric before the fix)."""
    ellipses, pairs = scored(MARKERS_ONLY)
    assert ellipses.metrics()["split"] > 0.3
    assert pairs.merged == 0
    _, unsplit_pairs = scored(NucleiParams(split_touching=False))
    assert unsplit_pairs.metrics()["merged"] == 1.0


def test_an_elongated_nucleus_touching_a_round_one_loses_only_the_round_one() -> None:
    long = ellipse(50, 30, 20, 4, 10)
    # A disc pressed against the middle of the long side: the cluster has three or more h-maxima.
    round_one = shapely.Point(50 - 4 * np.sin(np.deg2rad(10)) * 2.6, 30 + 4 * np.cos(np.deg2rad(10)) * 2.6).buffer(7)
    mask = rasterize([long, round_one], out_shape=(60, 100), dtype=np.uint8)
    counts = instance_counts(instance_polygons(mask, NucleiParams()), [long, round_one])
    assert counts.predicted == 2
    assert counts.metrics()["matched"] == 1.0


@pytest.mark.parametrize("degrees", [0, 15, 30, 45, 60, 75])
def test_a_convex_outline_has_no_waist_deeper_than_its_pixel_staircase(degrees: float) -> None:
    mask = np.pad(rasterize([ellipse(30, 30, 20, 4, degrees)], out_shape=(60, 60), dtype=np.uint8) > 0, 1)
    assert _waist_depth(mask) <= 1.0


def test_two_discs_with_a_neck_have_a_waist_as_deep_as_the_neck_is_narrow() -> None:
    # Radius 7, centres 11 px apart: the neck is 2 * sqrt(49 - 30.25) = 8.7 px wide, 2.7 px in from each side.
    discs = [shapely.Point(15, 15).buffer(7, 32), shapely.Point(26, 15).buffer(7, 32)]
    mask = np.pad(rasterize(discs, out_shape=(30, 42), dtype=np.uint8) > 0, 1)
    assert 2.0 <= _waist_depth(mask) <= 3.5


def test_split_waist_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="split_waist"):
        NucleiParams(split_waist=0)


def test_on_a_demo_slide_the_muscle_nuclei_stay_whole(tmp_path: Path) -> None:
    """The demo's truth rasterized (a perfect segmentation stand-in): the markers alone cut the muscle nuclei."""
    width, height = 1536, 1024
    truth_path = tmp_path / "s.truth.geojson"
    slide_params = SyntheticSlideParams(width=width, height=height, compression="zlib")
    generate_slide("demo0", tmp_path / "s.tiff", {"truth": truth_path}, slide_params, seed=0)
    truth = read_qupath_geojson(truth_path, DEFAULT_CLASSES)
    outlines, classes = truth.geometry.to_numpy(), truth["class_index"].to_numpy()
    mask = rasterize(outlines, out_shape=(height, width), dtype=np.uint8)
    muscle = [c.name for c in DEFAULT_CLASSES].index("muscle")
    assert (classes == muscle).sum() >= 30

    def muscle_counts(params: NucleiParams) -> InstanceCounts:
        return instance_counts_by_class(instance_polygons(mask, params), outlines, classes, len(DEFAULT_CLASSES))[
            muscle
        ]

    after, before = muscle_counts(NucleiParams()), muscle_counts(MARKERS_ONLY)
    # Measured at 1536x1024 px, seed 0 (51 muscle nuclei): before 0.53 of them split, after none.
    assert after.metrics()["split"] <= 0.01 and after.metrics()["matched"] >= 0.98
    assert before.metrics()["split"] >= 0.1
