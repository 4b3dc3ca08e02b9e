"""Tests for cellkd.store.patches: sliding-window patches, masks, provenance and the split."""

from __future__ import annotations

import math
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkd.errors import ConfigError, StoreError
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import Fragment, FragmentStoreWriter, fragment_name
from cellkd.store.patches import (
    PatchParams,
    PatchStore,
    assign_area_splits,
    assign_splits,
    cut_patches,
    split_counts,
)
from cellkd.types import DOWNSAMPLES

CLASSES = ["tumor", "lymphocyte", "other"]
SETS = ["ssa", "wsa"]


def _level_pixels(slide: str, name: str, level: int, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3), every value in 1..255 (never 0, so zero padding is visible), unique per input."""
    seed = zlib.crc32(f"{slide}/{name}/{level}".encode())
    return np.random.default_rng(seed).integers(1, 256, (*shape, 3), dtype=np.uint8)


def _mask_from_image(image: np.ndarray, set_index: int) -> np.ndarray:
    """uint8 (H, W, C) one-hot of (red + set_index) % C: ties each mask pixel to its image pixel."""
    labels = (image[..., 0].astype(int) + set_index) % len(CLASSES)
    return np.eye(len(CLASSES), dtype=np.uint8)[labels]


def write_stores(
    folder: Path, slide: str, sizes: list[tuple[int, int]], masks: bool = True
) -> tuple[Path, Path | None, dict[tuple[str, int], np.ndarray]]:
    """Fragment store (+ mask store) for ``slide`` with level-0 fragment (height, width) ``sizes``.

    Returns both paths and the pixels written per (fragment, level).
    """
    frag_path, mask_path = folder / f"{slide}.frag.h5", folder / f"{slide}.mask.h5"
    pixels: dict[tuple[str, int], np.ndarray] = {}
    fragments = [Fragment(fragment_name(i), 10 * i, 0, w, h) for i, (h, w) in enumerate(sizes)]
    with FragmentStoreWriter(frag_path, slide=slide, source=f"{slide}.tiff", stain="raw", mpp=0.5) as writer:
        for fragment in fragments:
            for level in range(len(DOWNSAMPLES)):
                image = _level_pixels(slide, fragment.name, level, fragment.shape_at(level))
                writer.create_level(fragment, level)[:] = image
                pixels[fragment.name, level] = image
    if not masks:
        return frag_path, None, pixels
    with atomic_h5(mask_path) as h5:
        h5.attrs.update({"slide": slide, "classes": CLASSES, "annotation_sets": SETS})
        for (name, level), image in pixels.items():
            for s, set_name in enumerate(SETS):
                h5[f"fragments/{name}/{set_name}/level{level}"] = _mask_from_image(image, s)
    return frag_path, mask_path, pixels


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path, dict[tuple[str, int], np.ndarray]]:
    """Slide "s1": fragments f000 20x13 and f001 5x40 (H x W, level 0), with ssa/wsa masks."""
    frag, mask, pixels = write_stores(tmp_path, "s1", [(20, 13), (5, 40)])
    assert mask is not None
    return frag, mask, pixels


# --- coverage --------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
    size=st.sampled_from([8, 16]),
)
def test_patches_cover_every_fragment_pixel_exactly_once(sizes: list[tuple[int, int]], size: int) -> None:
    """Reassembling the patches at their provenance gives each level back; padding is zero."""
    with tempfile.TemporaryDirectory() as tmp:
        frag, mask, pixels = write_stores(Path(tmp), "s1", sizes)
        n = cut_patches(frag, mask, Path(tmp) / "p.h5", "src", PatchParams(size=size, split=(1.0, 0.0, 0.0)))
        with PatchStore(Path(tmp) / "p.h5") as store:
            images, ssa = store.images[:], store.masks("ssa")[:]
            prov = store.provenance
    assert len(images) == n == len(prov)
    expected_n = sum(math.ceil(h / size) * math.ceil(w / size) for h, w in (img.shape[:2] for img in pixels.values()))
    assert n == expected_n
    for (name, level), image in pixels.items():
        h, w = image.shape[:2]
        canvas_h, canvas_w = math.ceil(h / size) * size, math.ceil(w / size) * size
        rebuilt = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        rebuilt_mask = np.zeros((canvas_h, canvas_w, len(CLASSES)), dtype=np.uint8)
        count = np.zeros((canvas_h, canvas_w), dtype=int)
        rows = prov[(prov.fragment == name) & (prov.level == level)]
        for i, x, y in zip(rows.index, rows.x, rows.y, strict=True):
            rebuilt[y : y + size, x : x + size] = images[i]
            rebuilt_mask[y : y + size, x : x + size] = ssa[i]
            count[y : y + size, x : x + size] += 1
        assert (count == 1).all()
        np.testing.assert_array_equal(rebuilt[:h, :w], image)
        np.testing.assert_array_equal(rebuilt_mask[:h, :w], _mask_from_image(image, 0))
        assert not rebuilt[h:].any() and not rebuilt[:, w:].any()
        assert not rebuilt_mask[h:].any() and not rebuilt_mask[:, w:].any()


def test_fragment_smaller_than_patch_gives_one_zero_padded_patch(tmp_path: Path) -> None:
    frag, _, pixels = write_stores(tmp_path, "s1", [(3, 5)], masks=False)
    n = cut_patches(frag, None, tmp_path / "p.h5", "src", PatchParams(size=8, levels=(0,)))
    with PatchStore(tmp_path / "p.h5") as store:
        patch = store.images[0]
    assert n == 1
    np.testing.assert_array_equal(patch[:3, :5], pixels["f000", 0])
    assert not patch[3:].any() and not patch[:, 5:].any()


# --- provenance, masks, round trip --------------------------------------------------------------------


def test_provenance_lists_patches_fragment_level_row_major(stores: tuple) -> None:
    frag, mask, _ = stores
    out = frag.parent / "p.h5"
    cut_patches(frag, mask, out, "src", PatchParams(size=8, levels=(0, 1)))
    with PatchStore(out) as store:
        prov = store.provenance
    got = list(zip(prov.fragment, prov.level, prov.x, prov.y, strict=True))
    expected = [
        # f000 is 20x13 at level 0 (3 rows x 2 cols of 8 px), 10x7 at level 1 (2 x 1)
        *[("f000", 0, x, y) for y in (0, 8, 16) for x in (0, 8)],
        *[("f000", 1, 0, y) for y in (0, 8)],
        # f001 is 5x40 at level 0 (1 x 5), 3x20 at level 1 (1 x 3)
        *[("f001", 0, x, 0) for x in (0, 8, 16, 24, 32)],
        *[("f001", 1, x, 0) for x in (0, 8, 16)],
    ]
    assert got == expected
    assert (prov.slide == "s1").all()
    assert prov.level.dtype == np.int8 and prov.x.dtype == np.int32 and prov.split.dtype == np.int8


def test_patch_store_round_trip_attrs_and_layout(stores: tuple) -> None:
    frag, mask, pixels = stores
    out = frag.parent / "p.h5"
    n = cut_patches(frag, mask, out, "demo", PatchParams(size=8))
    with h5py.File(out) as h5:
        assert "images" not in h5 and "masks" not in h5, "the patch store must not copy pixels"
        assert h5["stores/fragments"].asstr()[:].tolist() == ["s1.frag.h5"]  # relative to the patch store
        assert h5["stores/masks"].asstr()[:].tolist() == ["s1.mask.h5"]
        assert h5["store"].shape == (n,) and not h5["store"][:].any()
        assert "zero-padded" in h5.attrs["pixels"]
        assert h5py.check_string_dtype(h5["fragment"].dtype) is not None
        assert h5.attrs["split_names"].tolist() == ["train", "val", "test"] and h5.attrs["complete"]
    with PatchStore(out) as store:
        assert len(store) == n
        assert (store.source, store.stain, store.patch_size) == ("demo", "raw", 8)
        assert store.classes == CLASSES and store.annotation_sets == SETS
        assert store.split_names == ["train", "val", "test"]
        assert store.images.shape == (n, 8, 8, 3) and store.masks("wsa").shape == (n, 8, 8, len(CLASSES))
        first = store.images[0]
        np.testing.assert_array_equal(first, store.image(0))
        np.testing.assert_array_equal(first, pixels["f000", 0][:8, :8])
        np.testing.assert_array_equal(store.masks("wsa")[0], _mask_from_image(pixels["f000", 0][:8, :8], 1))
        all_indices = np.concatenate([store.split_indices(s) for s in ("train", "val", "test")])
        assert sorted(all_indices.tolist()) == list(range(n))
        np.testing.assert_array_equal(store.split_indices(2), store.split_indices("test"))
        with pytest.raises(StoreError, match=r"no masks for annotation set 'ea'; available: \['ssa', 'wsa'\]"):
            store.masks("ea")
        with pytest.raises(StoreError, match="unknown split 'dev'"):
            store.split_indices("dev")


def test_without_mask_store_there_is_no_masks_group(tmp_path: Path) -> None:
    frag, _, _ = write_stores(tmp_path, "s1", [(9, 9)], masks=False)
    cut_patches(frag, None, tmp_path / "p.h5", "src", PatchParams(size=8))
    with h5py.File(tmp_path / "p.h5") as h5:
        assert "masks" not in h5
    with PatchStore(tmp_path / "p.h5") as store:
        assert store.annotation_sets == [] and store.classes == []


def test_several_slides_share_one_store(tmp_path: Path) -> None:
    frag1, mask1, _ = write_stores(tmp_path, "s1", [(8, 8)])
    frag2, mask2, pixels2 = write_stores(tmp_path, "s2", [(8, 16)])
    n = cut_patches([frag1, frag2], [mask1, mask2], tmp_path / "p.h5", "monuseg", PatchParams(size=8, levels=(0,)))
    with PatchStore(tmp_path / "p.h5") as store:
        assert n == 3
        assert store.provenance.slide.tolist() == ["s1", "s2", "s2"]
        np.testing.assert_array_equal(store.images[2], pixels2["f000", 0][:, 8:])


def test_mismatched_mask_store_names_both_files(tmp_path: Path) -> None:
    frag, _, _ = write_stores(tmp_path, "s1", [(20, 13)], masks=False)
    (tmp_path / "other").mkdir()
    _, other_mask, _ = write_stores(tmp_path / "other", "s1", [(20, 14)])  # one column wider
    with pytest.raises(StoreError, match=r"s1\.mask\.h5: .*level0 has shape .*fragment store .*s1\.frag\.h5"):
        cut_patches(frag, other_mask, tmp_path / "p.h5", "src", PatchParams(size=8))
    assert not (tmp_path / "p.h5").exists()


def test_missing_fragment_store_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"missing\.h5: cannot open fragment store"):
        cut_patches(tmp_path / "missing.h5", None, tmp_path / "p.h5", "src")


def test_unequal_store_lists_raise(tmp_path: Path) -> None:
    frag, mask, _ = write_stores(tmp_path, "s1", [(8, 8)])
    with pytest.raises(StoreError, match=r"2 fragment store\(s\) but 1 mask store\(s\)"):
        cut_patches([frag, frag], [mask], tmp_path / "p.h5", "src")


def test_missing_patch_store_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"nope\.h5: cannot open patch store"):
        PatchStore(tmp_path / "nope.h5")


# --- split ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "ratios", "expected"),
    [
        (100, (0.7, 0.15, 0.15), (70, 15, 15)),
        (10, (0.7, 0.15, 0.15), (7, 2, 1)),
        (3, (0.7, 0.15, 0.15), (1, 1, 1)),
        (4, (0.7, 0.15, 0.15), (2, 1, 1)),
        (2, (0.7, 0.15, 0.15), (2, 0, 0)),
        (5, (1.0, 0.0, 0.0), (5, 0, 0)),
        (0, (0.7, 0.15, 0.15), (0, 0, 0)),
    ],
)
def test_split_counts(n: int, ratios: tuple[float, float, float], expected: tuple[int, int, int]) -> None:
    assert split_counts(n, ratios) == expected


@given(n=st.integers(0, 500), weights=st.tuples(*[st.integers(0, 10)] * 3).filter(lambda t: sum(t) > 0))
def test_split_counts_sum_to_n_and_stay_within_one(n: int, weights: tuple[int, int, int]) -> None:
    ratios = [w / sum(weights) for w in weights]
    counts = split_counts(n, ratios)
    assert sum(counts) == n
    if n >= 3:
        assert all(c >= 1 for c, r in zip(counts, ratios, strict=True) if r > 0)
    else:
        assert all(abs(c - n * r) < 1 for c, r in zip(counts, ratios, strict=True))


def test_assign_splits_is_deterministic_per_seed_and_source() -> None:
    ratios = (0.7, 0.15, 0.15)
    a = assign_splits(200, ratios, seed=0, source="demo")
    np.testing.assert_array_equal(a, assign_splits(200, ratios, seed=0, source="demo"))
    assert not np.array_equal(a, assign_splits(200, ratios, seed=1, source="demo"))
    assert not np.array_equal(a, assign_splits(200, ratios, seed=0, source="monuseg"))
    assert np.bincount(a, minlength=3).tolist() == [140, 30, 30]
    assert a.dtype == np.int8


def test_patch_store_split_matches_ratios(tmp_path: Path) -> None:
    frag, _, _ = write_stores(tmp_path, "s1", [(40, 40)], masks=False)
    n = cut_patches(frag, None, tmp_path / "p.h5", "src", PatchParams(size=8, levels=(0,), seed=3))
    with PatchStore(tmp_path / "p.h5") as store:
        split = store.provenance.split.to_numpy()
    assert n == 25
    assert np.bincount(split, minlength=3).tolist() == list(split_counts(25, (0.7, 0.15, 0.15)))
    np.testing.assert_array_equal(split, assign_splits(25, (0.7, 0.15, 0.15), seed=3, source="src"))


def _level0_footprints(prov, size: int, fragment_shape: tuple[int, int]) -> np.ndarray:
    """int (N, 4) level-0 fragment boxes (x0, y0, x1, y1) each patch shows, clipped to the fragment."""
    down = np.asarray(DOWNSAMPLES)[prov.level.to_numpy()]
    x0, y0 = prov.x.to_numpy() * down, prov.y.to_numpy() * down
    height, width = fragment_shape
    return np.stack([x0, y0, np.minimum(x0 + size * down, width), np.minimum(y0 + size * down, height)], axis=1)


@pytest.mark.parametrize("levels", [(0, 1, 2), (0, 2), (1, 2), (0, 1), (2,)])
def test_no_area_is_in_two_splits_at_any_level(tmp_path: Path, levels: tuple[int, ...]) -> None:
    """Level-0 footprints of patches in different splits never overlap, whichever levels are cut."""
    sizes = [(100, 70), (45, 130)]
    frag, _, _ = write_stores(tmp_path, "s1", sizes, masks=False)
    params = PatchParams(size=8, levels=levels, seed=5)
    cut_patches(frag, None, tmp_path / "p.h5", "src", params)
    with PatchStore(tmp_path / "p.h5") as store:
        prov = store.provenance
    assert set(prov.split) == {0, 1, 2}  # the check below is not vacuous
    for name, (height, width) in zip(("f000", "f001"), sizes, strict=True):
        rows = prov[prov.fragment == name]
        boxes = _level0_footprints(rows, params.size, (height, width))
        split = rows.split.to_numpy()
        # Pairwise intersection of all boxes; only pairs with different splits must be empty.
        overlap_w = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
        overlap_h = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
        overlaps = (overlap_w > 0) & (overlap_h > 0)
        assert not (overlaps & (split[:, None] != split[None, :])).any()
        if len(levels) > 1:  # across levels there is overlap to guard against
            assert (overlaps & (rows.level.to_numpy()[:, None] != rows.level.to_numpy()[None, :])).any()


def test_patch_splits_are_drawn_per_block_of_the_coarsest_footprint(tmp_path: Path) -> None:
    """Blocks are 8 * 4 = 32 level-0 px: a 100 x 70 fragment has 4 x 3 of them, split 8 / 2 / 2."""
    frag, _, _ = write_stores(tmp_path, "s1", [(100, 70)], masks=False)
    params = PatchParams(size=8, seed=2)
    assert params.block_size == 32 and PatchParams(size=8, levels=(0, 1)).block_size == 16
    cut_patches(frag, None, tmp_path / "p.h5", "src", params)
    with PatchStore(tmp_path / "p.h5") as store, h5py.File(tmp_path / "p.h5") as h5:
        prov = store.provenance
        assert h5.attrs["split_block_size"] == 32
    down = np.asarray(DOWNSAMPLES)[prov.level.to_numpy()]
    blocks = list(zip(prov.x * down // 32, prov.y * down // 32, strict=True))
    assert len(set(blocks)) == 12
    per_block = {block: set() for block in blocks}
    for block, code in zip(blocks, prov.split, strict=True):
        per_block[block].add(int(code))
    assert all(len(codes) == 1 for codes in per_block.values())
    block_codes = [codes.pop() for codes in per_block.values()]
    assert np.bincount(block_codes, minlength=3).tolist() == list(split_counts(12, params.split)) == [8, 2, 2]
    np.testing.assert_array_equal(prov.split, assign_area_splits(blocks, params.split, 2, "src"))


def test_assign_area_splits_gives_one_split_per_block_in_first_seen_order() -> None:
    blocks = ["b", "a", "b", "c", "a", "d"]
    codes = assign_area_splits(blocks, (0.5, 0.25, 0.25), seed=1, source="demo")
    per_block = assign_splits(4, (0.5, 0.25, 0.25), seed=1, source="demo")  # b, a, c, d
    np.testing.assert_array_equal(codes, per_block[[0, 1, 0, 2, 1, 3]])
    assert codes.dtype == np.int8
    assert assign_area_splits([], (0.7, 0.15, 0.15), seed=0, source="x").shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 4}, "patch parameter size=4"),
        ({"split": (0.5, 0.5, 0.5)}, "patch parameter split=.*summing to 1"),
        ({"split": (1.2, -0.1, -0.1)}, "patch parameter split="),
        ({"levels": (0, 3)}, "patch parameter levels=.*0, 1, 2"),
        ({"levels": ()}, "patch parameter levels="),
        ({"seed": -1}, "patch parameter seed=-1"),
    ],
)
def test_patch_params_reject_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PatchParams(**kwargs)
