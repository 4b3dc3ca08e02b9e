"""Synthetic slides: OpenSlide-readable pyramid, truth that matches the pixels, noisy annotation rates, determinism."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
import rasterio.features
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

import cellkd.synthetic as synthetic
from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.synthetic import (
    ANNOTATION_SET_NAMES,
    SlideTruth,
    SyntheticSlideParams,
    generate_slide,
)

SMALL = SyntheticSlideParams(width=1024, height=768, nuclei_per_mpx=1500.0, ea_count=50)
"""A 1024x768 slide at 0.5 mpp, dense enough (~300-600 nuclei) for the rate checks to be meaningful."""


@dataclass(frozen=True)
class Generated:
    truth: SlideTruth
    slide: Path
    geojson: dict[str, Path]


def _generate(folder: Path, slide_id: str = "s1", seed: int = 0, params: SyntheticSlideParams = SMALL) -> Generated:
    geojson = {name: folder / f"{slide_id}.{name}.geojson" for name in ANNOTATION_SET_NAMES}
    truth = generate_slide(slide_id, folder / f"{slide_id}.tiff", geojson, params, seed=seed)
    return Generated(truth, folder / f"{slide_id}.tiff", geojson)


def _features(path: Path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def _level0(path: Path) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """``SMALL`` slide "s1", seed 0, with all four GeoJSON sets, in a session temp folder."""
    return _generate(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def small_pixels(small_slide: Generated) -> np.ndarray:
    """uint8 (768, 1024, 3) level-0 RGB of ``small_slide`` as OpenSlide reads it."""
    return _level0(small_slide.slide)


def test_openslide_reads_three_levels_with_halved_sizes_and_mpp(small_slide: Generated) -> None:
    with openslide.OpenSlide(small_slide.slide) as slide:
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SMALL.mpp)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(SMALL.mpp)


def test_odd_slide_size_gives_ceil_halved_levels_and_exact_mpp(tmp_path: Path) -> None:
    params = SyntheticSlideParams(width=301, height=257, mpp=0.2525, nuclei_per_mpx=0.0, fragments=(1, 1))
    generate_slide("odd", tmp_path / "odd.tiff", {}, params)
    with openslide.OpenSlide(tmp_path / "odd.tiff") as slide:
        assert slide.level_dimensions == ((301, 257), (151, 129), (76, 65))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.2525, rel=1e-6)


def test_fragment_boxes_hold_tissue_and_outside_is_white_glass(
    small_slide: Generated, small_pixels: np.ndarray
) -> None:
    truth = small_slide.truth
    assert SMALL.fragments[0] <= len(truth.fragments) <= SMALL.fragments[1]
    darkness = 240.0 - small_pixels.min(axis=-1)
    outside = np.ones(darkness.shape, dtype=bool)
    for x, y, width, height in truth.fragments:
        assert x >= 0 and y >= 0 and x + width <= 1024 and y + height <= 768
        box = darkness[y : y + height, x : x + width]
        assert (box > 40).mean() > 0.4, "a fragment box should be mostly tissue"
        outside[y : y + height, x : x + width] = False
    assert outside.mean() > 0.2
    background = small_pixels[outside].astype(float)
    assert np.abs(background.mean(axis=0) - 240).max() < 2
    assert np.percentile(darkness[outside], 99.9) < 15  # camera noise and JPEG ringing only


def test_fragments_are_separated_by_glass(small_slide: Generated) -> None:
    boxes = [shapely.box(x, y, x + w, y + h) for x, y, w, h in small_slide.truth.fragments]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a.distance(b) >= 10


def test_truth_geojson_is_a_qupath_feature_collection(small_slide: Generated) -> None:
    features = _features(small_slide.geojson["truth"])
    by_name = {c.qupath_name: c for c in DEFAULT_CLASSES}
    assert len(features) == small_slide.truth.n_nuclei > 200
    for feature in features:
        assert feature["type"] == "Feature"
        assert uuid.UUID(feature["id"]).version == 4
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["isLocked"] is False
        name = properties["classification"]["name"]
        assert name in by_name
        assert tuple(properties["classification"]["color"]) == by_name[name].color
    assert len({f["id"] for f in features}) == len(features)


def test_truth_counts_per_class_follow_class_fractions(small_slide: Generated) -> None:
    truth = small_slide.truth
    names = [f["properties"]["classification"]["name"] for f in _features(small_slide.geojson["truth"])]
    counted = tuple(names.count(c.qupath_name) for c in DEFAULT_CLASSES)
    assert counted == truth.nuclei_per_class
    fractions = np.array(truth.nuclei_per_class) / truth.n_nuclei
    np.testing.assert_allclose(fractions, SMALL.class_fractions, atol=0.01)


def test_truth_nuclei_are_valid_disjoint_and_inside_fragment_boxes(small_slide: Generated) -> None:
    polygons = shapely.polygons([f["geometry"]["coordinates"][0] for f in _features(small_slide.geojson["truth"])])
    assert shapely.is_valid(polygons).all()
    left, right = shapely.STRtree(polygons).query(polygons, predicate="intersects")
    assert (left == right).all(), "no two nuclei may overlap"
    boxes = shapely.union_all([shapely.box(x, y, x + w, y + h) for x, y, w, h in small_slide.truth.fragments])
    assert shapely.within(polygons, boxes).all()


def test_nucleus_shapes_differ_by_class(small_slide: Generated) -> None:
    """Muscle nuclei are elongated, immune nuclei round and smallest."""
    features = _features(small_slide.geojson["truth"])
    aspects: dict[str, list[float]] = {}
    areas: dict[str, list[float]] = {}
    for feature in features:
        polygon = shapely.Polygon(feature["geometry"]["coordinates"][0])
        rectangle = np.asarray(shapely.minimum_rotated_rectangle(polygon).exterior.coords)
        sides = np.linalg.norm(np.diff(rectangle[:3], axis=0), axis=1)
        name = feature["properties"]["classification"]["name"]
        aspects.setdefault(name, []).append(sides.max() / sides.min())
        areas.setdefault(name, []).append(polygon.area)
    assert np.median(aspects["Muscle"]) > 2.5
    assert np.median(aspects["Immune cells"]) < 1.3
    assert 1.1 < np.median(aspects["Other"]) < 2.0
    assert np.median(areas["Immune cells"]) < np.median(areas["Other"])


def test_truth_masks_match_rendered_nuclei_and_immune_is_darkest(
    small_slide: Generated, small_pixels: np.ndarray
) -> None:
    """Rasterizing the truth GeoJSON (pixel-centre rule) lands on dark nuclei; immune > muscle > other in darkness."""
    features = _features(small_slide.geojson["truth"])
    index = {c.qupath_name: i + 1 for i, c in enumerate(DEFAULT_CLASSES)}
    shapes = [(f["geometry"], index[f["properties"]["classification"]["name"]]) for f in features]
    labels = rasterio.features.rasterize(shapes, out_shape=small_pixels.shape[:2], dtype=np.uint8)
    gray = small_pixels.astype(float).mean(axis=-1)
    tissue = gray < 225
    stroma = gray[tissue & (labels == 0)].mean()
    other, immune, muscle = (gray[labels == k].mean() for k in (1, 2, 3))
    assert immune < muscle < other < stroma - 15
    assert immune < other - 40


def test_ssa_and_wsa_miss_and_flip_rates_match_parameters(small_slide: Generated) -> None:
    truth = {f["id"]: f for f in _features(small_slide.geojson["truth"])}
    n = len(truth)
    rates = {}
    for name in ("ssa", "wsa"):
        features = _features(small_slide.geojson[name])
        assert {f["id"] for f in features} <= truth.keys(), "a noisy set only holds real nuclei, joined on id"
        flipped = sum(
            f["properties"]["classification"]["name"] != truth[f["id"]]["properties"]["classification"]["name"]
            for f in features
        )
        miss, flip = getattr(SMALL, f"{name}_miss"), getattr(SMALL, f"{name}_flip")
        assert abs((n - len(features)) / n - miss) <= 1 / n
        assert abs(flipped / len(features) - flip) <= 1 / len(features)
        rates[name] = flipped / len(features)
    assert rates["wsa"] > rates["ssa"]


@pytest.mark.parametrize("name", ["ssa", "wsa"])
def test_noisy_contours_move_by_about_the_jitter(small_slide: Generated, name: str) -> None:
    truth = {f["id"]: np.asarray(f["geometry"]["coordinates"][0]) for f in _features(small_slide.geojson["truth"])}
    moved = [np.asarray(f["geometry"]["coordinates"][0]) - truth[f["id"]] for f in _features(small_slide.geojson[name])]
    rms = float(np.sqrt(np.mean(np.concatenate(moved) ** 2) * 2))  # per-vertex displacement, both axes
    assert rms == pytest.approx(getattr(SMALL, f"{name}_jitter_px"), rel=0.25)
    polygons = shapely.polygons([f["geometry"]["coordinates"][0] for f in _features(small_slide.geojson[name])])
    assert shapely.is_valid(polygons).all()


def test_expert_annotations_are_a_true_labelled_subset_of_ea_count(small_slide: Generated) -> None:
    truth = {f["id"]: f for f in _features(small_slide.geojson["truth"])}
    expert = _features(small_slide.geojson["ea"])
    assert len(expert) == SMALL.ea_count
    assert dict(small_slide.truth.annotation_counts)["ea"] == SMALL.ea_count
    for feature in expert:
        reference = truth[feature["id"]]
        assert feature["properties"]["classification"] == reference["properties"]["classification"]
        shift = np.asarray(feature["geometry"]["coordinates"][0]) - reference["geometry"]["coordinates"][0]
        assert np.abs(shift).max() < 3 * SMALL.ea_jitter_px + 0.5


def test_ea_count_is_clipped_to_the_number_of_nuclei(tmp_path: Path) -> None:
    params = SyntheticSlideParams(width=512, height=512, nuclei_per_mpx=200.0, ea_count=10_000)
    generated = _generate(tmp_path, params=params)
    assert len(_features(generated.geojson["ea"])) == generated.truth.n_nuclei > 0


def test_same_seed_gives_identical_bytes_and_other_seed_or_slide_differs(
    small_slide: Generated, tmp_path: Path
) -> None:
    again = _generate(tmp_path / "again")
    assert again.truth == small_slide.truth
    assert again.slide.read_bytes() == small_slide.slide.read_bytes()
    for name in ANNOTATION_SET_NAMES:
        assert again.geojson[name].read_bytes() == small_slide.geojson[name].read_bytes()
    reseeded = _generate(tmp_path / "seed1", seed=1)
    assert reseeded.slide.read_bytes() != small_slide.slide.read_bytes()
    assert reseeded.geojson["truth"].read_bytes() != small_slide.geojson["truth"].read_bytes()
    renamed = _generate(tmp_path / "s2", slide_id="s2")
    assert renamed.geojson["truth"].read_bytes() != small_slide.geojson["truth"].read_bytes()


def test_pixels_do_not_depend_on_strips_or_column_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming in 256-row strips of 100-column blocks gives the same lossless image as one strip, one block."""
    params = SyntheticSlideParams(width=512, height=1100, compression="zlib", nuclei_per_mpx=1500.0)
    generate_slide("tall", tmp_path / "one.tiff", {}, params)
    monkeypatch.setattr(synthetic, "_STRIP_PIXELS", 1)  # forces the minimum strip: one tile row
    monkeypatch.setattr(synthetic, "_BLOCK_COLUMNS", 100)
    assert synthetic._strip_rows(params.width) == 256
    generate_slide("tall", tmp_path / "strips.tiff", {}, params)
    for level in range(3):
        with openslide.OpenSlide(tmp_path / "one.tiff") as a, openslide.OpenSlide(tmp_path / "strips.tiff") as b:
            size = a.level_dimensions[level]
            pixels_a = np.asarray(a.read_region((0, 0), level, size))
            pixels_b = np.asarray(b.read_region((0, 0), level, size))
        np.testing.assert_array_equal(pixels_a, pixels_b)


def test_only_requested_sets_are_written_and_no_partial_files_remain(tmp_path: Path) -> None:
    truth = generate_slide("only", tmp_path / "only.tiff", {"ssa": tmp_path / "only.ssa.geojson"}, SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only.ssa.geojson", "only.tiff"]
    assert [name for name, _ in truth.annotation_counts] == ["ssa"]


def test_stain_jitter_changes_colour_between_slides_but_zero_gives_reference(tmp_path: Path) -> None:
    reference = SyntheticSlideParams(width=512, height=512, stain_jitter=0.0)
    truth = generate_slide("ref", tmp_path / "ref.tiff", {}, reference)
    np.testing.assert_allclose(
        truth.stain_matrix,
        synthetic.REFERENCE_STAIN_MATRIX / np.linalg.norm(synthetic.REFERENCE_STAIN_MATRIX, axis=1, keepdims=True),
    )
    jittered = [generate_slide(s, tmp_path / f"{s}.tiff", {}, SMALL).stain_matrix for s in ("a", "b")]
    assert not np.allclose(jittered[0], jittered[1])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 2.5}, "height"),
        ({"mpp": 0.0}, "mpp"),
        ({"fragments": (3, 2)}, "fragments"),
        ({"fragments": (0, 2)}, "fragments"),
        ({"nuclei_per_mpx": -1.0}, "nuclei_per_mpx"),
        ({"class_fractions": (0.5, 0.5, 0.5)}, "class_fractions"),
        ({"class_fractions": (1.2, -0.2, 0.0)}, "class_fractions"),
        ({"ssa_flip": 1.0}, "ssa_flip"),
        ({"wsa_miss": -0.1}, "wsa_miss"),
        ({"wsa_jitter_px": -1.0}, "wsa_jitter_px"),
        ({"ea_count": -1}, "ea_count"),
        ({"stain_jitter": 0.9}, "stain_jitter"),
        ({"compression": "lzw"}, "compression"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
    ],
)
def test_params_reject_out_of_range_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticSlideParams\.{field} = "):
        SyntheticSlideParams(**changes)


def test_params_accept_lists_from_yaml_and_store_tuples() -> None:
    params = SyntheticSlideParams(fragments=[1, 3], class_fractions=[0.2, 0.3, 0.5])  # type: ignore[arg-type]
    assert params.fragments == (1, 3)
    assert params.class_fractions == (0.2, 0.3, 0.5)


def test_generate_slide_rejects_unknown_set_mismatched_classes_and_negative_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown annotation set.*'gt'"):
        generate_slide("x", tmp_path / "x.tiff", {"gt": tmp_path / "x.json"}, SMALL)
    two = (ClassSpec("a", "A", (1, 2, 3)), ClassSpec("b", "B", (4, 5, 6)))
    with pytest.raises(ValueError, match="2 classes .* class_fractions has 3 entries"):
        generate_slide("x", tmp_path / "x.tiff", {}, SMALL, classes=two)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_slide("x", tmp_path / "x.tiff", {}, SMALL, seed=-1)
    assert not list(tmp_path.iterdir())


def test_custom_classes_are_written_with_their_qupath_names(tmp_path: Path) -> None:
    classes = (ClassSpec("tumor", "Tumor", (200, 0, 0)), ClassSpec("stroma", "Stroma", (150, 200, 150)))
    params = SyntheticSlideParams(width=512, height=512, class_fractions=(0.5, 0.5))
    generate_slide("c", tmp_path / "c.tiff", {"truth": tmp_path / "c.geojson"}, params, classes=classes)
    names = {f["properties"]["classification"]["name"] for f in _features(tmp_path / "c.geojson")}
    assert names == {"Tumor", "Stroma"}


@settings(max_examples=40, deadline=None)
@given(
    jitter=st.floats(0.0, 6.0),
    semi_major=st.floats(2.0, 20.0),
    aspect=st.floats(1.0, 5.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_jittered_contours_stay_valid_polygons(jitter: float, semi_major: float, aspect: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.stack([semi_major * np.cos(t), semi_major / aspect * np.sin(t)], axis=-1) + 100.0
    rings = np.repeat(ring[None], 8, axis=0)
    moved = synthetic._jitter_rings(rng, rings, rings.mean(axis=1), jitter)
    assert shapely.is_valid(shapely.polygons(synthetic._closed(moved))).all()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    n_classes=st.integers(2, 5),
    miss=st.floats(0.0, 0.99),
    flip=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_noisy_selection_drops_and_flips_exact_counts(
    n: int, n_classes: int, miss: float, flip: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    kept, noisy = synthetic._noisy_selection(rng, labels, n_classes, miss, flip)
    assert len(kept) == n - round(miss * n)
    assert np.all(np.diff(kept) > 0)
    assert ((noisy >= 0) & (noisy < n_classes)).all()
    assert (noisy != labels[kept]).sum() == round(flip * len(kept))


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 9), width=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_halve_is_a_rounded_two_by_two_mean_with_edge_padding(height: int, width: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    padded = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge").astype(float)
    expected = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(synthetic._halve(image), np.floor(expected + 0.5).astype(np.uint8))
