"""Tests for cellkd.predict: classified nuclei exported as QuPath GeoJSON and read back as annotations."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import cellkd.predict as predict_module
from cellkd.annotations import read_qupath_geojson, write_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES, ClassSpec
from cellkd.errors import AnnotationError, ConfigError
from cellkd.nuclei import extract_nuclei
from cellkd.predict import BACKGROUND_CLASS, export_predictions
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import Fragment, FragmentStoreWriter, SlideGeometry
from cellkd.store.nuclei import NucleiStore
from cellkd.types import DOWNSAMPLES

CLASSES = DEFAULT_CLASSES  # Other 0, Immune cells 1, Muscle 2; background 3
OTHER, IMMUNE, MUSCLE, BACKGROUND = 0, 1, 2, 3
FRAGMENT = Fragment("f000", 100, 50, 64, 48)
"""One fragment: level-0 box x 100..164, y 50..98."""


def write_nuclei_store(folder: Path, mask: np.ndarray) -> Path:
    """Nuclei store of slide s1 whose predicted level-0 mask of ``FRAGMENT`` is ``mask`` (48, 64); no labels."""
    fragments = folder / "f.h5"
    with FragmentStoreWriter(
        fragments, slide="s1", source="s1.tiff", stain="raw", mpp=0.5, slide_size=(400, 200)
    ) as writer:
        for level in range(len(DOWNSAMPLES)):
            writer.create_level(FRAGMENT, level)[:] = 200
    predicted = folder / "p.h5"
    with atomic_h5(predicted) as h5:
        h5.attrs.update({"slide": "s1", "stain": "raw", "level": 0})
        group = h5.require_group(f"fragments/{FRAGMENT.name}")
        group.attrs.update({"x": FRAGMENT.x, "y": FRAGMENT.y, "width": FRAGMENT.width, "height": FRAGMENT.height})
        group["level0"] = mask.astype(np.uint8)
    out = folder / "nuclei.h5"
    extract_nuclei(predicted, fragments, {}, CLASSES, out)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Nuclei store with 4 nuclei, rows in centroid order (y, x), slide px:

    0: square x 104..110, y 52..58 (area 36)
    1: 8x8 ring x 120..128, y 60..68 with a 2x2 hole x 123..125, y 63..65 (area 60)
    2: square x 140..144, y 70..74 (area 16)
    3: 5x3 box x 110..115, y 85..88 (area 15)
    """
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[2:8, 4:10] = 1
    mask[10:18, 20:28] = 1
    mask[13:15, 23:25] = 0
    mask[20:24, 40:44] = 1
    mask[35:38, 10:15] = 1
    return write_nuclei_store(tmp_path, mask)


EXPECTED = [
    shapely.box(104, 52, 110, 58),
    shapely.box(120, 60, 128, 68).difference(shapely.box(123, 63, 125, 65)),
    shapely.box(140, 70, 144, 74),
    shapely.box(110, 85, 115, 88),
]
"""The outlines of the ``store`` fixture's rows."""
PROBABILITIES = np.array(
    [
        [0.1, 0.7, 0.1, 0.1],  # immune
        [0.2, 0.1, 0.1, 0.6],  # background
        [0.5, 0.2, 0.2, 0.1],  # other
        [0.1, 0.1, 0.45, 0.35],  # muscle
    ]
)
"""Softmax rows for the 4 nuclei: predicted immune, background, other, muscle."""


def test_export_reads_back_as_annotation_with_the_same_polygons_and_classes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "predict" / "s1.geojson"
    assert export_predictions(store, PROBABILITIES, CLASSES, out) == 3
    frame = read_qupath_geojson(out, CLASSES)
    assert frame["class_index"].tolist() == [IMMUNE, OTHER, MUSCLE]  # the background nucleus (row 1) left out
    polygons = list(frame.geometry)
    expected = [EXPECTED[0], EXPECTED[2], EXPECTED[3]]
    np.testing.assert_allclose([p.area for p in polygons], [e.area for e in expected], rtol=1e-6)
    assert all(p.geom_type == "Polygon" and p.equals(e) for p, e in zip(polygons, expected, strict=True))


def test_export_is_a_feature_collection_of_classified_detections(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.geojson"
    export_predictions(store, PROBABILITIES, CLASSES, out, include_background=True)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    for feature, probs, expected in zip(data["features"], PROBABILITIES, EXPECTED, strict=True):
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "detection"
        rings = feature["geometry"]["coordinates"]
        assert all(ring[0] == ring[-1] for ring in rings)  # closed rings, as GeoJSON requires
        assert shapely.geometry.shape(feature["geometry"]).equals(expected)
        assert feature["properties"]["measurements"] == {
            "Area px": expected.area,
            "Class probability": probs.max(),
            "P(Other)": probs[0],
            "P(Immune cells)": probs[1],
            "P(Muscle)": probs[2],
            "P(Background)": probs[3],
        }
    classifications = [f["properties"]["classification"] for f in data["features"]]
    assert classifications == [
        {"name": "Immune cells", "color": [160, 90, 160]},
        {"name": "Background", "color": [128, 128, 128]},
        {"name": "Other", "color": [0, 160, 0]},
        {"name": "Muscle", "color": [200, 0, 0]},
    ]
    assert len(data["features"][1]["geometry"]["coordinates"]) == 2  # the ring nucleus keeps its hole


def test_background_detections_need_the_background_class_to_read_back(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.geojson"
    assert export_predictions(store, PROBABILITIES, CLASSES, out, include_background=True) == 4
    with pytest.raises(AnnotationError, match="unknown class 'Background'"):
        read_qupath_geojson(out, CLASSES)
    frame = read_qupath_geojson(out, (*CLASSES, BACKGROUND_CLASS))
    assert frame["class_index"].tolist() == [IMMUNE, BACKGROUND, OTHER, MUSCLE]


def test_export_accepts_an_open_store_and_leaves_it_open(store: Path, tmp_path: Path) -> None:
    with NucleiStore(store) as nuclei:
        assert export_predictions(nuclei, PROBABILITIES, CLASSES, tmp_path / "a.geojson") == 3
        assert len(nuclei.geometries()) == 4  # still readable


@pytest.mark.parametrize("shape", [(4, 3), (3, 4), (4,), (4, 5)])
def test_probabilities_of_the_wrong_shape_raise(store: Path, tmp_path: Path, shape: tuple[int, ...]) -> None:
    out = tmp_path / "s1.geojson"
    with pytest.raises(ValueError, match=r"shape \(N, K\) = \(4, 4\).*got shape"):
        export_predictions(store, np.full(shape, 0.25), CLASSES, out)
    assert not out.exists()


def test_non_finite_probabilities_raise(store: Path, tmp_path: Path) -> None:
    probabilities = PROBABILITIES.copy()
    probabilities[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values in rows \[2\]"):
        export_predictions(store, probabilities, CLASSES, tmp_path / "s1.geojson")


def test_classes_other_than_the_stores_raise(store: Path, tmp_path: Path) -> None:
    classes = (*CLASSES[:2], ClassSpec("stroma", "Stroma", (0, 0, 200)))
    with pytest.raises(ConfigError, match=r"has classes \['other', 'immune', 'muscle', 'background'\]"):
        export_predictions(store, PROBABILITIES, classes, tmp_path / "s1.geojson")


def test_a_class_named_background_conflicts_with_include_background(store: Path, tmp_path: Path) -> None:
    classes = (*CLASSES[:2], ClassSpec("muscle", "Background", (0, 0, 200)))
    export_predictions(store, PROBABILITIES, classes, tmp_path / "a.geojson")  # fine without background nuclei
    with pytest.raises(ConfigError, match="class name 'Background' is used by classes 'muscle' and 'background'"):
        export_predictions(store, PROBABILITIES, classes, tmp_path / "b.geojson", include_background=True)


def test_no_nuclei_gives_an_empty_feature_collection_that_reads_as_no_features(tmp_path: Path) -> None:
    empty = write_nuclei_store(tmp_path, np.zeros((48, 64), dtype=np.uint8))
    out = tmp_path / "s1.geojson"
    assert export_predictions(empty, np.zeros((0, 4)), CLASSES, out) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == {"type": "FeatureCollection", "features": []}
    # read_qupath_geojson documents that a file without features is an error (an empty annotation).
    with pytest.raises(AnnotationError, match="no features"):
        read_qupath_geojson(out, CLASSES)


def test_all_background_gives_an_empty_feature_collection(store: Path, tmp_path: Path) -> None:
    probabilities = np.tile([0.1, 0.1, 0.1, 0.7], (4, 1))
    out = tmp_path / "s1.geojson"
    assert export_predictions(store, probabilities, CLASSES, out) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["features"] == []


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nuclei store with 12 separate 4x4 nuclei on a 3 x 4 grid (rows in raster order)."""
    mask = np.zeros((48, 64), dtype=np.uint8)
    for r in range(3):
        for c in range(4):
            mask[4 + 14 * r : 8 + 14 * r, 4 + 14 * c : 8 + 14 * c] = 1
    return write_nuclei_store(tmp_path_factory.mktemp("grid"), mask)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, (12, 4), elements=st.floats(0, 1)))
def test_round_trip_keeps_the_argmax_of_every_non_background_nucleus(grid_store: Path, probs: np.ndarray) -> None:
    predicted = probs.argmax(axis=1)
    keep = predicted < BACKGROUND
    with TemporaryDirectory() as folder:
        out = Path(folder) / "s.geojson"
        assert export_predictions(grid_store, probs, CLASSES, out) == keep.sum()
        if keep.any():
            frame = read_qupath_geojson(out, CLASSES)
            assert frame["class_index"].tolist() == predicted[keep].tolist()
            with NucleiStore(grid_store) as nuclei:
                outlines = np.asarray(nuclei.geometries(), dtype=object)[keep]
            assert shapely.equals(np.asarray(frame.geometry.values), outlines).all()


def test_area_in_square_microns_is_named_as_qupath_names_it_and_keeps_the_pixel_area(
    store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s1.geojson"
    export_predictions(store, PROBABILITIES, CLASSES, out, include_background=True, mpp=0.5)
    features = json.loads(out.read_text(encoding="utf-8"))["features"]
    for feature, expected in zip(features, EXPECTED, strict=True):
        measurements = feature["properties"]["measurements"]
        assert measurements["Area px"] == expected.area
        assert measurements["Nucleus: Area µm^2"] == pytest.approx(expected.area * 0.25)
        assert "P(Background)" in measurements  # the class probabilities stay


@pytest.mark.parametrize("mpp", [None, float("nan")])
def test_unknown_mpp_leaves_the_square_micron_area_out(store: Path, tmp_path: Path, mpp: float | None) -> None:
    out = tmp_path / "s1.geojson"
    export_predictions(store, PROBABILITIES, CLASSES, out, mpp=mpp)
    for feature in json.loads(out.read_text(encoding="utf-8"))["features"]:
        assert "Nucleus: Area µm^2" not in feature["properties"]["measurements"]


def test_cell_objects_carry_the_nucleus_outline_and_read_back(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.geojson"
    assert export_predictions(store, PROBABILITIES, CLASSES, out, object_type="cell", mpp=0.5) == 3
    features = json.loads(out.read_text(encoding="utf-8"))["features"]
    assert {f["properties"]["objectType"] for f in features} == {"cell"}
    assert all(f["nucleusGeometry"] == f["geometry"] for f in features)
    frame = read_qupath_geojson(out, CLASSES)
    assert frame["class_index"].tolist() == [IMMUNE, OTHER, MUSCLE]
    assert all(p.equals(e) for p, e in zip(frame.geometry, [EXPECTED[0], EXPECTED[2], EXPECTED[3]], strict=True))


def test_unknown_object_type_raises(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="object_type must be 'detection' or 'cell'"):
        export_predictions(store, PROBABILITIES, CLASSES, tmp_path / "s1.geojson", object_type="annotation")


@pytest.mark.parametrize(("chunk", "scale"), [(1, 1.0), (5, 2.0), (12, 0.5)])
def test_streamed_export_is_byte_identical_to_one_write_of_every_nucleus(
    grid_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, scale: float
) -> None:
    """Chunks of ``chunk`` rows (some all background, the last short) give the file of the whole-slide write."""
    probs = np.tile([0.1, 0.1, 0.1, 0.7], (12, 1))
    probs[[0, 2, 3, 7, 10]] = [[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1], [0.1, 0.2, 0.6, 0.1]] + [
        [0.3, 0.3, 0.3, 0.1]
    ] * 2
    geometry = SlideGeometry(0.5 * scale, 0.5, scale)
    monkeypatch.setattr(predict_module, "EXPORT_CHUNK_ROWS", chunk)
    streamed = tmp_path / "streamed.geojson"
    assert export_predictions(grid_store, probs, CLASSES, streamed, geometry=geometry) == 5

    # The whole-slide write that export_predictions did before it streamed: every kept outline at once.
    keep = np.array([0, 2, 3, 7, 10])
    with NucleiStore(grid_store) as nuclei:
        outlines = geometry.geometries_to_slide(np.asarray(nuclei.geometries(), dtype=object)[keep])
        area = nuclei.table()["area"].to_numpy()[keep]
    predicted = probs[keep].argmax(axis=1)
    measurements = {
        "Nucleus: Area µm^2": area * (0.5 * scale) ** 2,
        "Area px": area * scale**2,
        "Class probability": probs[keep].max(axis=1),
        **{f"P({spec.qupath_name})": probs[keep, j] for j, spec in enumerate((*CLASSES, BACKGROUND_CLASS))},
    }
    whole = tmp_path / "whole.geojson"
    write_qupath_geojson(whole, outlines, predicted, CLASSES, measurements)
    assert streamed.read_bytes() == whole.read_bytes()
    assert [f["properties"]["classification"]["name"] for f in json.loads(whole.read_text("utf-8"))["features"]] == [
        "Other", "Immune cells", "Muscle", "Other", "Other"
    ]  # fmt: skip


def test_a_job_killed_mid_export_leaves_no_file(
    grid_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outlines of a second chunk fail to read after the first chunk was written: no file, old one kept."""
    out = tmp_path / "s.geojson"
    out.write_text("the previous run's file", encoding="utf-8")
    read = NucleiStore.geometries

    def fail_after_the_first_chunk(self: NucleiStore, start: int = 0, stop: int | None = None) -> list:
        if start > 0:
            raise KeyboardInterrupt  # as a killed job
        return read(self, start, stop)

    monkeypatch.setattr(predict_module, "EXPORT_CHUNK_ROWS", 4)
    monkeypatch.setattr(NucleiStore, "geometries", fail_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        export_predictions(grid_store, np.tile([0.7, 0.1, 0.1, 0.1], (12, 1)), CLASSES, out)
    assert out.read_text(encoding="utf-8") == "the previous run's file"
    assert list(tmp_path.iterdir()) == [out]


def test_the_store_reads_outlines_by_row_range(grid_store: Path) -> None:
    with NucleiStore(grid_store) as nuclei:
        every = nuclei.geometries()
        assert len(every) == 12
        parts = [nuclei.geometries(start, min(start + 5, 12)) for start in range(0, 12, 5)]
        assert [len(p) for p in parts] == [5, 5, 2]
        assert all(a.equals(b) for a, b in zip(every, sum(parts, []), strict=True))
        assert nuclei.areas().tolist() == nuclei.table()["area"].tolist() == [16] * 12
