"""Tests for cellkd.slides: readers, tissue detection and streaming fragment extraction."""

from __future__ import annotations

import logging
import math
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy import ndimage

from cellkd.errors import ConfigError, SlideError
from cellkd.slides import (
    ImageReader,
    OpenSlideReader,
    TissueParams,
    block_mean,
    detect_fragments,
    extract_fragments,
    merge_boxes,
    open_slide,
    reader,
    tissue_mask,
)
from cellkd.slides.downsample import windowed_block_mean
from cellkd.slides.tissue import close_disk
from cellkd.store.fragments import FragmentStore

MPP = 0.5
HEIGHT, WIDTH = 1024, 1536
MARGIN_PX = round(TissueParams().margin_um / MPP)  # 20 px
# Tissue rectangles (x0, y0, x1, y1), end exclusive, odd sizes so boxes are not multiples of 4.
RECTS = {
    "a": (101, 151, 503, 453),
    "b": (801, 99, 1403, 351),
    "c": (603, 601, 1001, 949),
}
COLOURS = {"a": (232, 150, 200), "b": (150, 80, 172), "c": (200, 110, 190)}
SPECK = (1300, 800, 1310, 810)  # 25 µm² at 0.5 µm/px: far below min_area_um2
EXPECTED_ORDER = ["b", "a", "c"]  # top-to-bottom by box top (b: 79, a: 131, c: 581)


def _he_like_level0(rects: dict[str, tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """uint8 (HEIGHT, WIDTH, 3): near-white glass (245 +- 3) with H&E-coloured noisy rectangles and one speck."""
    rng = np.random.default_rng(seed)
    image = np.full((HEIGHT, WIDTH, 3), 245, dtype=np.int16)
    for name, (x0, y0, x1, y1) in rects.items():
        image[y0:y1, x0:x1] = COLOURS[name]
        image[y0:y1, x0:x1] += rng.integers(-15, 16, (y1 - y0, x1 - x0, 3), dtype=np.int16)
    if rects:
        x0, y0, x1, y1 = SPECK
        image[y0:y1, x0:x1] = (150, 80, 172)
    image += rng.integers(-3, 4, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_pyramid(path: Path, level0: np.ndarray, mpp: float | None) -> Path:
    """Tiled pyramidal TIFF (levels 1, 1/2, 1/4) that OpenSlide reads as generic-tiff."""
    with tifffile.TiffWriter(path) as tif:
        for i, down in enumerate((1, 2, 4)):
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * down), 1e4 / (mpp * down)), "resolutionunit": "CENTIMETER"}
            tif.write(level0[::down, ::down], tile=(128, 128), photometric="rgb", subfiletype=int(i > 0), **extra)
    return path


@pytest.fixture(scope="session")
def level0() -> np.ndarray:
    """The level-0 pixels of the ``slide_path`` slide: three tissue rectangles RECTS on white."""
    return _he_like_level0(RECTS)


@pytest.fixture(scope="session")
def slide_path(tmp_path_factory: pytest.TempPathFactory, level0: np.ndarray) -> Path:
    """Pyramidal TIFF of ``level0`` at 0.5 µm/px."""
    return _write_pyramid(tmp_path_factory.mktemp("slides") / "tissue.tiff", level0, MPP)


@pytest.fixture(scope="session")
def slide_no_mpp(tmp_path_factory: pytest.TempPathFactory, level0: np.ndarray) -> Path:
    """Pyramidal TIFF of ``level0`` without resolution tags (mpp unknown)."""
    return _write_pyramid(tmp_path_factory.mktemp("slides") / "no_mpp.tiff", level0, None)


@pytest.fixture(scope="session")
def white_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pyramidal TIFF of blank glass: 245 +- 3 everywhere, no tissue."""
    return _write_pyramid(tmp_path_factory.mktemp("slides") / "white.tiff", _he_like_level0({}), MPP)


def _expected_box(name: str) -> tuple[int, int, int, int]:
    """(x, y, width, height) of rectangle ``name`` plus the default margin, clipped to the slide."""
    x0, y0, x1, y1 = RECTS[name]
    x0, y0 = max(x0 - MARGIN_PX, 0), max(y0 - MARGIN_PX, 0)
    x1, y1 = min(x1 + MARGIN_PX, WIDTH), min(y1 + MARGIN_PX, HEIGHT)
    return x0, y0, x1 - x0, y1 - y0


def _reference_block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means over the pixels present (NaN-padded), rounded half up: an independent reference."""
    h, w, c = image.shape
    oh, ow = math.ceil(h / factor), math.ceil(w / factor)
    padded = np.full((oh * factor, ow * factor, c), np.nan)
    padded[:h, :w] = image
    blocks = padded.reshape(oh, factor, ow, factor, c)
    return np.floor(np.nanmean(blocks, axis=(1, 3)) + 0.5).astype(np.uint8)


# --- readers -----------------------------------------------------------------------------------


def test_open_slide_reads_pyramidal_tiff_with_openslide(slide_path: Path, level0: np.ndarray) -> None:
    with open_slide(slide_path) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.mpp == pytest.approx(MPP)
        np.testing.assert_array_equal(slide.read_region(90, 140, 300, 200), level0[140:340, 90:390])


def test_read_region_outside_slide_is_white(slide_path: Path, level0: np.ndarray) -> None:
    with open_slide(slide_path) as slide:
        region = slide.read_region(-10, -5, 30, 20)
    assert region.shape == (20, 30, 3) and region.dtype == np.uint8
    assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[5:, 10:], level0[:15, :20])


def test_thumbnail_is_bounded_and_reports_downsample(slide_path: Path) -> None:
    with open_slide(slide_path) as slide:
        thumb, (down_x, down_y) = slide.thumbnail(256)
    assert 128 < max(thumb.shape[:2]) <= 256 and thumb.dtype == np.uint8 and thumb.shape[2] == 3
    assert down_x == pytest.approx(WIDTH / thumb.shape[1]) and down_y == pytest.approx(HEIGHT / thumb.shape[0])


def test_thumbnail_is_the_block_mean_of_the_nearest_level_read_in_bounded_regions(
    slide_path: Path, level0: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "THUMBNAIL_READ_EDGE", 50)  # many regions, with cut ones at the right and bottom
    with open_slide(slide_path) as slide:
        reads = []
        read_level = slide._read_level  # the one read path of both the tifffile and the OpenSlide levels
        slide._read_level = lambda level, x, y, w, h: reads.append((level, w, h)) or read_level(level, x, y, w, h)
        thumb, _ = slide.thumbnail(256)
    # 1536 / 256 = 6: the 1/4 level (384 x 256) is the nearest finer one, averaged over 2 x 2 blocks
    np.testing.assert_array_equal(thumb, block_mean(level0[::4, ::4], 2))
    assert {level for level, _, _ in reads} == {2}
    assert len(reads) > 1 and max(w * h for _, w, h in reads) <= 50 * 50


def test_missing_mpp_is_none(slide_no_mpp: Path) -> None:
    with open_slide(slide_no_mpp) as slide:
        assert slide.mpp is None


def test_plain_png_tile_opens_with_image_reader(tmp_path: Path) -> None:
    tile = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(tile).save(tmp_path / "tile.png")
    with open_slide(tmp_path / "tile.png") as slide:
        assert isinstance(slide, ImageReader)
        assert slide.dimensions == (300, 200) and slide.mpp is None
        np.testing.assert_array_equal(slide.read_region(0, 0, 300, 200), tile)
        edge = slide.read_region(290, 190, 20, 20)
    np.testing.assert_array_equal(edge[:10, :10], tile[190:, 290:])
    assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all()


def test_plain_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # left half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    with open_slide(tmp_path / "alpha.png") as slide:
        rgb = slide.read_region(0, 0, 32, 32)
    assert (rgb[:, :16] == 255).all()
    assert (rgb[:, 16:] == (200, 0, 0)).all()


def test_plain_tiff_tile_reads_mpp_from_resolution_tags(tmp_path: Path) -> None:
    tile = np.full((100, 120, 3), 128, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tile.tif", tile, photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "tile.tif") as slide:
        assert isinstance(slide, ImageReader)
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region(0, 0, 120, 100), tile)


def _smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3): gradients plus noise, compressible yet different at every pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255) // max(width - 1, 1), (yy * 255) // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)


# (name, pixels written, tifffile.imwrite keywords, the RGB a reader must return)
PLAIN_TIFFS = {
    "zlib strips": lambda rgb: (rgb, {"photometric": "rgb", "rowsperstrip": 16, "compression": "zlib"}, rgb),
    "lzw strips": lambda rgb: (rgb, {"photometric": "rgb", "rowsperstrip": 7, "compression": "lzw"}, rgb),
    "uncompressed": lambda rgb: (rgb, {"photometric": "rgb"}, rgb),
    # OpenSlide opens tiled TIFFs itself; ImageReader reads them tile by tile when used directly.
    "zlib tiles": lambda rgb: (rgb, {"photometric": "rgb", "tile": (64, 64), "compression": "zlib"}, rgb),
    "planar": lambda rgb: (
        np.moveaxis(rgb, -1, 0),
        {"photometric": "rgb", "planarconfig": "separate", "rowsperstrip": 32, "compression": "zlib"},
        rgb,
    ),
    "grey 16-bit": lambda rgb: (
        rgb[..., 0].astype(np.uint16) * 257,
        {"photometric": "minisblack", "rowsperstrip": 16, "compression": "zlib"},
        np.repeat(rgb[..., :1], 3, axis=2),
    ),
}


@pytest.mark.parametrize("layout", list(PLAIN_TIFFS))
def test_plain_tiff_is_read_by_region_equal_to_its_pixels(tmp_path: Path, layout: str) -> None:
    """Plain TIFFs: any region (also cut by the edge) and the thumbnail match the image."""
    data, options, expected = PLAIN_TIFFS[layout](_smooth_rgb(301, 457))
    tifffile.imwrite(tmp_path / "plain.tif", data, **options)
    if "tile" not in options:  # OpenSlide refuses strip TIFFs
        with open_slide(tmp_path / "plain.tif") as slide:
            assert isinstance(slide, ImageReader)
    with ImageReader(tmp_path / "plain.tif") as slide:
        assert slide.dimensions == (457, 301)
        for x, y, w, h in [
            (0, 0, 457, 301),
            (13, 29, 100, 50),
            (400, 250, 100, 100),
            (-5, -7, 20, 30),
            (3, 290, 1, 11),
        ]:
            region = slide.read_region(x, y, w, h)
            truth = np.full((h, w, 3), 255, dtype=np.uint8)
            x0, y0 = max(x, 0), max(y, 0)
            truth[y0 - y : min(y + h, 301) - y, x0 - x : min(x + w, 457) - x] = expected[y0 : y + h, x0 : x + w]
            np.testing.assert_array_equal(region, truth)
        thumb, down = slide.thumbnail(100)
    np.testing.assert_array_equal(thumb, block_mean(expected, 5))
    assert down == pytest.approx((457 / 92, 301 / 61))


def test_large_plain_tiff_region_reads_do_not_load_the_image(tmp_path: Path) -> None:
    """A 2000 x 3000 (18 MB) strip TIFF: opening it and reading a 256 x 256 region stays far below the image."""
    image = _smooth_rgb(2000, 3000, seed=2)
    tifffile.imwrite(tmp_path / "big.tif", image, photometric="rgb", rowsperstrip=16, compression="zlib")
    tracemalloc.start()
    try:
        with open_slide(tmp_path / "big.tif") as slide:
            region = slide.read_region(1500, 1000, 256, 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(region, image[1000:1256, 1500:1756])
    # The region touches 17 strips of 16 x 3000 px (144 kB each; zarr may decode them together): ~2.5 MB.
    assert peak < image.nbytes / 4, f"peak {peak / 1e6:.1f} MB for a {image.nbytes / 1e6:.0f} MB image"


def test_plain_tiff_with_huge_strips_warns_how_to_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reader, "LARGE_CHUNK_BYTES", 1000)
    tifffile.imwrite(tmp_path / "one_strip.tif", _smooth_rgb(64, 64), photometric="rgb", compression="zlib")
    with caplog.at_level(logging.WARNING), open_slide(tmp_path / "one_strip.tif"):
        pass
    assert "one_strip.tif: stores its pixels in" in caplog.text and "vips tiffsave" in caplog.text


def test_truncated_plain_tiff_raises_before_any_read(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "full.tif", _smooth_rgb(200, 300), photometric="rgb", rowsperstrip=8, compression="zlib"
    )
    data = (tmp_path / "full.tif").read_bytes()
    # Keep the header: tifffile writes the first IFD before the strips, so the cut loses only pixel data.
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        SlideError, match=r"cut\.tif: image data runs to byte \d+ but the file has \d+ bytes.*truncated"
    ):
        open_slide(tmp_path / "cut.tif")


def test_missing_slide_raises_with_fix(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"nope\.svs: slide file does not exist; check the slide path"):
        open_slide(tmp_path / "nope.svs")


def test_truncated_slide_raises_corrupt(tmp_path: Path, slide_path: Path) -> None:
    data = slide_path.read_bytes()
    (tmp_path / "cut.tiff").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"cut\.tiff.*corrupt or truncated"):
        open_slide(tmp_path / "cut.tiff")


def test_truncated_openslide_only_format_raises_corrupt(tmp_path: Path, slide_path: Path) -> None:
    (tmp_path / "cut.svs").write_bytes(slide_path.read_bytes()[:100])
    with pytest.raises(SlideError, match=r"cut\.svs: OpenSlide does not recognise.*corrupt or truncated"):
        open_slide(tmp_path / "cut.svs")


def test_unsupported_format_lists_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideError, match=r"unsupported slide format '\.txt'; supported: .*\.svs.*\.tiff"):
        open_slide(tmp_path / "notes.txt")


def test_tiny_slide_raises(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 40, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(SlideError, match=r"tiny\.png: slide is 40x8 px, smaller than 16 px"):
        open_slide(tmp_path / "tiny.png")


# --- tissue detection --------------------------------------------------------------------------


@pytest.mark.parametrize(("detection_size", "tolerance"), [(2048, 2), (256, 8)])
def test_detect_fragments_finds_known_boxes_in_reading_order(
    slide_path: Path, detection_size: int, tolerance: int
) -> None:
    """At full resolution boxes are exact up to noise; at 1/6 each edge is within one thumbnail pixel (6 px)."""
    with open_slide(slide_path) as slide:
        fragments = detect_fragments(slide, TissueParams(detection_level_size=detection_size))
    assert [f.name for f in fragments] == ["f000", "f001", "f002"]
    for fragment, name in zip(fragments, EXPECTED_ORDER, strict=True):
        x, y, w, h = _expected_box(name)
        assert fragment.x == pytest.approx(x, abs=tolerance) and fragment.y == pytest.approx(y, abs=tolerance)
        assert fragment.x + fragment.width == pytest.approx(x + w, abs=tolerance)
        assert fragment.y + fragment.height == pytest.approx(y + h, abs=tolerance)


def test_detect_fragments_drops_specks_unless_min_area_allows(slide_path: Path) -> None:
    with open_slide(slide_path) as slide:
        fragments = detect_fragments(slide, TissueParams(min_area_um2=10.0))
    assert len(fragments) == 4
    speck = next(f for f in fragments if f.x <= SPECK[0] < f.x + f.width and f.y <= SPECK[1] < f.y + f.height)
    assert speck.width == SPECK[2] - SPECK[0] + 2 * MARGIN_PX


def test_detect_fragments_clips_margin_at_slide_edge(tmp_path: Path) -> None:
    image = np.full((200, 300, 3), 245, dtype=np.uint8)
    image[0:120, 250:300] = (150, 80, 172)  # touches the top and right edges
    Image.fromarray(image).save(tmp_path / "edge.png")
    with open_slide(tmp_path / "edge.png") as slide:
        (fragment,) = detect_fragments(slide, TissueParams(min_area_um2=100.0), mpp_fallback=MPP)
    assert (fragment.x, fragment.y, fragment.width, fragment.height) == (230, 0, 70, 140)


def test_merge_boxes_repeats_until_no_boxes_overlap_or_touch() -> None:
    """(y0, x0, y1, x1): a and b overlap; their union then reaches c, which touched neither; d only shares an edge."""
    a, b, c = (0, 0, 5, 10), (4, 5, 10, 10), (7, 0, 10, 3)
    d = (0, 10, 2, 12)  # shares the x = 10 edge with a (end exclusive, so adjacent pixels)
    far = (20, 20, 30, 30)
    assert merge_boxes([far, c, b, a]) == [(0, 0, 10, 10), far]
    assert merge_boxes([a, d]) == [(0, 0, 5, 12)]
    assert merge_boxes([(0, 0, 5, 5), (6, 6, 9, 9)]) == [(0, 0, 5, 5), (6, 6, 9, 9)]  # one pixel apart
    assert merge_boxes([]) == []


box_strategy = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 15), st.integers(1, 15)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


@given(boxes=st.lists(box_strategy, max_size=12))
def test_merged_boxes_are_disjoint_and_each_bounds_the_boxes_inside(boxes: list[tuple[int, int, int, int]]) -> None:
    merged = merge_boxes(boxes)
    for i, (y0, x0, y1, x1) in enumerate(merged):
        for v0, u0, v1, u1 in merged[i + 1 :]:
            assert v0 > y1 or y0 > v1 or u0 > x1 or x0 > u1  # a gap of at least one pixel
        inside = [b for b in boxes if y0 <= b[0] and x0 <= b[1] and b[2] <= y1 and b[3] <= x1]
        assert inside and (y0, x0, y1, x1) == (
            min(b[0] for b in inside),
            min(b[1] for b in inside),
            max(b[2] for b in inside),
            max(b[3] for b in inside),
        )
    assert sum(
        len([m for m in merged if m[0] <= b[0] and m[1] <= b[1] and b[2] <= m[2] and b[3] <= m[3]]) for b in boxes
    ) == len(boxes)  # every box lies in exactly one merged box


def test_detect_fragments_merges_a_blob_inside_an_l_shaped_pieces_box(tmp_path: Path) -> None:
    """An L-shaped piece and a blob in its crook are separate tissue, but their boxes overlap: one fragment."""
    rng = np.random.default_rng(1)
    image = np.full((512, 768, 3), 245, dtype=np.int16)
    image[50:450, 50:110] = (150, 80, 172)  # the L: a vertical bar ...
    image[390:450, 50:450] = (150, 80, 172)  # ... and a horizontal foot
    image[150:230, 250:330] = (200, 110, 190)  # the blob, 140+ px from the L (the closing joins 80 px gaps)
    image[100:200, 600:700] = (232, 150, 200)  # a separate piece, far from both
    image += rng.integers(-3, 4, image.shape, dtype=np.int16)
    path = _write_pyramid(tmp_path / "l_shape.tiff", np.clip(image, 0, 255).astype(np.uint8), MPP)
    params = TissueParams(min_area_um2=1000.0)
    with open_slide(path) as slide:
        thumb, _ = slide.thumbnail(params.detection_level_size)
        assert ndimage.label(tissue_mask(thumb, params, MPP))[1] == 3  # three pieces of tissue ...
        fragments = detect_fragments(slide, params)
    boxes = [(f.x, f.y, f.x + f.width, f.y + f.height) for f in fragments]
    # ... but two fragments: the L's box (with its 20 px margin) swallowed the blob's.
    assert boxes == [
        (50 - MARGIN_PX, 50 - MARGIN_PX, 450 + MARGIN_PX, 450 + MARGIN_PX),
        (600 - MARGIN_PX, 100 - MARGIN_PX, 700 + MARGIN_PX, 200 + MARGIN_PX),
    ]
    assert [f.name for f in fragments] == ["f000", "f001"]


def test_missing_mpp_uses_fallback_and_warns(slide_no_mpp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The margin is 10 µm: 20 px at the 0.5 fallback, 40 px at 0.25."""
    with open_slide(slide_no_mpp) as slide, caplog.at_level(logging.WARNING):
        # At 0.25 µm/px the rectangles shrink to ~7500 µm², so lower min_area for both calls.
        params = TissueParams(min_area_um2=1000.0)
        at_half = detect_fragments(slide, params, mpp_fallback=0.5)
        at_quarter = detect_fragments(slide, params, mpp_fallback=0.25)
    assert "no resolution" in caplog.text and "assuming 0.25" in caplog.text
    assert [(f.x, f.y) for f in at_half] == [(x, y) for x, y, _, _ in map(_expected_box, EXPECTED_ORDER)]
    assert [(f.x, f.y) for f in at_quarter] == [(f.x - 20, f.y - 20) for f in at_half]


def test_white_slide_has_no_tissue(white_slide: Path) -> None:
    with (
        open_slide(white_slide) as slide,
        pytest.raises(SlideError, match=r"white\.tiff: no tissue found.*min_area_um2"),
    ):
        detect_fragments(slide)


@settings(max_examples=80, deadline=None)
@given(
    mask=st.tuples(st.integers(1, 48), st.integers(1, 48)).flatmap(
        lambda hw: arrays(np.bool_, hw, elements=st.integers(0, 9).map(lambda v: v == 0))  # sparse: 10% set
    ),
    radius=st.floats(0.5, 10.0),
)
def test_close_disk_on_the_tissue_box_equals_the_closing_of_the_whole_image(mask: np.ndarray, radius: float) -> None:
    """The closing computed on the mask's bounding box only is the closing of the whole zero-padded image."""
    pad = math.ceil(radius) + 1
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    whole = (ndimage.distance_transform_edt(dilated) > radius)[pad:-pad, pad:-pad] | mask
    np.testing.assert_array_equal(close_disk(mask, radius), whole)


def test_tissue_mask_closing_joins_near_pieces_and_fills_holes() -> None:
    """Two tissue bars 4 px apart with a 10x10 hole: one filled component after a 5 px closing."""
    image = np.full((60, 80, 3), 245, dtype=np.uint8)
    image[10:50, 10:38] = (150, 80, 172)
    image[10:50, 42:70] = (150, 80, 172)
    image[25:35, 20:30] = 245
    mask = tissue_mask(image, TissueParams(closing_um=5.0), pixel_um=1.0)
    assert ndimage.label(mask)[1] == 1
    assert mask[15:45, 10:70].all()  # the gap (away from the corners) and the hole
    assert not mask[:5].any() and not mask[:, :5].any()


@pytest.mark.parametrize(
    ("field", "value"),
    [("detection_level_size", 8), ("min_area_um2", -1.0), ("closing_um", -1.0), ("saturation_floor", 1.5)],
)
def test_tissue_params_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{field}={value!r} must be"):
        TissueParams(**{field: value})


# --- extraction ----------------------------------------------------------------------------------


def test_extract_fragments_writes_three_levels(tmp_path: Path, slide_path: Path, level0: np.ndarray) -> None:
    out = tmp_path / "raw" / "s1.h5"
    fragments = extract_fragments(slide_path, out, "s1", TissueParams(), tile=128)
    with FragmentStore(out) as store:
        assert store.slide == "s1" and store.stain == "raw" and store.mpp == pytest.approx(MPP)
        assert store.fragments == fragments
        for fragment in fragments:
            truth = level0[fragment.y : fragment.y + fragment.height, fragment.x : fragment.x + fragment.width]
            stored0 = store.level(fragment, 0)[:]
            np.testing.assert_array_equal(stored0, truth)
            for level, down in ((1, 2), (2, 4)):
                stored = store.level(fragment, level)[:]
                assert stored.shape == (math.ceil(fragment.height / down), math.ceil(fragment.width / down), 3)
                np.testing.assert_array_equal(stored, _reference_block_mean(stored0, down))


def test_extract_fragments_without_mpp_stores_nan(tmp_path: Path, slide_no_mpp: Path) -> None:
    out = tmp_path / "s2.h5"
    extract_fragments(slide_no_mpp, out, "s2", mpp_fallback=0.5)
    with h5py.File(out) as h5:
        assert math.isnan(h5.attrs["mpp"]) and h5.attrs["complete"]


def test_extract_fragments_without_tissue_leaves_no_file(tmp_path: Path, white_slide: Path) -> None:
    out = tmp_path / "white.h5"
    with pytest.raises(SlideError, match="no tissue"):
        extract_fragments(white_slide, out, "white")
    assert list(tmp_path.iterdir()) == []


def test_extract_fragments_rejects_tile_not_multiple_of_four(tmp_path: Path, slide_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        extract_fragments(slide_path, tmp_path / "x.h5", "s1", tile=130)


@settings(max_examples=50, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.integers(1, 50), st.integers(1, 50), st.just(3))),
    factor=st.sampled_from([1, 2, 3, 4, 8, 17, 23]),  # above 16 the sums need uint32
)
def test_block_mean_is_mean_of_pixels_present(image: np.ndarray, factor: int) -> None:
    np.testing.assert_array_equal(block_mean(image, factor), _reference_block_mean(image, factor))


@settings(max_examples=50, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3))),
    factor=st.sampled_from([1, 2, 3, 5]),
    window=st.tuples(st.integers(1, 45), st.integers(1, 45)),
)
def test_windowed_block_mean_equals_block_mean_and_reads_within_the_window(
    image: np.ndarray, factor: int, window: tuple[int, int]
) -> None:
    reads = []

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        reads.append((w, h))
        return image[y : y + h, x : x + w]

    height, width = image.shape[:2]
    np.testing.assert_array_equal(windowed_block_mean(read, width, height, factor, window), block_mean(image, factor))
    limit_w, limit_h = (max(1, v // factor) * factor for v in window)  # whole blocks, at least one
    assert all(w <= limit_w and h <= limit_h for w, h in reads)
