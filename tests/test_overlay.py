"""The prediction overlay: predicted nuclei coloured by class over the largest fragment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from matplotlib.image import imread

from cellkd.annotations.qupath import write_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES
from cellkd.errors import AnnotationError
from cellkd.report.overlay import plot_prediction_overlay
from cellkd.store.fragments import Fragment, FragmentStoreWriter

SMALL = Fragment("f000", 0, 0, 200, 160)
LARGE = Fragment("f001", 400, 100, 1000, 700)


@pytest.fixture
def fragment_store(tmp_path: Path) -> Path:
    """Two pink fragments; the larger one is the one drawn."""
    path = tmp_path / "fragments.h5"
    with FragmentStoreWriter(path, slide="s1", source="s1.tiff", stain="raw", mpp=0.5) as writer:
        for fragment in (SMALL, LARGE):
            for level in (0, 1, 2):
                writer.create_level(fragment, level)[...] = (230, 180, 210)
    return path


def disc(x: float, y: float, radius: float = 6) -> shapely.Polygon:
    return shapely.Point(x, y).buffer(radius)


def test_overlay_counts_the_nuclei_of_the_largest_fragment_by_class(fragment_store: Path, tmp_path: Path) -> None:
    # 6 "other" nuclei packed in one corner of the large fragment, 2 "immune" far away, 1 "muscle" in the small one
    shapes = [disc(LARGE.x + 700 + 20 * i, LARGE.y + 500 + 10 * (i % 2)) for i in range(6)]
    shapes += [disc(LARGE.x + 50, LARGE.y + 50), disc(LARGE.x + 80, LARGE.y + 60), disc(SMALL.x + 50, SMALL.y + 50)]
    classes = [0] * 6 + [1, 1, 2]
    predictions = tmp_path / "s1.geojson"
    write_qupath_geojson(predictions, shapes, classes, DEFAULT_CLASSES)

    png = tmp_path / "overlay.png"
    counts = plot_prediction_overlay(fragment_store, predictions, DEFAULT_CLASSES, png, window=256)

    assert counts == {"other": 6, "immune": 2, "muscle": 0}
    image = imread(png)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]
    # the densest window (the 6 "other" nuclei) is drawn at full size with outlines in the class's colour
    other = np.array(DEFAULT_CLASSES[0].color) / 255
    near_other = np.abs(image[..., :3] - other).max(axis=-1) < 0.08
    assert near_other.sum() > 200


def test_overlay_of_a_slide_without_predictions_still_draws_the_tissue(fragment_store: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "empty.geojson"
    write_qupath_geojson(predictions, [], np.zeros(0, dtype=np.int64), DEFAULT_CLASSES)
    png = tmp_path / "overlay.png"

    counts = plot_prediction_overlay(fragment_store, predictions, DEFAULT_CLASSES, png)

    assert counts == {"other": 0, "immune": 0, "muscle": 0}
    tissue = np.array([230, 180, 210]) / 255
    assert (np.abs(imread(png)[..., :3] - tissue).max(axis=-1) < 0.02).sum() > 10_000


def test_overlay_rejects_predictions_with_a_class_it_was_not_given(fragment_store: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "s1.geojson"
    write_qupath_geojson(predictions, [disc(LARGE.x + 50, LARGE.y + 50)], [2], DEFAULT_CLASSES)
    with pytest.raises(AnnotationError, match="unknown class"):
        plot_prediction_overlay(fragment_store, predictions, DEFAULT_CLASSES[:2], tmp_path / "overlay.png")
    assert not (tmp_path / "overlay.png").exists()
