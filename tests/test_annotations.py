"""Tests for cellkd.annotations: QuPath GeoJSON reading/writing and rasterization to class masks."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import geopandas as gpd
import h5py
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

import cellkd.annotations.rasterize as rasterize_module
from cellkd.annotations import (
    AnnotationOptions,
    check_annotations_fit,
    class_lookup,
    open_qupath_geojson,
    rasterize_fragment,
    read_qupath_annotations,
    read_qupath_geojson,
    write_mask_store,
    write_qupath_geojson,
)
from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.errors import AnnotationError
from cellkd.store.compression import is_compressed
from cellkd.store.fragments import Fragment, FragmentStoreWriter

# other (0), immune (1), muscle (2) with QuPath names "Other", "Immune cells", "Muscle"; immune also as "Lymphocytes"
CLASSES = (DEFAULT_CLASSES[0], dataclasses.replace(DEFAULT_CLASSES[1], aliases=("Lymphocytes",)), DEFAULT_CLASSES[2])


# --------------------------------------------------------------------------- helpers


def square(x: float, y: float, side: float) -> list[list[list[float]]]:
    """GeoJSON Polygon coordinates of the closed axis-aligned square [x, x+side] x [y, y+side]."""
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def feature(coordinates: Any, name: str | None = "Other", kind: str = "Polygon", **extra: Any) -> dict[str, Any]:
    """A QuPath 0.4-style detection Feature with classification ``name`` (none when None)."""
    properties: dict[str, Any] = {"objectType": "detection"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [255, 200, 0]}
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coordinates},
        "properties": properties,
        **extra,
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def collection(path: Path, features: list[dict[str, Any]]) -> Path:
    return write_json(path, {"type": "FeatureCollection", "features": features})


def frame(polygons: list[shapely.Geometry], class_index: list[int]) -> gpd.GeoDataFrame:
    """An annotations GeoDataFrame as read_qupath_geojson returns it."""
    return gpd.GeoDataFrame(
        {"class_index": np.asarray(class_index, dtype=np.int64), "feature_index": np.arange(len(polygons))},
        geometry=gpd.GeoSeries(polygons),
    )


# --------------------------------------------------------------------------- reading


def test_read_feature_collection_maps_classes_and_keeps_feature_order(tmp_path: Path) -> None:
    path = collection(
        tmp_path / "a.geojson",
        [
            feature(square(0, 0, 4), "Other"),
            feature(square(10, 0, 4), "Immune cells"),
            feature(square(20, 0, 4), "Muscle"),
        ],
    )
    annotations = read_qupath_geojson(path, CLASSES)
    assert list(annotations.columns) == ["class_index", "feature_index", "geometry"]
    assert annotations["class_index"].tolist() == [0, 1, 2]
    assert annotations["feature_index"].tolist() == [0, 1, 2]
    assert annotations["class_index"].dtype == np.int64
    assert annotations.geometry.iloc[1].equals(shapely.box(10, 0, 14, 4))


def test_read_matches_names_aliases_case_insensitively(tmp_path: Path) -> None:
    names = ["immune cells", "Lymphocytes", "MUSCLE", "muscle", " Other "]  # qupath_name, alias, name, padding
    path = collection(tmp_path / "a.geojson", [feature(square(8 * i, 0, 4), n) for i, n in enumerate(names)])
    assert read_qupath_geojson(path, CLASSES)["class_index"].tolist() == [1, 1, 2, 2, 0]


def test_read_bare_list_qupath_02_colorrgb(tmp_path: Path) -> None:
    """QuPath 0.2: a bare list of features, id names the object type, classification has colorRGB."""
    features = [
        {
            "type": "Feature",
            "id": "PathDetectionObject",
            "geometry": {"type": "Polygon", "coordinates": square(0, 0, 4)},
            "properties": {"classification": {"name": "Immune cells", "colorRGB": -6262624}, "isLocked": False},
        }
    ]
    annotations = read_qupath_geojson(write_json(tmp_path / "a.json", features), CLASSES)
    assert annotations["class_index"].tolist() == [1]
    assert annotations.geometry.iloc[0].area == 16


@pytest.mark.parametrize("where", ["feature", "properties"])
def test_read_cell_objects_use_nucleus_geometry(tmp_path: Path, where: str) -> None:
    """A cell 0..20 whose nucleus is the square 5..9; the nucleus is kept wherever QuPath put it."""
    cell = feature(square(0, 0, 20), "Muscle")
    cell["properties"]["objectType"] = "cell"
    nucleus = {"type": "Polygon", "coordinates": square(5, 5, 4)}
    (cell if where == "feature" else cell["properties"])["nucleusGeometry"] = nucleus
    annotations = read_qupath_geojson(collection(tmp_path / "a.geojson", [cell]), CLASSES)
    assert annotations.geometry.iloc[0].equals(shapely.box(5, 5, 9, 9))


def test_read_multipolygon_and_derived_class_names(tmp_path: Path) -> None:
    parts = [square(0, 0, 4), square(10, 10, 2)]
    f = feature(parts, kind="MultiPolygon")
    f["properties"]["classification"] = {"names": ["Immune cells"], "color": [0, 0, 0]}
    annotations = read_qupath_geojson(collection(tmp_path / "a.geojson", [f]), CLASSES)
    geometry = annotations.geometry.iloc[0]
    assert geometry.geom_type == "MultiPolygon"
    assert geometry.area == 20
    assert annotations["class_index"].tolist() == [1]


def test_read_geometry_collection_keeps_polygonal_parts(tmp_path: Path) -> None:
    geometry = {
        "type": "GeometryCollection",
        "geometries": [{"type": "Point", "coordinates": [50, 50]}, {"type": "Polygon", "coordinates": square(0, 0, 4)}],
    }
    f = feature(None)
    f["geometry"] = geometry
    annotations = read_qupath_geojson(collection(tmp_path / "a.geojson", [f]), CLASSES)
    assert annotations.geometry.iloc[0].equals(shapely.box(0, 0, 4, 4))


def test_read_cell_without_nucleus_uses_cell_boundary_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cell = feature(square(0, 0, 20))
    cell["properties"]["objectType"] = "cell"
    with caplog.at_level(logging.WARNING):
        annotations = read_qupath_geojson(collection(tmp_path / "a.geojson", [cell]), CLASSES)
    assert annotations.geometry.iloc[0].area == 400
    assert "1 cell objects have no nucleusGeometry" in caplog.text


def test_read_keeps_points_apart_and_skips_lines_and_missing_geometry_with_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    features = [
        feature([1.0, 2.0], kind="Point", name="Muscle"),
        feature(square(0, 0, 4)),
        feature([[0, 0], [5, 5]], kind="LineString"),
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Other"}}},
        feature([[7.0, 8.0], [9.0, 10.0]], kind="MultiPoint", name="Immune cells"),
    ]
    path = collection(tmp_path / "a.geojson", features)
    with caplog.at_level(logging.WARNING):
        annotations = read_qupath_annotations(path, CLASSES)
    assert annotations.nuclei["feature_index"].tolist() == [1]
    assert annotations.points["feature_index"].tolist() == [0, 4, 4]
    assert annotations.points["class_index"].tolist() == [2, 1, 1]
    assert [(p.x, p.y) for p in annotations.points.geometry] == [(1, 2), (7, 8), (9, 10)]
    assert "skipped 1 LineString features (nuclei are polygons or points): 2" in caplog.text
    assert "skipped 1 features without geometry: 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_qupath_geojson(path, CLASSES)["feature_index"].tolist() == [1]
    assert "3 point labels are not drawn into masks" in caplog.text


def test_read_repairs_self_intersecting_polygon_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bow-tie 0,0 -> 4,4 -> 4,0 -> 0,4 is two triangles of area 4 each once repaired."""
    bowtie = [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]
    path = collection(tmp_path / "a.geojson", [feature(square(10, 10, 2)), feature(bowtie, "Muscle")])
    with caplog.at_level(logging.WARNING):
        annotations = read_qupath_geojson(path, CLASSES)
    repaired = annotations.geometry.iloc[1]
    assert repaired.is_valid
    assert repaired.geom_type == "MultiPolygon"
    assert repaired.area == pytest.approx(8)
    assert "repaired 1 self-intersecting" in caplog.text
    assert "feature 1" in caplog.text


def test_read_drops_degenerate_polygon_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flat = [[[0, 0], [4, 0], [8, 0], [0, 0]]]  # zero area: repairs to a line, nothing polygonal left
    path = collection(tmp_path / "a.geojson", [feature(flat), feature(square(0, 0, 4))])
    with caplog.at_level(logging.WARNING):
        annotations = read_qupath_geojson(path, CLASSES)
    assert annotations["feature_index"].tolist() == [1]
    assert "dropped 1 empty or zero-area polygons: feature 0" in caplog.text


def test_read_3d_coordinates_are_flattened(tmp_path: Path) -> None:
    ring = [[x, y, 7.0] for x, y in square(0, 0, 4)[0]]
    annotations = read_qupath_geojson(collection(tmp_path / "a.geojson", [feature([ring])]), CLASSES)
    assert not annotations.geometry.iloc[0].has_z
    assert annotations.geometry.iloc[0].equals(shapely.box(0, 0, 4, 4))


# --------------------------------------------------------------------------- reading: errors


def test_read_not_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.geojson"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"a\.geojson: not valid JSON .*Export objects as GeoJSON"):
        read_qupath_geojson(path, CLASSES)


def test_read_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="does not exist; check its path in the slide sheet"):
        read_qupath_geojson(tmp_path / "missing.geojson", CLASSES)


def test_read_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="cannot read the annotation file"):
        read_qupath_geojson(tmp_path, CLASSES)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "Polygon", "coordinates": square(0, 0, 4)}, "not GeoJSON: expected a FeatureCollection.*'Polygon'"),
        ({"objects": []}, "not GeoJSON: expected a FeatureCollection.*None"),
        ({"type": "FeatureCollection", "features": 3}, "has no 'features' list"),
        ([{"type": "Polygon"}], "not GeoJSON: feature 0 is a 'Polygon', not a 'Feature'"),
        (42, "not GeoJSON.*'int'"),
    ],
)
def test_read_not_geojson_raises(tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises(AnnotationError, match=message):
        read_qupath_geojson(write_json(tmp_path / "a.geojson", data), CLASSES)


@pytest.mark.parametrize("data", [{"type": "FeatureCollection", "features": []}, []])
def test_read_empty_collection_raises(tmp_path: Path, data: Any) -> None:
    with pytest.raises(AnnotationError, match="no features; export the detections from QuPath"):
        read_qupath_geojson(write_json(tmp_path / "a.geojson", data), CLASSES)


@pytest.mark.parametrize("data", [{"type": "FeatureCollection", "features": []}, []])
def test_read_empty_collection_allowed_gives_an_empty_frame(tmp_path: Path, data: Any) -> None:
    frame = read_qupath_geojson(write_json(tmp_path / "a.geojson", data), CLASSES, allow_empty=True)
    assert frame.empty
    assert list(frame.columns) == ["class_index", "feature_index", "geometry"]


def test_read_unknown_class_lists_expected_names_and_fix(tmp_path: Path) -> None:
    features = [feature(square(0, 0, 4)), feature(square(8, 0, 4), "Tumour"), feature(square(16, 0, 4), "Tumour")]
    with pytest.raises(AnnotationError) as info:
        read_qupath_geojson(collection(tmp_path / "a.geojson", features), CLASSES)
    message = str(info.value)
    assert "unknown class 'Tumour' (feature 1, 2)" in message
    assert "'Other', 'Immune cells', 'Muscle'" in message
    assert "classes: in workflow_config.yaml" in message
    assert "qupath_name" in message and "aliases" in message


@pytest.mark.parametrize(
    "properties",
    [{"objectType": "detection"}, {"classification": None}, {"classification": {"color": [1, 2, 3]}}, None],
)
def test_read_missing_classification_raises_when_asked(tmp_path: Path, properties: Any) -> None:
    bad = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(8, 0, 4)}, "properties": properties}
    path = collection(tmp_path / "a.geojson", [feature(square(0, 0, 4)), bad])
    with pytest.raises(AnnotationError, match=r"a\.geojson: feature 1 \(1 in all\) has no classification; classify"):
        read_qupath_geojson(path, CLASSES, options=AnnotationOptions(unclassified="error"))
    assert read_qupath_geojson(path, CLASSES)["feature_index"].tolist() == [0]


def test_read_only_lines_raises(tmp_path: Path) -> None:
    features = [feature([[0, 0], [1, 1]], kind="LineString"), feature([[0, 0], [2, 1]], kind="LineString")]
    with pytest.raises(AnnotationError, match="no usable nucleus polygon or point among 2 features \\(2 lines"):
        read_qupath_annotations(collection(tmp_path / "a.geojson", features), CLASSES)


def test_read_only_points_gives_points_but_no_masks(tmp_path: Path) -> None:
    path = collection(tmp_path / "a.geojson", [feature([1.0, 2.0], kind="Point"), feature([3.0, 4.0], kind="Point")])
    assert len(read_qupath_annotations(path, CLASSES).points) == 2
    with pytest.raises(AnnotationError, match="a\\.geojson: holds 2 point labels and no nucleus polygon"):
        read_qupath_geojson(path, CLASSES)


def test_read_malformed_coordinates_names_feature(tmp_path: Path) -> None:
    features = [feature(square(0, 0, 4)), feature([[["a", 0], [1, 1], [0, 1], ["a", 0]]])]
    with pytest.raises(AnnotationError, match="feature 1 has malformed Polygon coordinates"):
        read_qupath_geojson(collection(tmp_path / "a.geojson", features), CLASSES)


def test_read_unknown_geometry_type_raises(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="feature 0 has unknown geometry type 'Circle'"):
        read_qupath_geojson(collection(tmp_path / "a.geojson", [feature([0, 0], kind="Circle")]), CLASSES)


def test_class_lookup_rejects_names_shared_by_two_classes() -> None:
    classes = (ClassSpec("a", "Tumor", (0, 0, 0)), ClassSpec("b", "Stroma", (0, 0, 0), aliases=("tumor",)))
    with pytest.raises(ValueError, match="'tumor' is used by classes 'a' and 'b'"):
        class_lookup(classes)


# --------------------------------------------------------------------------- slide fit


def test_check_annotations_fit_accepts_nuclei_crossing_the_edge() -> None:
    """Nuclei inside a 100x80 slide, one crossing its right edge (centroid still inside)."""
    annotations = frame([shapely.box(10, 10, 20, 20), shapely.box(95, 40, 103, 48)], [0, 1])
    check_annotations_fit(annotations, 100, 80, "a.geojson")


def test_check_annotations_fit_rejects_annotations_of_another_slide() -> None:
    annotations = frame([shapely.box(x, 500, x + 8, 508) for x in range(0, 400, 10)], [0] * 40)
    with pytest.raises(AnnotationError, match=r"a\.geojson: 40 of 40 nuclei .* probably belongs to another slide"):
        check_annotations_fit(annotations, 1000, 300, "a.geojson")


def test_check_annotations_fit_tolerates_a_few_strays(caplog: pytest.LogCaptureFixture) -> None:
    """200 nuclei inside a 1000x1000 slide plus one far outside (0.5% <= 1%)."""
    polygons = [shapely.box(x, x, x + 4, x + 4) for x in range(0, 1000, 5)] + [shapely.box(5000, 5000, 5004, 5004)]
    with caplog.at_level(logging.WARNING):
        check_annotations_fit(frame(polygons, [0] * len(polygons)), 1000, 1000, "a.geojson")
    assert "1 nuclei lie outside the slide" in caplog.text


# --------------------------------------------------------------------------- rasterization


@pytest.mark.parametrize(("level", "expected"), [(0, 16 * 16), (1, 8 * 8), (2, 4 * 4)])
def test_rasterize_square_has_exact_pixel_count_per_level(level: int, expected: int) -> None:
    """A 16x16 square at level-0 (24, 8) inside a fragment at (16, 0); corners are multiples of 4."""
    fragment = Fragment("f000", x=16, y=0, width=64, height=40)
    masks = rasterize_fragment(frame([shapely.box(24, 8, 40, 24)], [1]), fragment, level, 3)
    assert masks.shape == (*fragment.shape_at(level), 3)
    assert masks.dtype == np.uint8
    assert masks[:, :, 1].sum() == expected
    assert masks[:, :, [0, 2]].sum() == 0
    d = 2**level
    rows, cols = np.nonzero(masks[:, :, 1])
    # Fragment pixels: (24 - 16) / d .. (40 - 16) / d columns, 8 / d .. 24 / d rows.
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (8 // d, 24 // d, 8 // d, 24 // d)


def test_rasterize_hole_stays_empty() -> None:
    """A 20x20 square with a 8x8 hole: 400 - 64 = 336 pixels at level 0."""
    polygon = shapely.Polygon(shapely.box(0, 0, 20, 20).exterior.coords, [shapely.box(4, 4, 12, 12).exterior.coords])
    masks = rasterize_fragment(frame([polygon], [0]), Fragment("f000", 0, 0, 32, 32), 0, 3)
    assert masks[:, :, 0].sum() == 336
    assert masks[4:12, 4:12, 0].sum() == 0


def test_rasterize_overlap_of_two_classes_sets_both_channels() -> None:
    """Other 0..8 and Muscle 4..12 (x), both 0..8 (y): the 4x8 overlap is set in both channels."""
    annotations = frame([shapely.box(0, 0, 8, 8), shapely.box(4, 0, 12, 8)], [0, 2])
    masks = rasterize_fragment(annotations, Fragment("f000", 0, 0, 16, 16), 0, 3)
    assert masks[:, :, 0].sum() == 64
    assert masks[:, :, 2].sum() == 64
    assert (masks[:, :, 0] & masks[:, :, 2]).sum() == 32
    assert masks[:8, 4:8, [0, 2]].all()


def test_rasterize_same_class_overlap_is_binary() -> None:
    annotations = frame([shapely.box(0, 0, 8, 8), shapely.box(4, 4, 12, 12)], [1, 1])
    masks = rasterize_fragment(annotations, Fragment("f000", 0, 0, 16, 16), 0, 3)
    assert masks.max() == 1
    assert masks[:, :, 1].sum() == 64 + 64 - 16


def test_rasterize_clips_nucleus_crossing_fragment_edge() -> None:
    """Fragment 100..120 x 50..70; the square 96..108 x 60..64 keeps only its 8x4 part inside."""
    fragment = Fragment("f000", 100, 50, 20, 20)
    outside = shapely.box(0, 0, 10, 10)  # far away: must not appear anywhere
    masks = rasterize_fragment(frame([shapely.box(96, 60, 108, 64), outside], [0, 1]), fragment, 0, 3)
    assert masks[:, :, 0].sum() == 8 * 4
    assert masks[10:14, 0:8, 0].all()
    assert masks[:, :, 1].sum() == 0


def test_rasterize_multipolygon_burns_every_part() -> None:
    multipolygon = shapely.MultiPolygon([shapely.box(0, 0, 4, 4), shapely.box(8, 8, 16, 16)])
    masks = rasterize_fragment(frame([multipolygon], [2]), Fragment("f000", 0, 0, 16, 16), 1, 3)
    assert masks[:, :, 2].sum() == 2 * 2 + 4 * 4


def test_rasterize_without_nuclei_gives_zeros() -> None:
    masks = rasterize_fragment(frame([], []), Fragment("f000", 0, 0, 10, 7), 2, 3)
    assert masks.shape == (2, 3, 3)
    assert not masks.any()


def test_rasterize_rejects_class_index_beyond_n_classes() -> None:
    with pytest.raises(ValueError, match="class_index 2 is out of range for 2 classes"):
        rasterize_fragment(frame([shapely.box(0, 0, 4, 4)], [2]), Fragment("f000", 0, 0, 8, 8), 0, 2)


@settings(max_examples=40, deadline=None)
@given(
    corners=st.lists(st.integers(-8, 40), min_size=4, max_size=4),
    origin=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    size=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    level=st.sampled_from([0, 1, 2]),
)
def test_rasterize_rectangle_sets_exactly_the_pixels_whose_centres_are_inside(
    corners: list[int], origin: tuple[int, int], size: tuple[int, int], level: int
) -> None:
    """Corners and fragment origin on multiples of 4, so no pixel centre lies on an edge at any level."""
    x0, x1 = sorted(4 * c for c in corners[:2])
    y0, y1 = sorted(4 * c for c in corners[2:])
    if x0 == x1 or y0 == y1:
        x1, y1 = x0 + 4, y0 + 4
    fragment = Fragment("f000", 4 * origin[0], 4 * origin[1], size[0], size[1])
    masks = rasterize_fragment(frame([shapely.box(x0, y0, x1, y1)], [0]), fragment, level, 1)
    d = 2**level
    height, width = fragment.shape_at(level)
    cx = fragment.x + d * (np.arange(width) + 0.5)
    cy = fragment.y + d * (np.arange(height) + 0.5)
    expected = ((cy > y0) & (cy < y1))[:, None] & ((cx > x0) & (cx < x1))[None, :]
    np.testing.assert_array_equal(masks[:, :, 0], expected.astype(np.uint8))


# --------------------------------------------------------------------------- mask store


@pytest.fixture
def fragment_store(tmp_path: Path) -> Path:
    """Fragment store of slide "s1" with f000 = (0, 0, 37 x 30) and f001 = (100, 60, 64 x 48) (blank pixels)."""
    path = tmp_path / "fragments.h5"
    fragments = [Fragment("f000", 0, 0, 37, 30), Fragment("f001", 100, 60, 64, 48)]
    with FragmentStoreWriter(path, slide="s1", source="s1.tiff", stain="raw", mpp=0.5) as writer:
        for fragment in fragments:
            for level in (0, 1, 2):
                writer.create_level(fragment, level)
    return path


@pytest.fixture
def annotation_files(tmp_path: Path) -> dict[str, Path]:
    """Two sets: "ssa" with an Other square 8x8 in f000 and an Immune square 16x16 in f001; "ea" all Muscle."""
    ssa = collection(
        tmp_path / "ssa.geojson", [feature(square(4, 4, 8), "Other"), feature(square(120, 80, 16), "Immune cells")]
    )
    ea = collection(
        tmp_path / "ea.geojson", [feature(square(4, 4, 8), "Muscle"), feature(square(120, 80, 16), "Muscle")]
    )
    return {"ssa": ssa, "ea": ea}


def test_write_mask_store_matches_fragment_levels(
    tmp_path: Path, fragment_store: Path, annotation_files: dict[str, Path]
) -> None:
    out = tmp_path / "masks.h5"
    write_mask_store(fragment_store, annotation_files, CLASSES, out, slide_size=(200, 200))
    with h5py.File(out, "r") as h5, h5py.File(fragment_store, "r") as fragments:
        assert h5.attrs["complete"]
        assert h5.attrs["slide"] == "s1"
        assert list(h5.attrs["classes"]) == ["other", "immune", "muscle"]
        assert list(h5.attrs["annotation_sets"]) == ["ssa", "ea"]
        for name in ("f000", "f001"):
            for level in (0, 1, 2):
                image_shape = fragments[f"fragments/{name}/level{level}"].shape[:2]
                for set_name in ("ssa", "ea"):
                    ds = h5[f"fragments/{name}/{set_name}/level{level}"]
                    assert ds.shape == (*image_shape, 3)
                    assert ds.dtype == np.uint8
                    assert is_compressed(ds)
                    assert ds.chunks is not None
        assert h5["fragments/f000/ssa/level0"][:, :, 0].sum() == 64
        assert h5["fragments/f001/ssa/level1"][:, :, 1].sum() == 64
        assert h5["fragments/f001/ssa/level0"][:, :, 0].sum() == 0
        assert h5["fragments/f001/ea/level2"][:, :, 2].sum() == 16
        assert h5["fragments/f001"].attrs["x"] == 100


def test_write_mask_store_bands_equal_whole_fragment_rasterization(
    tmp_path: Path, fragment_store: Path, annotation_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny memory budget and CHUNK = 8, every level is written in several bands of 8 rows."""
    annotations = read_qupath_geojson(annotation_files["ssa"], CLASSES)
    fragments = (Fragment("f000", 0, 0, 37, 30), Fragment("f001", 100, 60, 64, 48))
    expected = {(f.name, k): rasterize_fragment(annotations, f, k, 3) for f in fragments for k in (0, 1, 2)}
    monkeypatch.setattr(rasterize_module, "BAND_BYTES", 1)
    monkeypatch.setattr(rasterize_module, "CHUNK", 8)
    out = tmp_path / "masks.h5"
    write_mask_store(fragment_store, {"ssa": annotation_files["ssa"]}, CLASSES, out)
    with h5py.File(out, "r") as h5:
        assert h5["fragments/f001/ssa/level0"].chunks == (8, 8, 3)
        for (name, level), masks in expected.items():
            np.testing.assert_array_equal(h5[f"fragments/{name}/ssa/level{level}"][:], masks)


def test_write_mask_store_rejects_geojson_of_another_slide(
    tmp_path: Path, fragment_store: Path, annotation_files: dict[str, Path]
) -> None:
    out = tmp_path / "masks.h5"
    with pytest.raises(AnnotationError, match="probably belongs to another slide"):
        write_mask_store(fragment_store, annotation_files, CLASSES, out, slide_size=(50, 50))
    assert not out.exists()


def test_write_mask_store_sets_large_annotation_regions_aside(tmp_path: Path, fragment_store: Path) -> None:
    """A 30x25 px unclassified "annotation" outline around f000 (187.5 µm² at 0.5 µm/px) is a region above
    100 µm², so only the 8x8 nucleus inside it is drawn; a second file's unknown class is ignored on request."""
    outline = feature(square(2, 2, 25), name=None)
    outline["properties"]["objectType"] = "annotation"
    nucleus = feature(square(4, 4, 8), "Other")
    unknown = feature(square(12, 12, 4), "Tumor")
    path = collection(tmp_path / "ssa.geojson", [outline, nucleus, unknown])
    options = AnnotationOptions(unknown_classes="ignore", max_nucleus_area_um2=100)
    out = tmp_path / "masks.h5"
    write_mask_store(fragment_store, {"ssa": path}, CLASSES, out, options=options, mpp=0.5)
    with h5py.File(out, "r") as h5:
        assert h5["fragments/f000/ssa/level0"][:, :, 0].sum() == 64
        assert h5["fragments/f000/ssa/level0"][:].sum() == 64
    with pytest.raises(AnnotationError, match="unknown class 'Tumor'"):
        write_mask_store(fragment_store, {"ssa": path}, CLASSES, out, mpp=0.5)


def test_write_mask_store_rejects_bad_set_name(tmp_path: Path, fragment_store: Path, annotation_files: dict) -> None:
    with pytest.raises(ValueError, match="contain no '/'"):
        write_mask_store(fragment_store, {"a/b": annotation_files["ssa"]}, CLASSES, tmp_path / "m.h5")


# --------------------------------------------------------------------------- writing GeoJSON


def test_write_qupath_geojson_round_trips_and_is_qupath_shaped(tmp_path: Path) -> None:
    """Three detections: an Other square, an Immune square with a hole, a Muscle square; one NaN measurement."""
    with_hole = shapely.Polygon(shapely.box(20, 0, 40, 20).exterior.coords, [shapely.box(24, 4, 28, 8).exterior.coords])
    polygons = [shapely.box(0, 0, 10, 10), with_hole, shapely.box(50, 50, 54, 58)]
    path = tmp_path / "out" / "pred.geojson"
    probability = np.array([0.9, np.nan, 0.5])
    write_qupath_geojson(path, polygons, np.array([0, 1, 2]), CLASSES, measurements={"probability": probability})

    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    assert [f["properties"]["objectType"] for f in data["features"]] == ["detection"] * 3
    assert data["features"][1]["properties"]["classification"] == {"name": "Immune cells", "color": [160, 90, 160]}
    assert data["features"][0]["properties"]["measurements"] == {"probability": 0.9}
    assert data["features"][1]["properties"]["measurements"] == {}  # NaN left out: QuPath shows NaN
    for f in data["features"]:
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
    assert len(data["features"][1]["geometry"]["coordinates"]) == 2

    annotations = read_qupath_geojson(path, CLASSES)
    assert annotations["class_index"].tolist() == [0, 1, 2]
    assert all(a.equals(b) for a, b in zip(annotations.geometry, polygons, strict=True))


def test_write_qupath_geojson_without_measurements_accepts_geoseries(tmp_path: Path) -> None:
    path = tmp_path / "pred.geojson"
    write_qupath_geojson(path, gpd.GeoSeries([shapely.box(0, 0, 2, 2)]), [1], CLASSES)
    feature_ = json.loads(path.read_text(encoding="utf-8"))["features"][0]
    assert "measurements" not in feature_["properties"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("class_indices", "measurements", "message"),
    [
        ([0], None, "class_indices must be 2 integers"),
        ([0, 3], None, r"class_indices must lie in 0\.\.2"),
        ([0.0, 1.0], None, "class_indices must be 2 integers"),
        ([0, 1], {"area": [1.0]}, r"measurement 'area' must have shape \(2,\)"),
    ],
)
def test_write_qupath_geojson_rejects_bad_input(
    tmp_path: Path, class_indices: list[Any], measurements: dict | None, message: str
) -> None:
    polygons = [shapely.box(0, 0, 2, 2), shapely.box(4, 4, 6, 6)]
    with pytest.raises(ValueError, match=message):
        write_qupath_geojson(tmp_path / "p.geojson", polygons, np.asarray(class_indices), CLASSES, measurements)
    assert not (tmp_path / "p.geojson").exists()


def test_write_qupath_geojson_writes_the_known_text(tmp_path: Path) -> None:
    """The exact bytes of a tiny file: one feature per line, compact JSON, non-finite measurements left out."""
    path = tmp_path / "pred.geojson"
    boxes = [shapely.box(0, 0, 2, 2), shapely.box(4, 4, 6, 5)]
    write_qupath_geojson(path, boxes, [2, 0], CLASSES, {"p": [0.5, np.nan]}, object_type="cell")
    square = '{"type":"Polygon","coordinates":[[[2.0,0.0],[2.0,2.0],[0.0,2.0],[0.0,0.0],[2.0,0.0]]]}'
    box = '{"type":"Polygon","coordinates":[[[6.0,4.0],[6.0,5.0],[4.0,5.0],[4.0,4.0],[6.0,4.0]]]}'
    assert path.read_bytes().decode("utf-8") == (
        '{"type":"FeatureCollection","features":[\n'
        f'{{"type":"Feature","geometry":{square},"nucleusGeometry":{square},"properties":{{"objectType":"cell",'
        '"classification":{"name": "Muscle", "color": [200, 0, 0]},"measurements":{"p": 0.5}}},\n'
        f'{{"type":"Feature","geometry":{box},"nucleusGeometry":{box},"properties":{{"objectType":"cell",'
        '"classification":{"name": "Other", "color": [0, 160, 0]},"measurements":{}}}\n'
        "]}\n"
    )
    write_qupath_geojson(tmp_path / "empty.geojson", [], np.zeros(0, dtype=np.int64), CLASSES)
    assert (tmp_path / "empty.geojson").read_text(
        encoding="utf-8"
    ) == '{"type":"FeatureCollection","features":[\n\n]}\n'


@pytest.mark.parametrize("sizes", [(7,), (1,) * 7, (3, 0, 4), (0, 2, 5, 0)])
def test_streamed_geojson_is_byte_identical_to_one_write(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    """Chunks (empty ones too) written through open_qupath_geojson give the file of one write_qupath_geojson call."""
    rng = np.random.default_rng(1)
    polygons = [shapely.box(x, y, x + w, y + w) for x, y, w in rng.uniform(0, 100, size=(7, 3)).round(2)]
    labels = rng.integers(0, len(CLASSES), size=7)
    measurements = {"area": rng.uniform(0, 50, size=7), "p": np.where(np.arange(7) == 3, np.nan, 0.25)}
    whole = tmp_path / "whole.geojson"
    write_qupath_geojson(whole, polygons, labels, CLASSES, measurements)
    streamed = tmp_path / "streamed.geojson"
    with open_qupath_geojson(streamed, CLASSES) as writer:
        start = 0
        for size in sizes:
            rows = slice(start, start + size)
            writer.write(polygons[rows], labels[rows], {k: v[rows] for k, v in measurements.items()})
            start += size
    assert writer.count == 7
    assert streamed.read_bytes() == whole.read_bytes()
    assert len(json.loads(whole.read_text(encoding="utf-8"))["features"]) == 7


def test_a_failure_mid_stream_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "pred.geojson"
    path.write_text("the previous run's file", encoding="utf-8")
    with pytest.raises(ValueError, match=r"class_indices must lie in 0\.\.2"), open_qupath_geojson(path, CLASSES) as w:
        w.write([shapely.box(0, 0, 2, 2)], [1])  # a first chunk reaches the temporary file...
        w.write([shapely.box(4, 4, 6, 6)], [5])  # ...then a bad one stops the job
    assert path.read_text(encoding="utf-8") == "the previous run's file"
    assert list(tmp_path.iterdir()) == [path]  # the partial temporary file is gone
    with pytest.raises(ValueError, match="object_type must be 'detection' or 'cell'"):
        open_qupath_geojson(tmp_path / "other.geojson", CLASSES, "annotation").__enter__()
    assert list(tmp_path.iterdir()) == [path]
