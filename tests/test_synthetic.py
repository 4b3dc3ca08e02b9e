"""Synthetic slides: OpenSlide-readable pyramid, truth that matches the pixels, noisy annotation rates, determinism,
rule-based weak annotators, and the paper-scale fixture with QuPath cell exports."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
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
from cellkd.errors import ConfigError
from cellkd.synthetic import (
    ANNOTATION_SET_NAMES,
    SlideTruth,
    SyntheticSlideParams,
    annotate,
    generate_slide,
    layout,
    render,
    scale,
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


def test_ea_count_changes_the_expert_set_only(small_slide: Generated, tmp_path: Path) -> None:
    """The expert draws from its own random stream: more expert labels leave the slide and the other sets as they were
    (so a demo with another ``demo.ea_count`` trains the same students)."""
    more = _generate(tmp_path, params=replace(SMALL, ea_count=2 * SMALL.ea_count))
    assert more.slide.read_bytes() == small_slide.slide.read_bytes()
    for name in ANNOTATION_SET_NAMES:
        if name != "ea":
            assert more.geojson[name].read_bytes() == small_slide.geojson[name].read_bytes(), name
    assert len(_features(more.geojson["ea"])) == 2 * SMALL.ea_count


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
    monkeypatch.setattr(render, "_STRIP_PIXELS", 1)  # forces the minimum strip: one tile row
    monkeypatch.setattr(render, "_BLOCK_COLUMNS", 100)
    assert render._strip_rows(params.width) == 256
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
        render.REFERENCE_STAIN_MATRIX / np.linalg.norm(render.REFERENCE_STAIN_MATRIX, axis=1, keepdims=True),
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
        ({"wsa_random_share": 1.0}, "wsa_random_share"),
        ({"wsa_jitter_px": -1.0}, "wsa_jitter_px"),
        ({"ea_count": -1}, "ea_count"),
        ({"stain_jitter": 0.9}, "stain_jitter"),
        ({"compression": "lzw"}, "compression"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
    ],
)
def test_params_reject_out_of_range_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"synthetic slide parameter {field}="):
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
    moved, centres = annotate.jitter_rings(rng, rings, rings.mean(axis=1), jitter)
    assert shapely.contains_xy(shapely.polygons(layout.closed(moved)), centres[:, 0], centres[:, 1]).all()
    assert shapely.is_valid(shapely.polygons(layout.closed(moved))).all()


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
    kept, noisy = annotate.noisy_selection(rng, labels, n_classes, miss, flip)
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
    np.testing.assert_array_equal(render._halve(image), np.floor(expected + 0.5).astype(np.uint8))


# --- rule-based weak annotators --------------------------------------------------------------------------------

REALISTIC = SyntheticSlideParams(width=3072, height=2048, appearance="overlapping", annotator="rules")
"""The demo's slide size with overlapping classes and rule-based SSA/WSA (drawn only; no pixels needed)."""


def _agreement(slide_id: str, params: SyntheticSlideParams = REALISTIC, seed: int = 0) -> dict[str, float]:
    drawn = synthetic.draw_slide(slide_id, params, seed=seed)
    return {
        name: float((a.labels == drawn.nuclei.labels[a.kept]).mean()) for name, a in drawn.annotations(["ssa", "wsa"])
    }


def _feature_row(**values: float) -> dict[str, np.ndarray]:
    base = {"area_um2": 30.0, "elongation": 1.2, "circularity": 0.95, "hematoxylin": 1.5, "texture": 0.08}
    return {name: np.array([values.get(name, value)]) for name, value in base.items()}


HASTY_RULES = (
    synthetic.WeakRule("muscle", minimum=(("elongation", 2.7),)),
    synthetic.WeakRule("immune", minimum=(("hematoxylin", 1.02),), maximum=(("area_um2", 55.0),)),
    synthetic.WeakRule("other"),
)
"""A fixed decision list for the tests that need known thresholds (the demo's own are tuned, so they move)."""


def test_rule_labels_follow_the_first_matching_rule_with_inclusive_bounds() -> None:
    rules = HASTY_RULES  # muscle: elongation >= 2.7; immune: hematoxylin >= 1.02, area <= 55
    label = lambda **v: int(annotate.rule_labels(_feature_row(**v), rules, DEFAULT_CLASSES)[0])  # noqa: E731
    other, immune, muscle = range(3)
    assert label(area_um2=50.0) == immune
    assert label(area_um2=55.0) == immune
    assert label(area_um2=55.5) == other, "a larger dark nucleus is 'other' for this rule"
    assert label(hematoxylin=1.0) == other
    assert label(elongation=2.7) == muscle
    assert label(elongation=2.7, area_um2=100.0, hematoxylin=0.2) == muscle, "the first rule wins"


def test_wsa_label_of_a_nucleus_flips_when_its_measured_area_crosses_the_rule() -> None:
    """The real annotator path: one round dark nucleus is immune for WSA until its contour grows past 55 µm²."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    params = SyntheticSlideParams(
        annotator="rules", wsa_miss=0.0, wsa_jitter_px=0.0, stain_jitter=0.0, wsa_rules=HASTY_RULES
    )
    reference = annotate.Stain(
        render.REFERENCE_STAIN_MATRIX / np.linalg.norm(render.REFERENCE_STAIN_MATRIX, axis=1, keepdims=True), np.ones(2)
    )

    def wsa_label(radius_um: float) -> tuple[int, float]:
        radius = radius_um / params.mpp
        ring = np.stack([100 + radius * np.cos(t), 100 + radius * np.sin(t)], axis=-1)[None]
        nuclei = layout.Nuclei(
            ring, ring.mean(axis=1), np.array([1]), np.array([1.6], np.float32), np.array([0.1], np.float32)
        )
        result = annotate.weak_annotation(np.random.default_rng(0), nuclei, params, "wsa", DEFAULT_CLASSES, reference)
        return int(result.labels[0]), float(result.features["area_um2"][0])

    small, small_area = wsa_label(3.8)
    large, large_area = wsa_label(4.4)
    assert small_area < 55.0 < large_area
    assert (small, large) == (1, 0), "immune below the rule's area bound, other above it"


def test_measured_hematoxylin_follows_the_slide_stain_strength() -> None:
    unit = render.REFERENCE_STAIN_MATRIX / np.linalg.norm(render.REFERENCE_STAIN_MATRIX, axis=1, keepdims=True)
    concentration = np.array([0.8, 1.6])
    normal = annotate.measured_hematoxylin(concentration, annotate.Stain(unit, np.ones(2)))
    strong = annotate.measured_hematoxylin(concentration, annotate.Stain(unit, np.full(2, 1.2)))
    np.testing.assert_allclose(strong, 1.2 * normal)
    assert normal[1] > normal[0] > 0


def test_polygon_moments_of_an_ellipse() -> None:
    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    ring = np.stack([5000 + 12 * np.cos(t), 9000 + 4 * np.sin(t)], axis=-1)[None]
    area, perimeter, moments = annotate.polygon_moments(ring)
    assert area[0] == pytest.approx(np.pi * 12 * 4, rel=1e-3)
    assert np.sqrt(moments[0, 0] / moments[0, 1]) == pytest.approx(3.0, rel=1e-3)
    assert perimeter[0] == pytest.approx(shapely.Polygon(ring[0]).length, rel=1e-9)


def test_rule_annotators_agree_with_truth_imperfectly_and_ssa_better_than_wsa() -> None:
    """On demo-size slides with overlapping classes: WSA near the paper's 82%, SSA clearly better, neither perfect."""
    rates = [_agreement(f"demo{i}") for i in range(3)]
    ssa, wsa = (float(np.mean([r[name] for r in rates])) for name in ("ssa", "wsa"))
    assert 0.75 <= wsa <= 0.88
    assert wsa + 0.03 <= ssa < 0.97
    assert all(r["wsa"] < 1 and r["ssa"] < 1 for r in rates)


def test_rule_errors_are_systematic_not_uniform() -> None:
    """WSA's mis-set thresholds confuse specific class pairs (muscle -> other, other -> immune), not all alike."""
    drawn = synthetic.draw_slide("demo0", REALISTIC)
    ((_, wsa),) = drawn.annotations(["wsa"])
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (drawn.nuclei.labels[wsa.kept], wsa.labels), 1)
    assert confusion[1, 2] <= 0.02 * confusion[1].sum(), "immune nuclei are never elongated enough to be muscle"
    assert confusion[2, 0] >= 0.1 * confusion[2].sum(), "short muscle nuclei fall below the elongation threshold"


def test_rules_annotator_is_deterministic_and_differs_from_flips(tmp_path: Path) -> None:
    params = SyntheticSlideParams(
        width=768, height=768, nuclei_per_mpx=1500.0, appearance="overlapping", annotator="rules"
    )
    first = _generate(tmp_path / "a", params=params)
    again = _generate(tmp_path / "b", params=params)
    flips = _generate(tmp_path / "c", params=replace(params, annotator="flips"))
    for name in ("ssa", "wsa"):
        assert first.geojson[name].read_bytes() == again.geojson[name].read_bytes()
        assert first.geojson[name].read_bytes() != flips.geojson[name].read_bytes()
    assert first.slide.read_bytes() == flips.slide.read_bytes(), "the annotator does not touch the pixels"
    assert first.geojson["truth"].read_bytes() == flips.geojson["truth"].read_bytes()


def test_overlapping_appearance_makes_classes_share_feature_ranges() -> None:
    """Distinct classes never overlap in elongation (other vs muscle); overlapping ones do, so some are ambiguous."""
    overlap = {}
    for appearance in ("distinct", "overlapping"):
        params = SyntheticSlideParams(width=3072, height=2048, appearance=appearance, stain_jitter=0.0)
        drawn = synthetic.draw_slide("demo0", params)
        _, _, moments = annotate.polygon_moments(drawn.nuclei.rings)
        elongation = np.sqrt(moments[:, 0] / moments[:, 1])
        other, muscle = (elongation[drawn.nuclei.labels == k] for k in (0, 2))
        overlap[appearance] = ((other > muscle.min()).mean(), (muscle < other.max()).mean())
    assert max(overlap["distinct"]) == 0
    assert min(overlap["overlapping"]) > 0.01


def test_default_demo_config_uses_rules_overlap_and_debris_and_schema_rules_match_the_code() -> None:
    import yaml

    from cellkd.config import validate_config

    config = yaml.safe_load(Path("workflow_config.yaml").read_text())
    validate_config(config, "schemas/config.schema.yaml", "workflow_config.yaml")
    params = synthetic.params_from_config(config["demo"])
    assert (params.annotator, params.appearance) == ("rules", "overlapping")
    assert params.debris_per_nucleus > 0
    assert params.ssa_rules == synthetic.DEFAULT_SSA_RULES
    assert params.wsa_rules == synthetic.DEFAULT_WSA_RULES
    assert params.wsa_random_share > params.ssa_random_share == 0, "WSA's errors are part noise; SSA's rules only"


def test_wsa_mislabels_exactly_the_nuclei_its_mis_set_threshold_covers() -> None:
    """Two annotators that differ only in the muscle rule's elongation threshold (2.3 vs 2.7), measuring the same
    contours with the same noise, disagree on exactly the nuclei whose measured elongation lies in [2.3, 2.7)."""
    careful = replace(REALISTIC, wsa_miss=0.0, wsa_jitter_px=1.0, wsa_rules=synthetic.DEFAULT_SSA_RULES)
    mis_set = (synthetic.WeakRule("muscle", minimum=(("elongation", 2.7),)), *synthetic.DEFAULT_SSA_RULES[1:])
    drawn = synthetic.draw_slide("demo0", careful)

    def wsa(params: SyntheticSlideParams) -> annotate.Annotation:
        rng = np.random.default_rng(7)
        return annotate.weak_annotation(rng, drawn.nuclei, params, "wsa", DEFAULT_CLASSES, drawn.stain)

    good, bad = wsa(careful), wsa(replace(careful, wsa_rules=mis_set))
    elongation = good.features["elongation"]
    np.testing.assert_array_equal(elongation, bad.features["elongation"])
    covered = (elongation >= 2.3) & (elongation < 2.7)
    assert covered.sum() > 10
    np.testing.assert_array_equal(good.labels != bad.labels, covered)
    assert (good.labels[covered] == 2).all() and (bad.labels[covered] != 2).all()


def test_random_share_flips_that_fraction_of_the_rule_labels_seeded_and_share_0_keeps_the_rules() -> None:
    """``wsa_random_share`` moves exactly round(share * kept) rule labels to another class, chosen by the seed, and
    leaves everything else the annotator drew (kept nuclei, contours, features) as it was."""
    drawn = synthetic.draw_slide("demo0", REALISTIC)

    def wsa(share: float, seed: int = 7) -> annotate.Annotation:
        params = replace(REALISTIC, wsa_random_share=share)
        return annotate.weak_annotation(
            np.random.default_rng(seed), drawn.nuclei, params, "wsa", DEFAULT_CLASSES, drawn.stain
        )

    pure, noisy, again, other_seed = wsa(0.0), wsa(0.2), wsa(0.2), wsa(0.2, seed=8)
    np.testing.assert_array_equal(
        pure.labels, annotate.rule_labels(pure.features, REALISTIC.wsa_rules, DEFAULT_CLASSES)
    )
    np.testing.assert_array_equal(noisy.kept, pure.kept)
    np.testing.assert_array_equal(noisy.rings, pure.rings)
    np.testing.assert_array_equal(noisy.features["hematoxylin"], pure.features["hematoxylin"])
    flipped = noisy.labels != pure.labels
    assert flipped.sum() == round(0.2 * len(pure.kept)), "every chosen label moves to another class"
    np.testing.assert_array_equal(again.labels, noisy.labels)
    assert (other_seed.labels != noisy.labels).any(), "another seed flips other nuclei"
    moves = np.zeros((3, 3), int)
    np.add.at(moves, (pure.labels[flipped], noisy.labels[flipped]), 1)
    off_diagonal = moves[~np.eye(3, dtype=bool)]
    assert (off_diagonal > 0).all(), "flips reach every other class, unlike the rules' systematic confusions"


def test_params_from_config_names_an_unknown_demo_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown demo parameter\(s\) \['nuclei'\]"):
        synthetic.params_from_config({"slides": 2, "nuclei": 300})


def test_bad_rules_are_rejected_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['size'\]"):
        synthetic.WeakRule("immune", minimum=(("size", 1.0),))
    with pytest.raises(ValueError, match=r"synthetic slide parameter wsa_rules=.*catch-all"):
        SyntheticSlideParams(wsa_rules=(synthetic.WeakRule("immune", minimum=(("hematoxylin", 1.0),)),))
    classes = (ClassSpec("tumor", "Tumor", (200, 0, 0)), ClassSpec("stroma", "Stroma", (150, 200, 150)))
    params = SyntheticSlideParams(width=512, height=512, class_fractions=(0.5, 0.5), annotator="rules")
    with pytest.raises(ValueError, match=r"ssa_rules name class\(es\) \['immune', 'muscle', 'other'\]"):
        generate_slide("c", tmp_path / "c.tiff", {}, params, classes=classes)


# --- background objects (debris) ------------------------------------------------------------------------------

DEBRIS = replace(SMALL, debris_per_nucleus=0.3)
"""``SMALL`` with about one background object per three nuclei."""


@pytest.fixture(scope="module")
def debris_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Generated, synthetic.slide.DrawnSlide]:
    """A ``DEBRIS`` slide with all four sets written, and what was drawn for it."""
    generated = _generate(tmp_path_factory.mktemp("debris"), params=DEBRIS)
    return generated, synthetic.draw_slide("s1", DEBRIS)


def test_debris_is_in_the_pixels_but_in_no_annotation_set(debris_slide: tuple[Generated, object]) -> None:
    generated, drawn = debris_slide
    debris = drawn.debris
    assert generated.truth.debris == len(debris) == round(0.3 * generated.truth.n_nuclei)
    pixels = _level0(generated.slide).astype(float).sum(axis=-1)
    col, row = np.floor(debris.centres).astype(int).T
    nuclei_col, nuclei_row = np.floor(drawn.nuclei.centres).astype(int).T
    assert np.median(pixels[row, col]) < np.median(pixels[nuclei_row, nuclei_col]), "debris is darker than nuclei"
    points = shapely.points(debris.centres)
    for name in ANNOTATION_SET_NAMES:
        polygons = [shapely.geometry.shape(f["geometry"]) for f in _features(generated.geojson[name])]
        hits = shapely.STRtree(polygons).query(points, predicate="within")
        assert hits.size == 0, f"{name} holds a background object"


def test_no_debris_leaves_the_nuclei_as_they_were() -> None:
    """The background kind is drawn last with zero weight: debris_per_nucleus=0 changes no nucleus."""
    with_none = synthetic.draw_slide("s1", replace(DEBRIS, debris_per_nucleus=0.0))
    plain = synthetic.draw_slide("s1", SMALL)
    assert len(with_none.debris) == 0
    np.testing.assert_array_equal(with_none.nuclei.rings, plain.nuclei.rings)
    np.testing.assert_array_equal(with_none.nuclei.concentration, plain.nuclei.concentration)


def test_a_segmented_background_object_is_background_in_every_complete_set(
    debris_slide: tuple[Generated, object], tmp_path: Path
) -> None:
    """Segmentation that finds the nuclei and the debris: every debris instance is background for truth, ssa and wsa
    (no polygon matches it) and unlabelled for the partial ea set; the nuclei keep their classes in the truth."""
    from affine import Affine
    from test_nuclei import write_predicted

    from cellkd.nuclei.extract import extract_nuclei
    from cellkd.slides.extract import extract_fragments
    from cellkd.store.fragments import FragmentStore
    from cellkd.store.nuclei import UNLABELLED, NucleiStore

    generated, drawn = debris_slide
    fragments = tmp_path / "fragments.h5"
    extract_fragments(generated.slide, fragments, "s1")
    # Segmentation stand-in: the drawn nuclei and every background object, rasterized per fragment.
    shapes = [(layout.geojson_polygon(r), 1) for r in np.concatenate([drawn.nuclei.rings, drawn.debris.rings])]
    with FragmentStore(fragments) as store:
        masks = {
            f.name: rasterio.features.rasterize(
                shapes, out_shape=(f.height, f.width), transform=Affine.translation(f.x, f.y)
            )
            for f in store.fragments
        }
        predicted = write_predicted(tmp_path / "predicted.h5", store.fragments, masks)
        x, y = drawn.debris.centres.T
        # Tissue detection may drop a small fragment of this small slide: count the debris it kept.
        in_tissue = sum(((x >= f.x) & (x < f.x + f.width) & (y >= f.y) & (y < f.y + f.height)) for f in store.fragments)
    out = tmp_path / "nuclei.h5"
    extract_nuclei(predicted, fragments, generated.geojson, DEFAULT_CLASSES, out, mpp=DEBRIS.mpp)
    with NucleiStore(out) as store:
        table = store.table()
        labels = {name: store.labels(name) for name in ANNOTATION_SET_NAMES}
    centres = table[["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    background = len(DEFAULT_CLASSES)
    nearest = {
        kind: np.linalg.norm(centres[:, None] - objects.centres[None], axis=-1).min(axis=1)
        for kind, objects in (("debris", drawn.debris), ("nuclei", drawn.nuclei))
    }
    is_debris = nearest["debris"] < nearest["nuclei"]
    assert in_tissue.sum() > 20
    assert is_debris.sum() >= 0.9 * in_tissue.sum()
    for name in ("truth", "ssa", "wsa"):
        assert (labels[name][is_debris] == background).all(), name
    assert (labels["ea"][is_debris] == UNLABELLED).all()
    assert (labels["truth"][~is_debris] != background).mean() > 0.99


# --- paper-scale fixture ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_scale(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The paper-scale fixture at scale 0.04 (1949x716 px, ~750 nuclei), on the real code path."""
    folder = tmp_path_factory.mktemp("scale")
    return folder, scale.generate_scale_fixture(folder, scale=0.04)


def test_scale_fixture_slide_opens_in_openslide_at_40x(tiny_scale: tuple[Path, dict]) -> None:
    folder, manifest = tiny_scale
    with openslide.OpenSlide(folder / "scale.tiff") as slide:
        assert slide.dimensions == (round(48_724 * 0.04), round(17_910 * 0.04)) == (1949, 716)
        assert slide.level_count == 3
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
    truth = manifest["truth"]
    assert len(truth["fragments"]) == 3
    asked = round(470_000 * 1949 * 716 / (48_724 * 17_910))
    assert 0.95 * asked <= sum(truth["nuclei_per_class"]) <= asked


def test_scale_fixture_cell_exports_have_qupath_cell_fields(tiny_scale: tuple[Path, dict]) -> None:
    folder, manifest = tiny_scale
    truth_ids = {f["id"] for f in _features(folder / "scale.truth.geojson")}
    assert len(truth_ids) == sum(manifest["truth"]["nuclei_per_class"])
    names = {c.qupath_name for c in DEFAULT_CLASSES}
    for set_name in ("truth", "ssa", "wsa"):
        features = _features(folder / f"scale.{set_name}.geojson")
        assert len(features) == dict(manifest["truth"]["annotation_counts"])[set_name]
        assert {f["id"] for f in features} <= truth_ids
        for feature in features:
            properties = feature["properties"]
            assert properties["objectType"] == "cell"
            assert properties["classification"]["name"] in names
            cell = shapely.Polygon(feature["geometry"]["coordinates"][0])
            nucleus = shapely.Polygon(feature["nucleusGeometry"]["coordinates"][0])
            assert cell.is_valid and nucleus.is_valid
            assert cell.buffer(0.05).contains(nucleus)
            measurements = properties["measurements"]
            assert len(measurements) >= 30
            assert measurements["Nucleus: Area µm^2"] == pytest.approx(nucleus.area * 0.25**2, rel=1e-4)
            assert measurements["Cell: Area µm^2"] >= measurements["Nucleus: Area µm^2"] * (
                1 - 1e-3
            )  # 0.01 px rounding
    assert "µm" in (folder / "scale.ssa.geojson").read_text(encoding="utf-8"), "QuPath writes UTF-8, not escapes"


def test_scale_fixture_expert_export_mixes_cells_and_point_clicks(tiny_scale: tuple[Path, dict]) -> None:
    folder, _ = tiny_scale
    truth = {f["id"]: f for f in _features(folder / "scale.truth.geojson")}
    expert = _features(folder / "scale.ea.geojson")
    kinds = {(f["geometry"]["type"], f["properties"]["objectType"]) for f in expert}
    assert kinds == {("Polygon", "cell"), ("Point", "annotation")}
    for feature in expert:
        reference = truth[feature["id"]]
        assert feature["properties"]["classification"] == reference["properties"]["classification"]
        if feature["geometry"]["type"] == "Point":
            nucleus = shapely.Polygon(reference["nucleusGeometry"]["coordinates"][0])
            assert nucleus.contains(shapely.Point(feature["geometry"]["coordinates"]))


def test_scale_fixture_is_cached_and_reused(tiny_scale: tuple[Path, dict]) -> None:
    folder, manifest = tiny_scale
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert scale.generate_scale_fixture(folder, scale=0.04) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert manifest["bytes"]["ssa"] == (folder / "scale.ssa.geojson").stat().st_size


def test_scale_rejects_factors_outside_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="scale = 1.5"):
        scale.scale_params(1.5)
    with pytest.raises(SystemExit):
        scale.main(["/nonexistent/never-written", "--scale", "0.001"])
    assert "use a scale >=" in capsys.readouterr().err
