"""Tests for cellkd.nuclei: instances from predicted masks, crops, per-set labels, the split and the store."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import h5py
import numpy as np
import pandas as pd
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize
from rasterio.transform import Affine
from scipy import ndimage

from cellkd.annotations import AnnotationOptions, write_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES
from cellkd.errors import AnnotationError, ConfigError, StoreError
from cellkd.nuclei import UNLABELLED, NucleiParams, extract_nuclei, find_instances
from cellkd.nuclei import crops as nuclei_crops
from cellkd.nuclei import instances as nuclei_instances
from cellkd.nuclei import matching as nuclei_matching
from cellkd.store.atomic import atomic_h5
from cellkd.store.compression import is_compressed
from cellkd.store.fragments import Fragment, FragmentStoreWriter, fragment_name
from cellkd.store.nuclei import NucleiStore
from cellkd.store.patches import PatchParams, PatchStore, cut_patches, split_counts
from cellkd.types import DOWNSAMPLES

CLASSES = DEFAULT_CLASSES  # other 0, immune 1, muscle 2; background 3
BACKGROUND = len(CLASSES)
OTHER, IMMUNE, MUSCLE = 0, 1, 2


# --------------------------------------------------------------------------- helpers


def coordinate_image(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3): red = column, green = row (mod 256), blue = 255, so zero padding is (0, 0, 0)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, rows % 256, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


def disc(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    """bool (H, W): pixels whose index (row, col) lies within ``radius`` of (cy, cx)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2


def write_fragment_store(path: Path, fragments: Sequence[Fragment], slide: str = "s1") -> Path:
    """Fragment store whose every level image is ``coordinate_image`` of that level's (H_k, W_k)."""
    with FragmentStoreWriter(
        path, slide=slide, source=f"{slide}.tiff", stain="raw", mpp=0.5, slide_size=(1000, 500)
    ) as w:
        for fragment in fragments:
            for level in range(len(DOWNSAMPLES)):
                w.create_level(fragment, level)[:] = coordinate_image(*fragment.shape_at(level))
    return path


def write_predicted(
    path: Path, fragments: Sequence[Fragment], masks: Mapping[str, np.ndarray], level: int = 0, slide: str = "s1"
) -> Path:
    """Predicted mask store (layout of ``segment_fragment_store``) with ``masks[name]`` at ``level``."""
    with atomic_h5(path) as h5:
        h5.attrs.update({"slide": slide, "stain": "raw", "level": level})
        for fragment in fragments:
            group = h5.require_group(f"fragments/{fragment.name}")
            group.attrs.update({"x": fragment.x, "y": fragment.y, "width": fragment.width, "height": fragment.height})
            group[f"level{level}"] = masks[fragment.name].astype(np.uint8)
    return path


def write_geojson(path: Path, boxes: Sequence[tuple[float, float, float, float]], labels: Sequence[int]) -> Path:
    """QuPath GeoJSON of axis-aligned nuclei ``boxes`` (x0, y0, x1, y1, level-0 slide px) with classes ``labels``."""
    write_qupath_geojson(path, [shapely.box(*b) for b in boxes], np.asarray(labels, dtype=np.int64), CLASSES)
    return path


F0 = Fragment(fragment_name(0), 100, 50, 64, 48)
"""Fragment f000: level-0 box x 100..164, y 50..98."""
F1 = Fragment(fragment_name(1), 300, 50, 40, 40)
"""Fragment f001: level-0 box x 300..340, y 50..90."""


@pytest.fixture
def slide(tmp_path: Path) -> dict[str, Path]:
    """Slide s1 with fragments F0, F1 and four predicted nuclei (all squares, fragment px rows x cols):

    - A: f000 rows 20..25, cols 20..25 (6x6); ssa: immune (exact box), ea: muscle (exact box)
    - B: f000 rows 30..35, cols 40..45 (6x6); in no annotation -> ssa background, ea -1
    - C: f000 rows 0..3, cols 0..3 (4x4) at the fragment corner; ssa: other
    - D: f001 rows 10..13, cols 20..23 (4x4); ssa: muscle; plus a 2x2 speck at rows 30..31 (dropped)
    """
    m0 = np.zeros((48, 64), dtype=np.uint8)
    m0[20:26, 20:26] = 1
    m0[30:36, 40:46] = 1
    m0[0:4, 0:4] = 1
    m1 = np.zeros((40, 40), dtype=np.uint8)
    m1[10:14, 20:24] = 1
    m1[30:32, 30:32] = 1
    ssa_boxes = [(120, 70, 126, 76), (100, 50, 104, 54), (320, 60, 324, 64)]
    return {
        "fragments": write_fragment_store(tmp_path / "s1.frag.h5", [F0, F1]),
        "predicted": write_predicted(tmp_path / "s1.pred.h5", [F0, F1], {F0.name: m0, F1.name: m1}),
        "ssa": write_geojson(tmp_path / "s1.ssa.geojson", ssa_boxes, [IMMUNE, OTHER, MUSCLE]),
        "ea": write_geojson(tmp_path / "s1.ea.geojson", [(120, 70, 126, 76)], [MUSCLE]),
        "out": tmp_path / "nuclei" / "s1.h5",
    }


def extract(slide: dict[str, Path], params: NucleiParams | None = None, sets: Sequence[str] = ("ssa", "ea")) -> int:
    return extract_nuclei(
        slide["predicted"], slide["fragments"], {s: slide[s] for s in sets}, CLASSES, slide["out"], params
    )


def reference_crop(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """Pixel by pixel: image[row - size//2 + i, col - size//2 + j], zero outside the image."""
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for i in range(size):
        for j in range(size):
            r, c = row - size // 2 + i, col - size // 2 + j
            if 0 <= r < image.shape[0] and 0 <= c < image.shape[1]:
                out[i, j] = image[r, c]
    return out


# --------------------------------------------------------------------------- instances


def test_find_instances_splits_touching_discs_only_when_asked() -> None:
    mask = disc((40, 50), 20, 16, 7) | disc((40, 50), 20, 29, 7)  # centres 13 px apart: one blob with a waist
    assert ndimage.label(mask)[1] == 1
    split = find_instances(mask, NucleiParams(split_touching=True))
    merged = find_instances(mask, NucleiParams(split_touching=False))
    assert split.dtype == np.int32
    assert split.max() == 2
    assert merged.max() == 1
    assert np.array_equal(split > 0, mask)
    # Each part holds one disc centre, and the cut runs between them.
    assert split[20, 16] != split[20, 29]
    areas = np.bincount(split.ravel())[1:]
    assert abs(int(areas[0]) - int(areas[1])) <= 0.05 * mask.sum()


def test_find_instances_keeps_a_single_elongated_nucleus_whole() -> None:
    rows, cols = np.mgrid[0:30, 0:60]
    ellipse = ((rows - 15) / 5) ** 2 + ((cols - 30) / 20) ** 2 <= 1  # muscle-like nucleus, no waist
    assert find_instances(ellipse, NucleiParams()).max() == 1


def test_find_instances_drops_specks_below_min_area() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:13, 10:13] = 1  # 9 px
    labels = find_instances(mask, NucleiParams(min_area=8))
    assert labels.max() == 1
    assert np.array_equal(labels > 0, np.pad(np.ones((3, 3), bool), ((10, 7), (10, 7))))
    # At downsample 2 a mask pixel is 4 level-0 px: the 2x2 speck is 16 level-0 px and stays.
    assert find_instances(mask, NucleiParams(min_area=8), downsample=2).max() == 2


def test_find_instances_of_an_empty_mask_is_all_background() -> None:
    labels = find_instances(np.zeros((16, 24), dtype=bool))
    assert labels.shape == (16, 24)
    assert labels.max() == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 7)), max_size=6),
    st.booleans(),
    st.integers(1, 20),
)
def test_find_instances_labels_are_consecutive_and_inside_the_mask(
    discs: list[tuple[int, int, int]], split_touching: bool, min_area: int
) -> None:
    mask = np.zeros((32, 32), dtype=bool)
    for cy, cx, r in discs:
        mask |= disc(mask.shape, cy, cx, r)
    labels = find_instances(mask, NucleiParams(split_touching=split_touching, min_area=min_area))
    present = np.unique(labels[labels > 0])
    assert np.array_equal(present, np.arange(1, present.size + 1))
    assert not (labels > 0)[~mask].any()
    assert np.all(np.bincount(labels.ravel())[1:] >= min_area)
    # Splitting never loses pixels: every component large enough to be kept is covered entirely.
    components, n = ndimage.label(mask, structure=np.ones((3, 3)))
    big = np.flatnonzero(np.bincount(components.ravel(), minlength=n + 1)[1:] >= 2 * min_area) + 1
    assert (labels[np.isin(components, big)] > 0).all()


# --------------------------------------------------------------------------- labels


def test_extract_assigns_matched_class_background_for_ssa_and_unlabelled_for_ea(slide: dict[str, Path]) -> None:
    assert extract(slide) == 4
    with NucleiStore(slide["out"]) as store:
        table = store.table()
    # Rows: fragment f000 by centroid (y, x): C (y 52), A (y 73), B (y 83); then f001: D.
    assert table["fragment"].tolist() == ["f000", "f000", "f000", "f001"]
    assert table["label_ssa"].tolist() == [OTHER, IMMUNE, BACKGROUND, MUSCLE]
    assert table["label_ea"].tolist() == [UNLABELLED, MUSCLE, UNLABELLED, UNLABELLED]
    assert UNLABELLED == -1


def test_extract_centroid_in_slide_coordinates_with_bbox_and_area(slide: dict[str, Path]) -> None:
    extract(slide)
    with NucleiStore(slide["out"]) as store:
        row = store.table().iloc[3]  # D: f001 rows 10..13, cols 20..23 -> slide x 320..324, y 60..64
    assert (row["centroid_x"], row["centroid_y"]) == (322.0, 62.0)
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (320, 60, 324, 64)
    assert row["area"] == 16


@pytest.mark.parametrize(
    ("annotation", "iou_label", "centroid_label"),
    [
        # A 30x30 box around the 6x6 nucleus A: contains its centroid, IoU 36/900 < 0.1.
        ((108, 58, 138, 88), BACKGROUND, IMMUNE),
        # The nucleus box shifted 4 px right: IoU 12/60 = 0.2, but the centroid (123, 73) lies outside.
        ((124, 70, 130, 76), IMMUNE, BACKGROUND),
    ],
)
def test_match_by_iou_or_by_centroid(
    slide: dict[str, Path], annotation: tuple[int, int, int, int], iou_label: int, centroid_label: int
) -> None:
    write_geojson(slide["ssa"], [annotation], [IMMUNE])
    labels = {}
    for match in ("iou", "centroid"):
        extract(slide, NucleiParams(match=match), sets=["ssa"])
        with NucleiStore(slide["out"]) as store:
            labels[match] = int(store.labels("ssa")[1])  # row 1 = nucleus A
    assert labels == {"iou": iou_label, "centroid": centroid_label}


def test_min_iou_threshold_decides_the_match(slide: dict[str, Path]) -> None:
    write_geojson(slide["ssa"], [(124, 70, 130, 76)], [IMMUNE])  # IoU 0.2 with nucleus A
    results = []
    for min_iou in (0.19, 0.21):
        extract(slide, NucleiParams(min_iou=min_iou), sets=["ssa"])
        with NucleiStore(slide["out"]) as store:
            results.append(int(store.labels("ssa")[1]))
    assert results == [IMMUNE, BACKGROUND]


@pytest.mark.parametrize("match", ["iou", "centroid"])
def test_overlapping_annotations_later_feature_wins(slide: dict[str, Path], match: str) -> None:
    write_geojson(slide["ssa"], [(120, 70, 126, 76), (120, 70, 126, 76)], [OTHER, MUSCLE])
    extract(slide, NucleiParams(match=match), sets=["ssa"])
    with NucleiStore(slide["out"]) as store:
        assert int(store.labels("ssa")[1]) == MUSCLE


# --------------------------------------------------------------------------- crops


def test_crops_are_centred_on_the_centroid_and_zero_padded_at_every_level(slide: dict[str, Path]) -> None:
    params = NucleiParams(crop_size=12, multiscale_size=8)
    extract(slide, params)
    fragments = {F0.name: F0, F1.name: F1}
    with NucleiStore(slide["out"]) as store:
        table = store.table()
        for level, size in ((0, 12), (1, 8), (2, 8)):
            crops = store.crops(level)[:]
            assert crops.shape == (4, size, size, 3)
            d = DOWNSAMPLES[level]
            for i, row in table.iterrows():
                fragment = fragments[row["fragment"]]
                image = coordinate_image(*fragment.shape_at(level))
                r = int(np.floor((row["centroid_y"] - fragment.y) / d))
                c = int(np.floor((row["centroid_x"] - fragment.x) / d))
                assert np.array_equal(crops[i], reference_crop(image, r, c, size)), (level, i)


def test_crop_of_a_nucleus_at_the_fragment_corner(slide: dict[str, Path]) -> None:
    extract(slide)
    with NucleiStore(slide["out"]) as store:
        crop = store.crops(0)[0]  # C: rows 0..3, cols 0..3 -> centroid (2.0, 2.0) in fragment px
        level1 = store.crops(1)[0]
    # Pixel (2, 2) sits at crop index 16: red = column, green = row, blue = 255 inside the fragment.
    assert tuple(crop[16, 16]) == (2, 2, 255)
    assert tuple(crop[14, 14]) == (0, 0, 255)  # the fragment's corner pixel
    assert not crop[:14].any() and not crop[:, :14].any()  # zero above and left of the fragment
    assert (crop[14:, 14:, 2] == 255).all()
    # Level 1 (16x16): centroid / 2 = (1.0, 1.0) -> level-1 pixel (1, 1) at index 8.
    assert tuple(level1[8, 8]) == (1, 1, 255)
    assert not level1[:7].any() and (level1[7:, 7:, 2] == 255).all()


def test_multiscale_crops_centred_at_centroid_over_2_and_4(slide: dict[str, Path]) -> None:
    extract(slide)
    with NucleiStore(slide["out"]) as store:
        # A: rows/cols 20..25 -> centroid 23.0 in fragment px; level 1: 11.5 -> pixel 11; level 2: 5.75 -> 5.
        centres = [tuple(store.crops(level)[1][size // 2, size // 2]) for level, size in ((0, 32), (1, 16), (2, 16))]
    assert centres == [(23, 23, 255), (11, 11, 255), (5, 5, 255)]


def test_masks_segmented_at_level_1_give_level_0_geometry(tmp_path: Path) -> None:
    fragment = Fragment("f000", 40, 20, 32, 32)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[5:7, 7:9] = 1  # 2x2 level-1 px = 4x4 level-0 px: x 54..58, y 30..34
    paths = {
        "fragments": write_fragment_store(tmp_path / "f.h5", [fragment]),
        "predicted": write_predicted(tmp_path / "p.h5", [fragment], {"f000": mask}, level=1),
    }
    assert extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp_path / "n.h5") == 1
    with NucleiStore(tmp_path / "n.h5") as store:
        row = store.table().iloc[0]
        assert store.label_sets == []
        (outline,) = store.geometries()
    assert (row["centroid_x"], row["centroid_y"], row["area"]) == (56.0, 32.0, 16)
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (54, 30, 58, 34)
    assert outline.area == 16.0 and outline.bounds == (54.0, 30.0, 58.0, 34.0)
    assert outline.equals(shapely.box(54, 30, 58, 34))


# --------------------------------------------------------------------------- outlines


def test_outlines_of_square_instances_are_their_boxes_in_slide_coordinates(slide: dict[str, Path]) -> None:
    extract(slide)
    with NucleiStore(slide["out"]) as store:
        outlines = store.geometries()
        areas = store.table()["area"].tolist()
    # Rows C, A, B (f000 at x 100, y 50) and D (f001 at x 300, y 50); fragment px rows x cols -> slide boxes.
    expected = [(100, 50, 104, 54), (120, 70, 126, 76), (140, 80, 146, 86), (320, 60, 324, 64)]
    assert [g.geom_type for g in outlines] == ["Polygon"] * 4
    assert [g.bounds for g in outlines] == [tuple(float(v) for v in box) for box in expected]
    assert [g.area for g in outlines] == [float(a) for a in areas] == [16.0, 36.0, 36.0, 16.0]
    assert all(g.equals(shapely.box(*box)) for g, box in zip(outlines, expected, strict=True))
    assert all(len(g.exterior.coords) == 5 for g in outlines)  # the corners only: collinear points merged


@pytest.mark.parametrize("band_rows", [None, 5])
def test_outline_rows_follow_the_centroid_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, band_rows: int | None
) -> None:
    """Discs of different radii in one fragment: each row's outline has that row's centroid and area.

    With 5-row bands every disc spans several bands, so each must still be traced whole, exactly once.
    """
    if band_rows is not None:
        for module in (nuclei_instances, nuclei_matching, nuclei_crops):
            monkeypatch.setattr(module, "BAND_PIXELS", band_rows * 64)
    fragment = Fragment("f000", 30, 20, 64, 64)
    mask = np.zeros((64, 64), dtype=bool)
    for cy, cx, radius in ((50, 10, 5.5), (12, 40, 3.2), (30, 30, 6.8), (12, 12, 4.1), (52, 45, 2.5)):
        mask |= disc(mask.shape, cy, cx, radius)
    paths = {
        "fragments": write_fragment_store(tmp_path / "f.h5", [fragment]),
        "predicted": write_predicted(tmp_path / "p.h5", [fragment], {"f000": mask}),
    }
    assert extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp_path / "n.h5") == 5
    with NucleiStore(tmp_path / "n.h5") as store:
        table = store.table()
        outlines = np.asarray(store.geometries(), dtype=object)
    centroids = shapely.centroid(outlines)
    # The centroid of a union of unit squares is the mean of their centres: the stored pixel centroid.
    np.testing.assert_allclose(shapely.get_x(centroids), table["centroid_x"], atol=1e-4)
    np.testing.assert_allclose(shapely.get_y(centroids), table["centroid_y"], atol=1e-4)
    np.testing.assert_array_equal(shapely.area(outlines), table["area"])
    assert table["area"].nunique() == 5  # distinct areas: a row mix-up could not go unnoticed


def test_outline_keeps_holes_and_splits_diagonal_touches_keeping_the_largest_piece(tmp_path: Path) -> None:
    """A ring (8x8 with a 2x2 hole) and two squares (4x4 and 3x3) touching at one corner."""
    fragment = Fragment("f000", 10, 20, 48, 32)
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[2:10, 2:10] = 1
    mask[5:7, 5:7] = 0  # the hole
    mask[20:24, 20:24] = 1
    mask[24:27, 24:27] = 1  # meets the 4x4 square only diagonally, at pixel corner (24, 24)
    paths = {
        "fragments": write_fragment_store(tmp_path / "f.h5", [fragment]),
        "predicted": write_predicted(tmp_path / "p.h5", [fragment], {"f000": mask}),
    }
    params = NucleiParams(split_touching=False)  # keep the pinched pair one instance
    extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp_path / "n.h5", params)
    with NucleiStore(tmp_path / "n.h5") as store:
        ring, pair = store.geometries()
        areas = store.table()["area"].tolist()
    assert areas == [60, 25]
    assert ring.is_valid and len(ring.interiors) == 1 and ring.area == 60.0
    assert shapely.Polygon(ring.interiors[0]).equals(shapely.box(15, 25, 17, 27))
    # GDAL traces the pair as one self-touching ring; the valid outline is the larger square alone.
    assert pair.is_valid and pair.geom_type == "Polygon"
    assert pair.equals(shapely.box(30, 40, 34, 44))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.integers(0, 19)), min_size=1, max_size=120))
def test_outlines_are_valid_polygons_covering_only_their_instance(pixels: list[tuple[int, int]]) -> None:
    """Random 20x20 masks segmented at level 1: each outline, rasterized back, lies inside its own instance."""
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[tuple(np.array(pixels).T)] = 1
    fragment = Fragment("f000", 6, 4, 40, 40)
    with TemporaryDirectory() as folder:
        tmp = Path(folder)
        paths = {
            "fragments": write_fragment_store(tmp / "f.h5", [fragment]),
            "predicted": write_predicted(tmp / "p.h5", [fragment], {"f000": mask}, level=1),
        }
        n = extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp / "n.h5", NucleiParams(min_area=1))
        with NucleiStore(tmp / "n.h5") as store:
            outlines = store.geometries()
            table = store.table()
    instances = find_instances(mask, NucleiParams(min_area=1), downsample=2)
    assert len(outlines) == n == instances.max()
    for outline, area in zip(outlines, table["area"], strict=True):
        assert outline.geom_type == "Polygon" and outline.is_valid and 0 < outline.area <= area
        covered = rasterize([outline], out_shape=mask.shape, transform=Affine(2, 0, 6, 0, 2, 4)).astype(bool)
        assert covered.sum() * 4 == outline.area  # pixel-aligned: the outline is a union of whole mask pixels
        assert len(np.unique(instances[covered])) == 1 and instances[covered][0] > 0


def test_geometries_of_a_store_without_outlines_raises(slide: dict[str, Path]) -> None:
    extract(slide)
    with h5py.File(slide["out"], "a") as h5:
        del h5["geometry"]
    with NucleiStore(slide["out"]) as store, pytest.raises(StoreError, match="has no outlines.*rerun extract_nuclei"):
        store.geometries()


# --------------------------------------------------------------------------- split


@pytest.fixture
def many_nuclei(tmp_path: Path) -> dict[str, Path]:
    """Slide s1 with 6 fragments of 48x48 px, each holding a 4x4 grid of 16 separate 4x4 nuclei (96 in all)."""
    fragments = [Fragment(fragment_name(i), 60 * i, 0, 48, 48) for i in range(6)]
    mask = np.zeros((48, 48), dtype=np.uint8)
    for r in range(4):
        for c in range(4):
            mask[2 + 12 * r : 6 + 12 * r, 2 + 12 * c : 6 + 12 * c] = 1
    return {
        "fragments": write_fragment_store(tmp_path / "f.h5", fragments),
        "predicted": write_predicted(tmp_path / "p.h5", fragments, {f.name: mask for f in fragments}),
        "out": tmp_path / "n.h5",
    }


def test_split_by_nucleus_follows_ratios_and_is_deterministic(many_nuclei: dict[str, Path]) -> None:
    splits = []
    for seed in (0, 0, 1):
        assert extract(many_nuclei, NucleiParams(seed=seed), sets=()) == 96
        with NucleiStore(many_nuclei["out"]) as store:
            splits.append(store.split)
            assert np.array_equal(store.split_indices("test"), np.flatnonzero(store.split == 2))
    assert tuple(np.bincount(splits[0], minlength=3)) == split_counts(96, (0.70, 0.15, 0.15))
    assert np.array_equal(splits[0], splits[1])
    assert not np.array_equal(splits[0], splits[2])


def test_split_by_fragment_puts_whole_fragments_in_one_split(many_nuclei: dict[str, Path]) -> None:
    extract(many_nuclei, NucleiParams(split_by="fragment"), sets=())
    with NucleiStore(many_nuclei["out"]) as store:
        table = store.table()
    per_fragment = table.groupby("fragment")["split"].nunique()
    assert (per_fragment == 1).all()
    codes = table.groupby("fragment")["split"].first()
    assert tuple(np.bincount(codes, minlength=3)) == split_counts(6, (0.70, 0.15, 0.15))


# --------------------------------------------------------------------------- store


def test_empty_mask_writes_a_valid_store_with_no_nuclei(tmp_path: Path) -> None:
    empty = np.zeros((48, 64), dtype=np.uint8)
    fragments = write_fragment_store(tmp_path / "f.h5", [F0])
    predicted = write_predicted(tmp_path / "p.h5", [F0], {F0.name: empty})
    ssa = write_geojson(tmp_path / "ssa.geojson", [(120, 70, 126, 76)], [IMMUNE])
    assert extract_nuclei(predicted, fragments, {"ssa": ssa}, CLASSES, tmp_path / "n.h5") == 0
    with NucleiStore(tmp_path / "n.h5") as store:
        assert len(store) == 0
        assert store.crops(0).shape == (0, 32, 32, 3)
        assert store.crops(2).shape == (0, 16, 16, 3)
        assert store.labels("ssa").shape == (0,)
        assert len(store.table()) == 0
        assert store.geometries() == []
    with h5py.File(tmp_path / "n.h5", "r") as h5:
        assert h5["geometry"].shape == (0,)
        assert h5.get("geometry", getclass=True) is h5py.Dataset


def test_store_round_trip(slide: dict[str, Path]) -> None:
    extract(slide, NucleiParams(crop_size=20, multiscale_size=10, match="centroid"))
    with NucleiStore(slide["out"]) as store:
        assert len(store) == 4
        assert store.slide == "s1" and store.stain == "raw"
        assert store.classes == ["other", "immune", "muscle", "background"]
        assert store.label_sets == ["ssa", "ea"]
        assert (store.crop_size, store.multiscale_size) == (20, 10)
        assert store.split_names == ["train", "val", "test"]
        assert store.crops(1).shape == (4, 10, 10, 3) and store.crops(1).dtype == np.uint8
        assert store.labels("ssa").dtype == np.int8
        assert list(store.table().columns) == [
            "fragment", "centroid_x", "centroid_y", "area", "x0", "y0", "x1", "y1", "split", "label_ssa", "label_ea"
        ]  # fmt: skip
        with pytest.raises(StoreError, match="no label set 'wsa'"):
            store.labels("wsa")
        with pytest.raises(StoreError, match="no crops at level 3"):
            store.crops(3)
    with h5py.File(slide["out"], "r") as h5:
        assert h5.attrs["complete"]
        assert h5.attrs["match"] == "centroid"
        assert h5["centroid_x"].dtype == np.float32 and h5["bbox"].dtype == np.int32
        assert h5["crops/level0"].chunks[0] == 1024 and is_compressed(h5["crops/level0"])


def test_no_partial_file_when_extraction_fails(slide: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text("not json", encoding="utf-8")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        extract_nuclei(slide["predicted"], slide["fragments"], {"ssa": bad}, CLASSES, slide["out"])
    assert not slide["out"].parent.exists() or not any(slide["out"].parent.iterdir())


@pytest.mark.parametrize(
    ("predicted_fragments", "message"),
    [
        ([Fragment("f000", 100, 50, 64, 48), Fragment("f001", 300, 52, 40, 40)], "fragment f001 has box"),
        ([Fragment("f000", 100, 50, 64, 48)], r"fragments \['f000'\] do not match"),
    ],
)
def test_predicted_store_not_matching_fragment_store_raises(
    slide: dict[str, Path], tmp_path: Path, predicted_fragments: list[Fragment], message: str
) -> None:
    masks = {f.name: np.zeros((f.height, f.width), dtype=np.uint8) for f in predicted_fragments}
    predicted = write_predicted(tmp_path / "other.pred.h5", predicted_fragments, masks)
    with pytest.raises(StoreError, match=message) as info:
        extract_nuclei(predicted, slide["fragments"], {}, CLASSES, slide["out"])
    assert "other.pred.h5" in str(info.value) and "s1.frag.h5" in str(info.value)
    assert not slide["out"].exists()


def test_predicted_store_of_another_slide_raises(slide: dict[str, Path], tmp_path: Path) -> None:
    masks = {f.name: np.zeros((f.height, f.width), dtype=np.uint8) for f in (F0, F1)}
    predicted = write_predicted(tmp_path / "s2.pred.h5", [F0, F1], masks, slide="s2")
    with pytest.raises(StoreError, match="slide 's2' differs from slide 's1'"):
        extract_nuclei(predicted, slide["fragments"], {}, CLASSES, slide["out"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"match": "area"}, "match='area'"),
        ({"split": (0.5, 0.5, 0.5)}, "split="),
        ({"split_by": "slide"}, "split_by='slide'"),
        ({"min_iou": 0.0}, "min_iou=0.0"),
        ({"crop_size": 1}, "crop_size=1"),
        ({"min_area": 0}, "min_area=0"),
        ({"max_size": 0}, "max_size=0"),
        ({"tile": 8}, "tile=8"),
        ({"area_block": 0}, "area_block=0"),
    ],
)
def test_invalid_params_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NucleiParams(**kwargs)  # type: ignore[arg-type]


def test_missing_predicted_store_raises(slide: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="missing.h5: cannot open the predicted mask store"):
        extract_nuclei(tmp_path / "missing.h5", slide["fragments"], {}, CLASSES, slide["out"])


# --------------------------------------------------------------------------- tiles


def seam_slide(tmp_path: Path, level: int) -> dict[str, Path]:
    """One 192 x 160 fragment of discs (radius 2.5..7, some touching in pairs) on a 16-px grid of offsets,
    so that many lie across the seams of 32-px tiles; ssa polygons on a third of them, points on others."""
    fragment = Fragment("f000", 40, 24, 192, 160)
    d = DOWNSAMPLES[level]
    shape = fragment.shape_at(level)
    rng = np.random.default_rng(7)
    mask = np.zeros(shape, dtype=bool)
    centres: list[tuple[float, float, float]] = []  # level-0 fragment px (row, col, radius)
    for cy in range(12, 160 - 12, 22):
        for cx in range(12, 192 - 12, 22):
            r = float(rng.uniform(2.5, 7.0))
            y, x = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
            centres.append((y, x, r))
            mask |= disc(shape, y / d, x / d, r / d)
    # Two touching discs: a clump the watershed splits (18 level-0 px across, below max_size).
    mask |= disc(shape, 64 / d, 95 / d, 5 / d) | disc(shape, 64 / d, 104 / d, 5 / d)
    shapes = [shapely.box(40 + x - r, 24 + y - r, 40 + x + r, 24 + y + r) for y, x, r in centres[::3]]
    labels = [(OTHER, IMMUNE, MUSCLE)[i % 3] for i in range(len(shapes))]
    # First (so the others overwrite it): a box around the largest disc left of x 60 without its own box, with a
    # 130-px tail, wider than any tile window: IoU 0.07 over the fragment, but above min_iou 0.1 if measured on
    # a window alone (the tail cut at its edge), where the disc would wrongly match.
    y, x, r = max((c for i, c in enumerate(centres) if i % 3 and c[1] < 60), key=lambda c: c[2])
    head = (2 * r + 2) ** 2
    thickness = (np.pi * r**2 / 0.07 - head) / 130
    lollipop = shapely.union(
        shapely.box(40 + x - r - 1, 24 + y - r - 1, 40 + x + r + 1, 24 + y + r + 1),
        shapely.box(40 + x + r + 1, 24 + y - thickness / 2, 40 + x + r + 131, 24 + y + thickness / 2),
    )
    write_qupath_geojson(tmp_path / "ssa.geojson", [lollipop, *shapes], [MUSCLE, *labels], CLASSES)
    points = [shapely.Point(40 + x, 24 + y) for y, x, _ in centres[1::3]] + [shapely.Point(41, 25)]
    write_qupath_geojson(tmp_path / "ea.geojson", points, np.full(len(points), IMMUNE), CLASSES)
    return {
        "fragments": write_fragment_store(tmp_path / "f.h5", [fragment]),
        "predicted": write_predicted(tmp_path / "p.h5", [fragment], {"f000": mask}, level=level),
        "ssa": tmp_path / "ssa.geojson",
        "ea": tmp_path / "ea.geojson",
    }


def store_rows(path: Path) -> tuple[list[tuple[object, ...]], dict[str, np.ndarray]]:
    """Every nucleus as a tuple of its columns, outline WKB and crops, sorted (row order aside)."""
    with NucleiStore(path) as store:
        table = store.table().drop(columns="split")
        outlines = [shapely.normalize(g).wkb for g in store.geometries()]
        crops = [store.crops(level)[:] for level in (0, 1, 2)]
    rows = [
        (*row, outline, *(c[i].tobytes() for c in crops))
        for i, (row, outline) in enumerate(zip(table.itertuples(index=False), outlines, strict=True))
    ]
    return sorted(rows), {"x": table["centroid_x"].to_numpy(), "y": table["centroid_y"].to_numpy()}


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("match", ["iou", "centroid"])
def test_small_tiles_give_the_same_nuclei_as_one_tile(tmp_path: Path, level: int, match: str) -> None:
    """Tiles of 32 (or 16) segmentation px with their halo find the nuclei of one big tile, each once."""
    paths = seam_slide(tmp_path, level)
    results = {}
    for tile in (4096, 32, 16):
        out = tmp_path / f"n{tile}.h5"
        params = NucleiParams(tile=tile, max_size=24, match=match, min_area=4)
        sets = {"ssa": paths["ssa"], "ea": paths["ea"]}
        n = extract_nuclei(paths["predicted"], paths["fragments"], sets, CLASSES, out, params)
        results[tile] = (n, *store_rows(out))
    n, rows, _ = results[4096]
    assert n > 50
    for tile in (32, 16):
        assert results[tile][0] == n
        assert results[tile][1] == rows  # same centroids, areas, boxes, labels, outlines and crops
    # Nuclei across the seams of the 16-px tiles (level-0 px: 16 * downsample) were kept, once.
    seam = 16 * DOWNSAMPLES[level]
    table = pd.DataFrame([r[:8] for r in rows], columns=["f", "cx", "cy", "area", "x0", "y0", "x1", "y1"])
    crossing = ((table["x0"] - 40) // seam != (table["x1"] - 41) // seam) | (
        (table["y0"] - 24) // seam != (table["y1"] - 25) // seam
    )
    assert crossing.sum() >= 10
    labels_ssa = np.array([r[8] for r in rows])
    labels_ea = np.array([r[9] for r in rows])
    assert set(labels_ssa.tolist()) == {OTHER, IMMUNE, MUSCLE, BACKGROUND}
    assert (labels_ea == IMMUNE).sum() >= 10 and set(labels_ea.tolist()) == {IMMUNE, UNLABELLED}


def test_rows_run_tile_by_tile_then_by_centroid(tmp_path: Path) -> None:
    paths = seam_slide(tmp_path, 0)
    extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp_path / "n.h5", NucleiParams(tile=64))
    with NucleiStore(tmp_path / "n.h5") as store:
        table = store.table()
    # Tile of each row from the pixel holding its centroid (fragment origin 40, 24); 3 tiles across.
    row = np.floor(table["centroid_y"] - 24).astype(int) // 64
    col = np.floor(table["centroid_x"] - 40).astype(int) // 64
    tile = (row * 3 + col).to_numpy()
    assert (np.diff(tile) >= 0).all() and len(set(tile)) == 9
    for t in set(tile):
        part = table[tile == t]
        assert list(zip(part["centroid_y"], part["centroid_x"], strict=True)) == sorted(
            zip(part["centroid_y"], part["centroid_x"], strict=True)
        )


def test_instances_wider_than_max_size_are_dropped_in_any_tiling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fragment = Fragment("f000", 0, 0, 96, 64)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[10:20, 10:70] = 1  # a 60-px bar across several 16-px tiles: not a nucleus at max_size 24
    mask[40:46, 40:46] = 1
    paths = {
        "fragments": write_fragment_store(tmp_path / "f.h5", [fragment]),
        "predicted": write_predicted(tmp_path / "p.h5", [fragment], {"f000": mask}),
    }
    for tile in (4096, 16):
        params = NucleiParams(tile=tile, max_size=24, split_touching=False)
        assert extract_nuclei(paths["predicted"], paths["fragments"], {}, CLASSES, tmp_path / "n.h5", params) == 1
    assert "dropped 1 instances wider than nuclei max_size=24 px" in caplog.text


# --------------------------------------------------------------------------- points and reading options


def test_points_label_the_nuclei_polygons_left_unlabelled_and_points_outside_are_reported(
    slide: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """ssa: polygons (A immune, C other, D muscle) plus points: one in B (muscle), one in A (other, loses to
    the polygon), one in no nucleus."""
    polygons = [shapely.box(120, 70, 126, 76), shapely.box(100, 50, 104, 54), shapely.box(320, 60, 324, 64)]
    points = [shapely.Point(143.5, 83.5), shapely.Point(122.5, 72.5), shapely.Point(200, 60)]
    write_qupath_geojson(slide["ssa"], polygons + points, [IMMUNE, OTHER, MUSCLE, MUSCLE, OTHER, IMMUNE], CLASSES)
    write_qupath_geojson(slide["ea"], points[:1], [IMMUNE], CLASSES)  # a set of points alone
    extract(slide)
    with NucleiStore(slide["out"]) as store:
        table = store.table()
    # Rows: C, A, B (f000), D (f001).
    assert table["label_ssa"].tolist() == [OTHER, IMMUNE, MUSCLE, MUSCLE]
    assert table["label_ea"].tolist() == [UNLABELLED, UNLABELLED, IMMUNE, UNLABELLED]
    assert "s1 ssa" in caplog.text and "1 of 3 point labels lie in no segmented nucleus" in caplog.text
    assert "s1 ea" not in caplog.text


def test_a_point_in_a_polygon_matched_nucleus_is_not_reported_as_outside(
    slide: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    write_qupath_geojson(
        slide["ssa"], [shapely.box(120, 70, 126, 76), shapely.Point(122.5, 72.5)], [IMMUNE, OTHER], CLASSES
    )
    extract(slide, sets=["ssa"])
    assert "lie in no segmented nucleus" not in caplog.text


def test_annotation_options_and_mpp_reach_the_geojson_reader(slide: dict[str, Path]) -> None:
    """An unknown class fails by default and is skipped with unknown_classes: ignore; a region of
    4000 µm² at 0.5 µm/px (a 126 x 126 px box around nucleus A) is set aside as a region given the mpp."""
    features = [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(120, 70, 126, 76)),
         "properties": {"objectType": "annotation", "classification": {"name": "Immune cells"}}},
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(100, 50, 104, 54)),
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}},
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(60, 10, 186, 136)),
         "properties": {"objectType": "annotation", "classification": {"name": "Muscle"}}},
    ]  # fmt: skip
    slide["ssa"].write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    with pytest.raises(AnnotationError, match="Stroma"):
        extract(slide, sets=["ssa"])
    options = AnnotationOptions(unknown_classes="ignore")
    sets = {"ssa": slide["ssa"]}
    extract_nuclei(slide["predicted"], slide["fragments"], sets, CLASSES, slide["out"], options=options, mpp=0.5)
    with NucleiStore(slide["out"]) as store:
        labels = store.labels("ssa").tolist()
    # C: Stroma ignored -> background; A: immune (the region around it is no nucleus, so A is not muscle).
    assert labels == [BACKGROUND, IMMUNE, BACKGROUND, BACKGROUND]
    extract_nuclei(slide["predicted"], slide["fragments"], sets, CLASSES, slide["out"], options=options)
    with NucleiStore(slide["out"]) as store:
        # Without the mpp the region is a (large) nucleus drawn over A (a later feature wins): IoU < 0.1.
        assert store.labels("ssa").tolist()[1] == BACKGROUND


# --------------------------------------------------------------------------- split by area


def test_split_by_area_matches_the_patch_split_of_the_same_blocks(many_nuclei: dict[str, Path]) -> None:
    """Patches of 8 px at levels 0..2 (blocks of 32 level-0 px) and nuclei split by area share one split."""
    patch_params = PatchParams(size=8, seed=3)
    assert patch_params.block_size == 32
    params = NucleiParams(split_by="area", area_block=patch_params.block_size, seed=3)
    extract(many_nuclei, params, sets=())
    cut_patches(many_nuclei["fragments"], None, many_nuclei["out"].with_suffix(".patches.h5"), "s1", patch_params)
    with NucleiStore(many_nuclei["out"]) as store:
        table = store.table()
    with PatchStore(many_nuclei["out"].with_suffix(".patches.h5")) as patches:
        provenance = patches.provenance
    level0 = provenance[provenance["level"] == 0].set_index(["fragment", "x", "y"])["split"]
    fragment_x = {f"f{i:03d}": 60 * i for i in range(6)}
    for row in table.itertuples():
        x = int(row.centroid_x - fragment_x[row.fragment]) // 8 * 8
        y = int(row.centroid_y) // 8 * 8
        assert row.split == level0[(row.fragment, x, y)]
    # Whole blocks per split: 4 blocks per fragment, 24 in all, drawn by the patch split counts.
    block = table["fragment"] + ((table["centroid_x"] - table["fragment"].map(fragment_x)) // 32).astype(str)
    block += (table["centroid_y"] // 32).astype(str)
    assert (table.groupby(block)["split"].nunique() == 1).all()
    assert set(table["split"]) == {0, 1, 2}
