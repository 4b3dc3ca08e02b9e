"""The working resolution (config ``mpp``): slides read from their nearest level and resampled to it.

One synthetic slide at 0.5 µm/px and the same tissue at 0.25 µm/px (upsampled 2x, coordinates doubled),
both processed at 0.5, must give the same nuclei (count, centroids in µm) and crops within interpolation
tolerance, while every export stays in each slide's own level-0 pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import box

from cellkd.annotations import read_qupath_geojson, write_mask_store
from cellkd.classes import DEFAULT_CLASSES
from cellkd.errors import ConfigError
from cellkd.nuclei import NucleiParams, extract_nuclei
from cellkd.predict import export_predictions
from cellkd.slides import TissueParams, extract_fragments, open_slide
from cellkd.slides.downsample import block_mean
from cellkd.slides.working import WorkingSlide, nearest_level, resample_window
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import Fragment, FragmentStore, SlideGeometry
from cellkd.store.nuclei import NucleiStore
from cellkd.synthetic import SyntheticSlideParams, generate_slide

WORKING_MPP = 0.5


def write_tiff(path: Path, image: np.ndarray, mpp: float | None, levels: int = 1) -> Path:
    """A tiled TIFF of ``image`` with ``levels`` pyramid levels (block means by 2, 4, ...) and its mpp in tags."""
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            down = 2**k
            extra: dict[str, Any] = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * down),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(
                image if down == 1 else block_mean(image, down),
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                subfiletype=int(k > 0),
                metadata=None,
                **extra,
            )
    return path


def _scaled(coordinates: Any, factor: float) -> Any:
    if isinstance(coordinates[0], (int, float)):
        return [c * factor for c in coordinates]
    return [_scaled(c, factor) for c in coordinates]


def scale_geojson(source: Path, out: Path, factor: float) -> Path:
    """The QuPath GeoJSON ``source`` with every coordinate times ``factor`` (the same nuclei on a finer scan)."""
    data = json.loads(source.read_text())
    for feature in data["features"]:
        for key in ("geometry", "nucleusGeometry"):
            if feature.get(key):
                feature[key]["coordinates"] = _scaled(feature[key]["coordinates"], factor)
    out.write_text(json.dumps(data))
    return out


def process(slide: Path, truth: Path, folder: Path) -> dict[str, Path]:
    """Fragments at the working mpp, truth masks, 'predicted' masks = the truth's, nuclei, QuPath export."""
    folder.mkdir()
    paths = {name: folder / f"{name}.h5" for name in ("fragments", "masks", "predicted", "nuclei")}
    extract_fragments(slide, paths["fragments"], "s", working_mpp=WORKING_MPP, threads=0)
    with FragmentStore(paths["fragments"]) as store:
        slide_size, slide_mpp = store.slide_size, store.geometry.slide_mpp
        fragments = store.fragments
    write_mask_store(paths["fragments"], {"truth": truth}, DEFAULT_CLASSES, paths["masks"], slide_size, mpp=slide_mpp)
    with atomic_h5(paths["predicted"]) as out, h5py.File(paths["masks"], "r") as masks:
        out.attrs.update({"slide": "s", "stain": "raw", "level": 0})
        for f in fragments:
            group = out.require_group(f"fragments/{f.name}")
            group.attrs.update({"x": f.x, "y": f.y, "width": f.width, "height": f.height})
            group["level0"] = masks[f"fragments/{f.name}/truth/level0"][()].max(axis=2)
    extract_nuclei(
        paths["predicted"], paths["fragments"], {"truth": truth}, DEFAULT_CLASSES, paths["nuclei"], NucleiParams()
    )
    with NucleiStore(paths["nuclei"]) as nuclei:
        probabilities = np.tile([0.7, 0.1, 0.1, 0.1], (len(nuclei), 1))
    paths["export"] = folder / "predicted.geojson"
    export_predictions(
        paths["nuclei"], probabilities, DEFAULT_CLASSES, paths["export"], geometry=_geometry(paths["fragments"])
    )
    return paths


def _geometry(fragments: Path) -> SlideGeometry:
    with FragmentStore(fragments) as store:
        return store.geometry


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The same tissue scanned at 0.5 µm/px (the generator's) and at 0.25 (upsampled 2x, no pyramid)."""
    folder = tmp_path_factory.mktemp("scans")
    params = SyntheticSlideParams(width=640, height=448, mpp=0.5, fragments=(1, 1), compression="zlib")
    truth = folder / "truth_050.geojson"
    generate_slide("s", folder / "s_050.tiff", {"truth": truth}, params, seed=3)
    with open_slide(folder / "s_050.tiff") as slide:
        image = slide.read_region(0, 0, *slide.dimensions)
    fine = cv2.resize(image, (2 * image.shape[1], 2 * image.shape[0]), interpolation=cv2.INTER_LINEAR)
    write_tiff(folder / "s_025.tiff", fine, mpp=0.25)
    scale_geojson(truth, folder / "truth_025.geojson", 2.0)
    return {
        "coarse": process(folder / "s_050.tiff", truth, folder / "coarse"),
        "fine": process(folder / "s_025.tiff", folder / "truth_025.geojson", folder / "fine"),
    }


def test_both_scans_are_stored_at_the_working_resolution(two_scans: dict[str, dict[str, Path]]) -> None:
    coarse, fine = (_geometry(two_scans[k]["fragments"]) for k in ("coarse", "fine"))
    assert (coarse.scale, coarse.slide_mpp, coarse.working_mpp) == pytest.approx((1.0, 0.5, 0.5))
    assert (fine.scale, fine.slide_mpp, fine.working_mpp) == pytest.approx((2.0, 0.25, 0.5))
    with FragmentStore(two_scans["coarse"]["fragments"]) as a, FragmentStore(two_scans["fine"]["fragments"]) as b:
        assert a.mpp == b.mpp == pytest.approx(WORKING_MPP)
        assert b.slide_size == (2 * a.slide_size[0], 2 * a.slide_size[1])  # the slide's own size is kept
        # the fragment found on either scan covers the same working-px box, give or take a pixel of detection
        (fa,), (fb,) = a.fragments, b.fragments
        assert np.allclose([fa.x, fa.y, fa.width, fa.height], [fb.x, fb.y, fb.width, fb.height], atol=2)


def _nuclei(paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (N, 2) and areas (N,) in working px."""
    with NucleiStore(paths["nuclei"]) as store:
        table = store.table()
    return table[["centroid_x", "centroid_y"]].to_numpy(), table["area"].to_numpy()


def test_same_nuclei_and_crops_from_either_scan(two_scans: dict[str, dict[str, Path]]) -> None:
    """Same count, centroids (µm) within 0.05 µm, areas equal, crops within interpolation tolerance."""
    xy_a, area_a = _nuclei(two_scans["coarse"])
    xy_b, area_b = _nuclei(two_scans["fine"])
    assert len(xy_a) > 50
    assert len(xy_a) == len(xy_b)
    # rows are in centroid order within each fragment and tile; sorted by centroid, the two lists pair up
    order_a, order_b = np.lexsort(xy_a.T[::-1]), np.lexsort(xy_b.T[::-1])
    np.testing.assert_allclose(xy_a[order_a] * WORKING_MPP, xy_b[order_b] * WORKING_MPP, atol=0.05)
    np.testing.assert_array_equal(area_a[order_a], area_b[order_b])
    with h5py.File(two_scans["coarse"]["nuclei"], "r") as a, h5py.File(two_scans["fine"]["nuclei"], "r") as b:
        crops_a = a["crops/level0"][()][order_a].astype(np.int16)
        crops_b = b["crops/level0"][()][order_b].astype(np.int16)
    difference = np.abs(crops_a - crops_b)
    # The 0.25 scan was made by linear upsampling and is read back with a Gaussian pre-filter: a slight blur.
    assert difference.mean() < 2.5, difference.mean()
    per_crop = difference.reshape(len(crops_a), -1).mean(axis=1)
    assert per_crop.max() < 4.0, per_crop.max()
    # and the crops are far closer to their twin than to any other nucleus' crop
    shuffled = np.abs(crops_a - np.roll(crops_b, 1, axis=0)).mean()
    assert shuffled > 4 * difference.mean()


def test_exports_are_in_each_slides_own_pixels(two_scans: dict[str, dict[str, Path]]) -> None:
    """The predicted GeoJSON of the 0.25 scan is the 0.5 scan's, coordinates doubled; it meets the truth there."""
    coarse = read_qupath_geojson(two_scans["coarse"]["export"], DEFAULT_CLASSES)
    fine = read_qupath_geojson(two_scans["fine"]["export"], DEFAULT_CLASSES)
    assert len(coarse) == len(fine)
    ca, cb = shapely.centroid(coarse.geometry.values), shapely.centroid(fine.geometry.values)
    a = np.column_stack([shapely.get_x(ca), shapely.get_y(ca)])
    b = np.column_stack([shapely.get_x(cb), shapely.get_y(cb)])
    a, b = a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]
    np.testing.assert_allclose(b, 2 * a, atol=0.2)
    # in its own slide's pixels, each predicted nucleus lies on a truth nucleus of that slide
    truth = read_qupath_geojson(two_scans["fine"]["nuclei"].parent.parent / "truth_025.geojson", DEFAULT_CLASSES)
    hits = truth.sindex.query(shapely.points(b), predicate="within")
    assert len(np.unique(hits[0])) >= 0.95 * len(b)


# --------------------------------------------------------------------------- geometry and levels


def test_coordinates_round_trip_between_working_and_slide_pixels() -> None:
    geometry = SlideGeometry.for_slide(0.2527, 0.5)
    assert geometry.scale == pytest.approx(0.5 / 0.2527)
    assert geometry.working_mpp == pytest.approx(0.5)
    xy = np.array([[0.0, 0.0], [123.25, 4567.5], [48724.0, 17910.0]])
    np.testing.assert_allclose(geometry.to_slide(geometry.to_working(xy)), xy)
    np.testing.assert_allclose(geometry.to_working(xy) * geometry.working_mpp, xy * 0.2527)  # the same µm
    polygon = box(100, 200, 300, 260)
    (back,) = geometry.geometries_to_slide(geometry.geometries_to_working([polygon]))
    assert back.equals_exact(polygon, 1e-9)
    (working,) = geometry.geometries_to_working([polygon])
    assert working.area * geometry.working_mpp**2 == pytest.approx(polygon.area * 0.2527**2)
    # a fragment's working box covers its level-0 box
    fragment = Fragment("f000", 1001, 37, 999, 2001)
    covering = geometry.box_to_working(fragment)
    x0, y0 = geometry.to_slide([covering.x, covering.y])
    x1, y1 = geometry.to_slide([covering.x + covering.width, covering.y + covering.height])
    assert x0 <= 1001 and y0 <= 37 and x1 >= 1001 + 999 and y1 >= 37 + 2001
    assert x1 - x0 < 999 + 2 * geometry.scale + 1e-9


def test_scale_snaps_to_a_whole_ratio_within_scanner_rounding() -> None:
    assert SlideGeometry.for_slide(0.2499, 0.5).scale == 2.0
    assert SlideGeometry.for_slide(0.4998, 0.5).scale == 1.0
    assert not SlideGeometry.for_slide(0.4998, 0.5).resampled
    assert SlideGeometry.for_slide(0.5, 0.25).scale == 0.5
    assert SlideGeometry.for_slide(0.2527, 0.5).scale != 2.0  # Aperio's 0.2527: 1% off, resampled
    assert SlideGeometry.for_slide(0.5, None) == SlideGeometry.identity(0.5)
    with pytest.raises(ValueError, match="working mpp"):
        SlideGeometry.for_slide(0.5, 0.0)


def test_nearest_level_is_never_coarser_than_the_working_resolution() -> None:
    downsamples = (1.0, 2.0, 4.0, 8.0)
    assert nearest_level(downsamples, 1.0) == 0
    assert nearest_level(downsamples, 1.6) == 0  # level 1 would be coarser than asked
    assert nearest_level(downsamples, 2.0) == 1
    assert nearest_level(downsamples, 2.0 / 1.005) == 1  # within scanner rounding
    assert nearest_level(downsamples, 3.9) == 1
    assert nearest_level(downsamples, 100.0) == 3
    assert nearest_level(downsamples, 0.5) == 0  # finer than level 0: upsampled from it


def test_pyramid_slide_is_read_from_its_nearest_level(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8), (0, 0), 3)
    path = write_tiff(tmp_path / "pyramid.tiff", image, mpp=0.25, levels=3)
    with open_slide(path) as slide:
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        at_half = WorkingSlide(slide, SlideGeometry.for_slide(slide.mpp, 0.5))
        assert (at_half.level, at_half.factor) == (1, 1.0)
        np.testing.assert_array_equal(at_half.read_region(10, 20, 100, 50), block_mean(image, 2)[20:70, 10:110])
        at_one = WorkingSlide(slide, SlideGeometry.for_slide(slide.mpp, 1.0))
        assert (at_one.level, at_one.factor) == (2, 1.0)
        at_04 = WorkingSlide(slide, SlideGeometry.for_slide(slide.mpp, 0.4))
        assert at_04.level == 0 and at_04.factor == pytest.approx(1.6)  # level 1 (0.5 µm/px) is too coarse
        assert at_04.dimensions == (math.ceil(768 / 1.6), math.ceil(512 / 1.6))


def test_resampling_is_the_same_in_any_window() -> None:
    """A working pixel does not depend on the window it is read in: tiles join without seams."""
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, 400), min(y + h, 300)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = source[y0:y1, x0:x1]
        return out

    for factor in (1.7, 2.0, 0.6):
        whole = resample_window(read, factor, 0, 0, 120, 90)
        left = resample_window(read, factor, 0, 0, 57, 90)
        right = resample_window(read, factor, 57, 0, 63, 90)
        difference = np.abs(np.concatenate([left, right], axis=1).astype(int) - whole)
        assert difference.max() <= 1, factor  # fixed-point interpolation may round one grey level apart
    # a constant image stays constant (no darkening at the edges of a window)
    flat = resample_window(lambda x, y, w, h: np.full((h, w, 3), 180, np.uint8), 2.3, 5, 5, 40, 30)
    assert (flat == 180).all()


def test_a_slide_without_mpp_uses_the_fallback_then_the_working_resolution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    image = np.full((512, 512, 3), 240, dtype=np.uint8)
    image[100:400, 120:420] = cv2.GaussianBlur(rng.integers(60, 200, (300, 300, 3), dtype=np.uint8), (0, 0), 2)
    path = write_tiff(tmp_path / "nompp.tiff", image, mpp=None)
    with caplog.at_level("WARNING"):
        extract_fragments(
            path, tmp_path / "f.h5", "s", TissueParams(min_area_um2=1000), mpp_fallback=0.25, working_mpp=0.5
        )
    assert "no resolution" in caplog.text
    with FragmentStore(tmp_path / "f.h5") as store:
        geometry = store.geometry
        assert (geometry.slide_mpp, geometry.scale, geometry.slide_mpp_assumed) == (0.25, 2.0, True)
        (fragment,) = store.fragments
        assert store.level(fragment, 0).shape[:2] == (fragment.height, fragment.width)
        assert fragment.width <= 512 / 2 + 1


def test_legacy_store_without_geometry_is_its_slides_own_pixels(tmp_path: Path) -> None:
    from cellkd.store.fragments import FragmentStoreWriter

    with FragmentStoreWriter(tmp_path / "f.h5", slide="s", source="s.tiff", stain="raw", mpp=0.5) as writer:
        for key in ("slide_mpp", "slide_scale", "slide_mpp_assumed"):
            del writer.attrs[key]
    with FragmentStore(tmp_path / "f.h5") as store:
        assert store.geometry == SlideGeometry.identity(0.5)
        assert store.mpp == 0.5


def test_config_mpp_must_be_positive() -> None:
    import yaml

    from cellkd.config import validate_config

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "workflow_config.yaml").read_text())
    config["mpp"] = 0
    with pytest.raises(ConfigError, match="mpp"):
        validate_config(config, repo / "schemas" / "config.schema.yaml", source="test")
    demo = yaml.safe_load((repo / "config" / "demo.yaml").read_text())
    assert demo["mpp"] == config["demo"]["mpp"]  # the demo's slides are read at their own resolution


def test_resampled_store_does_not_depend_on_the_read_tile(
    two_scans: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    """The 0.25 scan read at 0.5 in 128-px tiles equals the whole-fragment read (seamless resampling)."""
    slide = two_scans["fine"]["fragments"].parent.parent / "s_025.tiff"
    extract_fragments(slide, tmp_path / "tiled.h5", "s", working_mpp=WORKING_MPP, tile=128, threads=2)
    with FragmentStore(tmp_path / "tiled.h5") as tiled, FragmentStore(two_scans["fine"]["fragments"]) as whole:
        for fragment in whole.fragments:
            for level in range(3):
                a = tiled.level(fragment, level)[()].astype(np.int16)
                b = whole.level(fragment, level)[()].astype(np.int16)
                assert np.abs(a - b).max() <= 1, level


def test_a_slide_at_the_working_mpp_is_stored_as_it_is(two_scans: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """The demo's case (slides at 0.5, mpp 0.5): the same pixels and boxes as reading the slide without resampling."""
    slide = two_scans["coarse"]["fragments"].parent.parent / "s_050.tiff"
    extract_fragments(slide, tmp_path / "own.h5", "s", working_mpp=None, threads=0)
    with FragmentStore(tmp_path / "own.h5") as own, FragmentStore(two_scans["coarse"]["fragments"]) as working:
        assert own.fragments == working.fragments
        assert own.mpp == working.mpp
        for fragment in own.fragments:
            for level in range(3):
                np.testing.assert_array_equal(own.level(fragment, level)[()], working.level(fragment, level)[()])


def test_slide_mpp_or_gives_the_fallback_only_when_the_slide_mpp_is_unknown() -> None:
    assert SlideGeometry.for_slide(0.25, 0.5).slide_mpp_or(0.5) == 0.25
    assert SlideGeometry.identity(float("nan")).slide_mpp_or(0.5) == 0.5
