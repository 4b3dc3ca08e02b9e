"""QuPath exports as they really are: streamed decoding, cells, regions, points, class policies, real PUMA files."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

import cellkd.annotations.qupath_decode as decode_module
from cellkd.annotations import (
    AnnotationOptions,
    decode_qupath_geojson,
    label_nuclei_by_points,
    read_qupath_annotations,
    read_qupath_geojson,
)
from cellkd.classes import DEFAULT_CLASSES, classes_from_config
from cellkd.errors import AnnotationError, ConfigError

REPO = Path(__file__).resolve().parents[1]
CLASSES = DEFAULT_CLASSES  # other (0), immune (1), muscle (2); QuPath names "Other", "Immune cells", "Muscle"
NAMES = ("Other", "Immune cells", "Muscle")


def square(x: float, y: float, side: float) -> list[list[list[float]]]:
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def cell(i: int, layout: str = "dict", object_type: str = "cell") -> dict[str, Any]:
    """A QuPath cell ``i``: a 20-px cell around a 4-px nucleus at (30 i, 0), class NAMES[i % 3], 4 measurements."""
    values = {"Nucleus: Area µm^2": 4.0 + i, "Nucleus: Circularity": 0.9, "Cell: Area": 400.0, 'Name "q" }{': 1.0}
    measurements: Any = values if layout == "dict" else [{"name": k, "value": v} for k, v in values.items()]
    return {
        "type": "Feature",
        "id": f"uuid-{i}",
        "geometry": {"type": "Polygon", "coordinates": square(30 * i - 8, -8, 20)},
        "nucleusGeometry": {"type": "Polygon", "coordinates": square(30 * i, 0, 4)},
        "properties": {
            "objectType": object_type,
            "classification": {"name": NAMES[i % 3], "color": [255, 0, 0]},
            "measurements": measurements,
        },
    }


def write(path: Path, data: Any, indent: int | None = None) -> Path:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False), encoding="utf-8")
    return path


def collection(path: Path, features: list[dict[str, Any]], indent: int | None = None) -> Path:
    return write(path, {"type": "FeatureCollection", "features": features}, indent)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 1 KiB, so that a file of a few cells is streamed in many blocks."""
    monkeypatch.setattr(decode_module, "BLOCK_BYTES", 1024)


# --------------------------------------------------------------------------- streamed decoding


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("layout", ["dict", "list"])
def test_streamed_blocks_read_every_cell_nucleus_in_order(
    tmp_path: Path, small_blocks: None, indent: int | None, layout: str
) -> None:
    """60 cells (compact or pretty JSON, QuPath 0.4 dict or 0.2 list measurements) across ~15+ blocks."""
    path = collection(tmp_path / "cells.geojson", [cell(i, layout) for i in range(60)], indent)
    assert path.stat().st_size > 10 * decode_module.BLOCK_BYTES
    nuclei = read_qupath_geojson(path, CLASSES)
    assert nuclei["feature_index"].tolist() == list(range(60))
    assert nuclei["class_index"].tolist() == [i % 3 for i in range(60)]
    assert all(g.equals(shapely.box(30 * i, 0, 30 * i + 4, 4)) for i, g in enumerate(nuclei.geometry))


def test_bare_list_and_trailing_keys_are_read(tmp_path: Path, small_blocks: None) -> None:
    features = [cell(i) for i in range(20)]
    bare = write(tmp_path / "bare.json", features)
    trailing = write(tmp_path / "trailing.geojson", {"type": "FeatureCollection", "features": features, "bbox": [0]})
    key_first = write(tmp_path / "first.geojson", {"bbox": [0], "type": "FeatureCollection", "features": features})
    for path in (bare, trailing, key_first):
        assert read_qupath_geojson(path, CLASSES)["feature_index"].tolist() == list(range(20)), path


def test_a_feature_longer_than_a_block_is_read_whole(tmp_path: Path, small_blocks: None) -> None:
    ring = [[100 + 50 * np.cos(t), 50 + 50 * np.sin(t)] for t in np.linspace(0, 2 * np.pi, 400)]
    big = cell(1)
    big["nucleusGeometry"]["coordinates"] = [ring]
    path = collection(tmp_path / "a.geojson", [cell(0), big, cell(2)])
    nuclei = read_qupath_geojson(path, CLASSES)
    assert nuclei["feature_index"].tolist() == [0, 1, 2]
    assert nuclei.geometry.iloc[1].area == pytest.approx(np.pi * 50**2, rel=0.01)


def test_holes_3d_points_and_multipolygons_in_a_block_are_read(tmp_path: Path) -> None:
    """Polygons outside the bulk path (a hole, 3-D vertices) are built one by one, in file order."""
    hole = cell(0)
    hole["nucleusGeometry"]["coordinates"] = square(0, 0, 10) + [[[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]]
    flat3d = cell(1)
    flat3d["nucleusGeometry"]["coordinates"] = [[[x, y, 5.0] for x, y in square(30, 0, 4)[0]]]
    multi = cell(2)
    multi["nucleusGeometry"] = {"type": "MultiPolygon", "coordinates": [square(60, 0, 4), square(70, 0, 2)]}
    nuclei = read_qupath_geojson(collection(tmp_path / "a.geojson", [hole, flat3d, multi, cell(3)]), CLASSES)
    assert nuclei.geometry.area.tolist() == [96, 16, 20, 16]
    assert not nuclei.geometry.has_z.any()


def test_malformed_json_deep_in_a_streamed_file_names_file_and_byte(tmp_path: Path, small_blocks: None) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": [cell(i) for i in range(40)]})
    broken = text.index('"uuid-30"')
    path = tmp_path / "broken.geojson"
    path.write_text(text[:broken] + "?" + text[broken + 1 :], encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"broken\.geojson: not valid JSON \(.*near byte (\d+)\)") as info:
        read_qupath_geojson(path, CLASSES)
    assert str(broken) in str(info.value)
    assert "Export objects as GeoJSON" in str(info.value)


def test_truncated_export_names_the_file(tmp_path: Path, small_blocks: None) -> None:
    text = json.dumps({"type": "FeatureCollection", "features": [cell(i) for i in range(40)]})
    path = tmp_path / "cut.geojson"
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"cut\.geojson: not valid JSON .*cut short .*export or copy it again"):
        read_qupath_geojson(path, CLASSES)


def test_empty_and_non_utf8_files_say_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "empty.geojson"
    empty.write_bytes(b"")
    with pytest.raises(AnnotationError, match=r"empty\.geojson: not valid JSON .*empty or cut short"):
        read_qupath_geojson(empty, CLASSES)
    # Latin-1: a class name that is not UTF-8 any more ("µm^2" in the skipped measurements is not checked).
    latin1 = tmp_path / "latin1.geojson"
    features = [cell(0), cell(1)]
    features[1]["properties"]["classification"]["name"] = "Immune cells ©"
    write(latin1, {"type": "FeatureCollection", "features": features})
    latin1.write_bytes(latin1.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(AnnotationError, match=r"latin1\.geojson: not valid JSON .*save the file as UTF-8"):
        read_qupath_geojson(latin1, CLASSES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classification": 5}, r"feature 7 has an invalid properties\.classification"),
        ({"nucleusGeometry": [1, 2]}, r"feature 7 has an invalid properties\.nucleusGeometry"),
    ],
)
def test_invalid_field_types_name_the_feature(
    tmp_path: Path, small_blocks: None, change: dict[str, Any], message: str
) -> None:
    features = [cell(i) for i in range(12)]
    features[7]["properties"].update(change)
    with pytest.raises(AnnotationError, match=r"a\.geojson: " + message):
        read_qupath_geojson(collection(tmp_path / "a.geojson", features), CLASSES)


def test_decoded_objects_are_compact_and_typed(tmp_path: Path) -> None:
    features = [cell(0), cell(1, object_type="detection")]
    features[1]["properties"]["classification"] = {"names": ["Immune cells", "Positive"]}
    del features[1]["nucleusGeometry"]
    objects = decode_qupath_geojson(collection(tmp_path / "a.geojson", features))
    assert objects.n_features == 2
    assert objects.class_names == ["Other", "Immune cells: Positive"]
    assert objects.class_code.dtype == np.int32 and objects.object_type.dtype == np.int16
    assert objects.is_object_type("cell").tolist() == [True, False]
    assert objects.is_object_type("detection").tolist() == [False, True]
    assert objects.geometry[1].equals(shapely.box(22, -8, 42, 12))  # a detection's own geometry
    assert objects.cells_without_nucleus == []


# --------------------------------------------------------------------------- object types and QuPath versions


def test_qupath_02_object_types_come_from_the_feature_id(tmp_path: Path) -> None:
    """QuPath 0.2: no objectType; ``id`` names the class, measurements are a list."""
    features = [cell(i, "list") for i in range(3)]
    for f, kind in zip(features, ("PathCellObject", "PathDetectionObject", "PathAnnotationObject"), strict=True):
        f["id"] = kind
        del f["properties"]["objectType"]
    objects = decode_qupath_geojson(write(tmp_path / "a.json", features))
    assert [objects.object_types[t] for t in objects.object_type] == ["cell", "detection", "annotation"]


def test_cell_nucleus_geometry_is_used_and_regions_need_the_resolution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 400x400 px annotation (10,000 µm² at 0.25 µm/px) is a region; a detection of that size is not."""
    region = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": square(0, 100, 400)},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    small_annotation = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": square(500, 0, 40)},  # 100 µm²: a nucleus
        "properties": {"objectType": "annotation", "classification": {"name": "Muscle"}},
    }
    big_detection = cell(4, object_type="detection")
    del big_detection["nucleusGeometry"]
    big_detection["geometry"]["coordinates"] = square(0, 600, 400)
    path = collection(tmp_path / "a.geojson", [cell(0), region, small_annotation, big_detection])
    with caplog.at_level(logging.INFO):
        nuclei = read_qupath_geojson(path, CLASSES, mpp=0.25)
    assert nuclei["feature_index"].tolist() == [0, 2, 3]
    assert nuclei.geometry.area.tolist() == [16, 1600, 160000]
    assert "ignored 1 objectType 'annotation' regions larger than 2000 µm² (outlines, not nuclei): feature 1" in (
        caplog.text
    )
    # Without the resolution the region cannot be told apart: its class "Tumor" is then unknown.
    with pytest.raises(AnnotationError, match=r"unknown class 'Tumor' \(feature 1\)"):
        read_qupath_geojson(path, CLASSES)
    smaller = AnnotationOptions(max_nucleus_area_um2=50)
    assert read_qupath_geojson(path, CLASSES, mpp=0.25, options=smaller)["feature_index"].tolist() == [0, 3]


# --------------------------------------------------------------------------- class policies


def test_unclassified_features_are_skipped_with_count_and_first_indices(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    features = [cell(i) for i in range(30)]
    for i in range(3, 30, 2):
        del features[i]["properties"]["classification"]
    path = collection(tmp_path / "a.geojson", features)
    with caplog.at_level(logging.WARNING):
        nuclei = read_qupath_geojson(path, CLASSES)
    assert nuclei["feature_index"].tolist() == [0, 1, 2, *range(4, 30, 2)]
    assert "skipped 14 unclassified features: feature 3, 5, 7, 9, 11, 13, 15, 17, 19, 21 and 4 more" in caplog.text
    with pytest.raises(AnnotationError, match=r"feature 3, 5, .* \(14 in all\) has no classification"):
        read_qupath_geojson(path, CLASSES, options=AnnotationOptions(unclassified="error"))


def test_unknown_classes_error_by_default_or_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features = [cell(i) for i in range(4)]
    features[1]["properties"]["classification"] = {"name": "Tumor"}
    features[3]["properties"]["classification"] = "Necrosis"  # a bare string, as some scripts write
    path = collection(tmp_path / "a.geojson", features)
    with pytest.raises(AnnotationError) as info:
        read_qupath_geojson(path, CLASSES)
    assert "'Necrosis' (feature 3); 'Tumor' (feature 1)" in str(info.value)
    assert "unknown_classes: ignore" in str(info.value) and "aliases" in str(info.value)
    with caplog.at_level(logging.WARNING):
        nuclei = read_qupath_geojson(path, CLASSES, options=AnnotationOptions(unknown_classes="ignore"))
    assert nuclei["feature_index"].tolist() == [0, 2]
    assert "skipped 2 features of unknown classes" in caplog.text


def test_annotation_options_from_config_name_the_file_and_fix() -> None:
    assert AnnotationOptions.from_config(None) == AnnotationOptions()
    assert AnnotationOptions.from_config({"unclassified": "error"}).unclassified == "error"
    with pytest.raises(ConfigError, match=r"my\.yaml: annotations: .*unclassified must be one of"):
        AnnotationOptions.from_config({"unclassified": "drop"}, "my.yaml")
    with pytest.raises(ConfigError, match=r"expected keys unclassified"):
        AnnotationOptions.from_config({"unclasified": "skip"})
    with pytest.raises(ConfigError, match=r"max_nucleus_area_um2 must be a positive number"):
        AnnotationOptions.from_config({"max_nucleus_area_um2": 0})


# --------------------------------------------------------------------------- point labels


def test_points_label_the_nuclei_that_contain_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nuclei 0..3: 4-px squares 30 px apart. Two agreeing clicks in nucleus 0, one on nucleus 1's edge,
    a MultiPoint with one click in nucleus 2 and one in no nucleus, a disagreeing click in nucleus 2,
    and a click in no nucleus."""
    clicks = [
        ("Point", [1.0, 1.0], "Muscle"),
        ("Point", [3.0, 2.0], "Muscle"),
        ("Point", [30.0, 2.0], "Immune cells"),
        ("MultiPoint", [[61.0, 1.0], [200.0, 200.0]], "Other"),
        ("Point", [62.0, 2.0], "Immune cells"),
        ("Point", [300.0, 300.0], "Other"),
    ]
    features = [
        {"type": "Feature", "geometry": {"type": kind, "coordinates": xy}, "properties": {"classification": name}}
        for kind, xy, name in clicks
    ]
    path = collection(tmp_path / "ea.geojson", features)
    points = read_qupath_annotations(path, CLASSES).points
    assert points["class_index"].tolist() == [2, 2, 1, 0, 0, 1, 0]
    assert points["feature_index"].tolist() == [0, 1, 2, 3, 3, 4, 5]
    nuclei = [shapely.box(30 * i, 0, 30 * i + 4, 4) for i in range(4)]
    with caplog.at_level(logging.WARNING):
        labels = label_nuclei_by_points(points, nuclei, path)
    assert labels.point_nucleus.tolist() == [0, 0, 1, 2, -1, 2, -1]
    assert labels.nucleus_class.tolist() == [2, 1, -1, -1]
    assert (labels.outside, labels.conflicting) == (2, 1)
    assert "ea.geojson: 2 of 7 point labels lie in no nucleus" in caplog.text
    assert "1 nuclei hold point labels of different classes" in caplog.text


def test_points_agreeing_in_one_nucleus_label_it() -> None:
    import geopandas as gpd

    points = gpd.GeoDataFrame(
        {"class_index": [1, 1], "feature_index": [0, 1]}, geometry=[shapely.Point(5, 5), shapely.Point(6, 6)]
    )
    labels = label_nuclei_by_points(points, [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)])
    assert labels.nucleus_class.tolist() == [1, -1]
    assert (labels.outside, labels.conflicting) == (0, 0)


# --------------------------------------------------------------------------- the benchmark's cell export


@pytest.fixture
def benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/qupath_parse.py, imported as the benchmark runner imports it (benchmarks/ on sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("qupath_parse", REPO / "benchmarks" / "qupath_parse.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_cell_export_reads_back_with_known_classes(
    tmp_path: Path, small_blocks: None, benchmark_module: Any
) -> None:
    path = benchmark_module.write_cell_export(tmp_path / "cells.geojson", 50)
    features = json.loads(path.read_text(encoding="utf-8"))["features"]
    assert len(features[0]["properties"]["measurements"]) == 30
    nuclei = read_qupath_geojson(path, CLASSES)
    assert nuclei["class_index"].tolist() == [i % 3 for i in range(50)]
    expected = [shapely.geometry.shape(f["nucleusGeometry"]) for f in features]
    assert np.allclose(nuclei.geometry.area, [g.area for g in expected])


@pytest.mark.slow
def test_benchmark_run_gives_one_row_per_figure(tmp_path: Path, benchmark_module: Any) -> None:
    from harness import Context

    rows = benchmark_module.run(Context(work=tmp_path, quick=True))
    assert [row.benchmark.rsplit(", ", 1)[1] for row in rows[:2]] == ["features/s", "peak RSS GiB"]
    assert {row.met for row in rows[:2]} <= {"yes", "no"}
    assert all(float(row.cellkd.replace(",", "")) > 0 for row in rows)


# --------------------------------------------------------------------------- real PUMA exports

PUMA_CLASSES = [
    {
        "name": "other",
        "qupath_name": "Other",
        "color": [0, 160, 0],
        "aliases": ["nuclei_tumor", "nuclei_stroma", "nuclei_endothelium", "nuclei_epithelium"],
    },
    {
        "name": "immune",
        "qupath_name": "Immune cells",
        "color": [160, 90, 160],
        "aliases": ["nuclei_lymphocyte", "nuclei_histiocyte", "nuclei_melanophage"],
    },
]
PUMA_MPP = 0.23  # 40x, per the PUMA description (SOURCES.md)


def _puma_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "puma-geojson").glob("*.geojson"))
    if not files:
        pytest.skip(f"no PUMA GeoJSON in {shared_data / 'puma-geojson'}")
    return files


def test_puma_exports_read_every_nucleus_with_direct_class_counts(shared_data: Path) -> None:
    classes = classes_from_config(PUMA_CLASSES)
    aliases = {alias: k for k, entry in enumerate(PUMA_CLASSES) for alias in entry["aliases"]}
    for path in _puma_files(shared_data):
        features = json.loads(path.read_text(encoding="utf-8"))["features"]
        assert {f["properties"]["objectType"] for f in features} == {"annotation"}
        annotations = read_qupath_annotations(path, classes, mpp=PUMA_MPP)
        nuclei = annotations.nuclei
        assert len(annotations.points) == 0
        assert nuclei["feature_index"].tolist() == list(range(len(features))), path.name
        direct = Counter(aliases[f["properties"]["classification"]["name"]] for f in features)
        assert Counter(nuclei["class_index"].tolist()) == direct, path.name
        expected = [shapely.make_valid(shapely.geometry.shape(f["geometry"])).area for f in features]
        assert np.allclose(nuclei.geometry.area, expected), path.name
        assert nuclei.geometry.area.max() * PUMA_MPP**2 < AnnotationOptions().max_nucleus_area_um2


def test_puma_exports_keep_their_multipolygon_and_honour_annotation_regions(
    shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    classes = classes_from_config(PUMA_CLASSES)
    path = next((p for p in _puma_files(shared_data) if "roi_007" in p.name), None)
    if path is None:
        pytest.skip("training_set_primary_roi_007_nuclei.geojson (with a MultiPolygon) not in puma-geojson/")
    nuclei = read_qupath_geojson(path, classes, mpp=PUMA_MPP)
    assert (nuclei.geometry.geom_type == "MultiPolygon").sum() == 1
    # objectType "annotation" is honoured: with a threshold below the largest nuclei, those become regions.
    threshold = float(np.quantile(nuclei.geometry.area, 0.9) * PUMA_MPP**2)
    with caplog.at_level(logging.INFO):
        kept = read_qupath_geojson(
            path, classes, mpp=PUMA_MPP, options=AnnotationOptions(max_nucleus_area_um2=threshold)
        )
    dropped = int((nuclei.geometry.area * PUMA_MPP**2 > threshold).sum())
    assert dropped > 0 and len(kept) == len(nuclei) - dropped
    assert f"ignored {dropped} objectType 'annotation' regions" in caplog.text


def test_puma_exports_without_the_alias_map_name_every_unknown_class(shared_data: Path) -> None:
    path = _puma_files(shared_data)[0]
    with pytest.raises(AnnotationError) as info:
        read_qupath_geojson(path, CLASSES, mpp=PUMA_MPP)
    message = str(info.value)
    assert path.name in message and "'nuclei_tumor' (feature" in message and "aliases" in message


def test_vertices_of_mixed_length_never_shift_the_others(tmp_path: Path) -> None:
    """[x, y, z] next to [x]: as many numbers as 2-D vertices, yet malformed; named, not read shifted."""
    bad = cell(1)
    bad["nucleusGeometry"]["coordinates"] = [[[30, 0, 7], [34], [34, 4], [30, 4], [30, 0]]]
    with pytest.raises(AnnotationError, match=r"a\.geojson: feature 1 has malformed Polygon coordinates"):
        read_qupath_geojson(collection(tmp_path / "a.geojson", [cell(0), bad, cell(2)]), CLASSES)
