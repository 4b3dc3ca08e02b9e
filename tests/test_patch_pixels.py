"""Index-only patch stores: the pixels read through the fragment and mask stores, and the stores' compression."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cellkd.errors import StoreError
from cellkd.store.atomic import atomic_h5
from cellkd.store.compression import COMPRESSION, is_compressed
from cellkd.store.fragments import CHUNK, Fragment, FragmentStoreWriter, fragment_name
from cellkd.store.patches import PatchParams, PatchStore, cut_patches
from cellkd.training.segmentation import PatchDataset
from cellkd.types import DOWNSAMPLES, SPLITS

CLASSES = ["tumor", "lymphocyte", "other"]
SIZE = 256


def write_slide(folder: Path, slide: str, sizes: list[tuple[int, int]]) -> tuple[Path, Path]:
    """Fragment + mask store of ``slide`` (fragment (height, width) ``sizes`` at level 0), as the workflow writes them.

    Pixels are 1..255 (never 0, so zero padding shows); masks are one-hot of the red channel, so each mask
    pixel is tied to its image pixel.
    """
    frag_path, mask_path = folder / f"fragments/{slide}.h5", folder / f"masks/{slide}.h5"
    fragments = [Fragment(fragment_name(i), 1000 * i, 0, w, h) for i, (h, w) in enumerate(sizes)]
    with FragmentStoreWriter(frag_path, slide=slide, source=f"{slide}.tiff", stain="raw", mpp=0.5) as writer:
        for fragment in fragments:
            for level in range(len(DOWNSAMPLES)):
                rng = np.random.default_rng(zlib.crc32(f"{slide}/{fragment.name}/{level}".encode()))
                writer.create_level(fragment, level)[:] = rng.integers(1, 256, (*fragment.shape_at(level), 3), np.uint8)
    with atomic_h5(mask_path) as h5:
        h5.attrs.update({"slide": slide, "classes": CLASSES, "annotation_sets": ["ssa"]})
        with h5py.File(frag_path, "r") as frag:
            for fragment in fragments:
                for level in range(len(DOWNSAMPLES)):
                    red = frag[f"fragments/{fragment.name}/level{level}"][..., 0]
                    mask = np.eye(len(CLASSES), dtype=np.uint8)[red % len(CLASSES)]
                    chunks = (min(CHUNK, mask.shape[0]), min(CHUNK, mask.shape[1]), len(CLASSES))
                    h5.create_dataset(
                        f"fragments/{fragment.name}/ssa/level{level}", data=mask, chunks=chunks, **COMPRESSION
                    )
    return frag_path, mask_path


def padded_window(level: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """What the pixel-copying cutter stored: the (size, size) window at (y, x), zero-padded past the edge."""
    height, width = level.shape[:2]
    pad_h, pad_w = -height % size, -width % size
    return np.pad(level, ((0, pad_h), (0, pad_w), (0, 0)))[y : y + size, x : x + size]


@pytest.fixture
def two_slides(tmp_path: Path) -> tuple[list[Path], list[Path], Path]:
    """Slides a (fragments 700 x 600 and 300 x 520) and b (256 x 256: no padding at level 0), patches indexed."""
    a = write_slide(tmp_path / "results", "a", [(700, 600), (300, 520)])
    b = write_slide(tmp_path / "results", "b", [(256, 256)])
    fragments, masks = [a[0], b[0]], [a[1], b[1]]
    out = tmp_path / "results/patches/raw/src.h5"
    cut_patches(fragments, masks, out, "src", PatchParams(size=SIZE, split=(0.5, 0.25, 0.25)))
    return fragments, masks, out


def test_patches_equal_the_windows_the_pixel_copying_cutter_stored(two_slides: tuple) -> None:
    """Every patch at every level, edge patches included, is the zero-padded window of its fragment level."""
    fragments, masks, out = two_slides
    with PatchStore(out) as store:
        prov = store.provenance
        images, ssa = store.images[:], store.masks("ssa")[:]
    slides = {"a": (fragments[0], masks[0]), "b": (fragments[1], masks[1])}
    padded = 0
    for i, row in prov.iterrows():
        frag_path, mask_path = slides[row.slide]
        # Read as a plain h5py user would (the filter is registered by hdf5plugin, imported by cellkd.store).
        with h5py.File(frag_path, "r") as frag, h5py.File(mask_path, "r") as mask:
            level = frag[f"fragments/{row.fragment}/level{row.level}"][:]
            level_mask = mask[f"fragments/{row.fragment}/ssa/level{row.level}"][:]
        np.testing.assert_array_equal(images[i], padded_window(level, row.x, row.y, SIZE))
        np.testing.assert_array_equal(ssa[i], padded_window(level_mask, row.x, row.y, SIZE))
        padded += row.y + SIZE > level.shape[0] or row.x + SIZE > level.shape[1]
    assert set(prov.level) == {0, 1, 2} and set(prov.slide) == {"a", "b"}
    assert padded > 0 and padded < len(prov), "both edge and inner patches must be checked"
    assert images[prov.index[(prov.slide == "b") & (prov.level == 0)][0]].min() > 0  # b's level 0 is unpadded


def test_patch_dataset_yields_the_same_pixels_and_the_union_mask(two_slides: tuple) -> None:
    _, _, out = two_slides
    with PatchStore(out) as store:
        rows = store.split_indices("train")
        expected = [(store.image(int(r)), store.mask("ssa", int(r)).any(axis=-1)) for r in rows]
    dataset = PatchDataset([out], SPLITS["train"], "ssa")
    try:
        assert len(dataset) == len(rows) > 0 and dataset.patch_size == SIZE
        for i, (image, mask) in enumerate(expected):
            got_image, got_mask = dataset[i]
            assert got_image.dtype == torch.uint8 and got_mask.shape == (1, SIZE, SIZE)
            np.testing.assert_array_equal(got_image.numpy(), image)
            np.testing.assert_array_equal(got_mask[0].numpy(), mask.astype(np.uint8))
    finally:
        dataset.close()


def test_patch_store_reads_through_a_moved_results_tree(two_slides: tuple, tmp_path: Path) -> None:
    _, _, out = two_slides
    with PatchStore(out) as store:
        before = store.images[:]
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "results", moved)
    with PatchStore(moved / "patches/raw/src.h5") as store:
        np.testing.assert_array_equal(store.images[:], before)
        assert store.fragment_stores[0].resolve() == (moved / "fragments/a.h5").resolve()


def test_missing_fragment_store_raises_naming_both_stores(two_slides: tuple) -> None:
    fragments, _, out = two_slides
    fragments[1].unlink()
    with PatchStore(out) as store:
        first_b = int(np.flatnonzero(store.provenance.slide == "b")[0])
        store.image(0)  # slide a still reads
        with pytest.raises(StoreError, match=r"src\.h5: reads its pixels from .*fragments/b\.h5.*cannot open fragment"):
            store.image(first_b)


def test_fragment_store_of_another_extraction_raises(two_slides: tuple, tmp_path: Path) -> None:
    fragments, masks, out = two_slides
    other = write_slide(tmp_path / "other", "b", [(256, 300)])  # one fragment, wider
    shutil.copy(other[0], fragments[1])
    shutil.copy(other[1], masks[1])
    with PatchStore(out) as store:
        first_b = int(np.flatnonzero(store.provenance.slide == "b")[0])
        with pytest.raises(StoreError, match=r"another extraction .* rerun the rule that cuts patches"):
            store.image(first_b)


def test_stores_are_blosc_compressed_and_readable_by_plain_h5py_with_hdf5plugin(two_slides: tuple) -> None:
    fragments, masks, _ = two_slides
    with h5py.File(fragments[0], "r") as frag, h5py.File(masks[0], "r") as mask:
        level = frag["fragments/f000/level0"]
        assert is_compressed(level) and is_compressed(mask["fragments/f000/ssa/level0"])
        assert level.chunks == (CHUNK, CHUNK, 3)
        checksum = int(level[:].astype(np.int64).sum())
    # A fresh interpreter without cellkd: h5py + hdf5plugin alone read the store.
    code = (
        "import sys, h5py, hdf5plugin, numpy as np\n"
        "with h5py.File(sys.argv[1], 'r') as h5:\n"
        "    print(int(h5['fragments/f000/level0'][:].astype(np.int64).sum()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(fragments[0])], capture_output=True, text=True, check=True)
    assert int(result.stdout) == checksum


def test_every_cellkd_module_that_opens_hdf5_imports_the_store_package() -> None:
    """Importing ``cellkd.store`` registers the Blosc filter (hdf5plugin); a module that opens HDF5 without it
    would fail on the stores with "required filter is not available"."""
    src = Path(__file__).resolve().parents[1] / "src" / "cellkd"
    missing = [
        str(path.relative_to(src))
        for path in sorted(src.rglob("*.py"))
        if "h5py.File(" in (text := path.read_text(encoding="utf-8"))
        and path.parent.name != "store"
        and "from cellkd.store" not in text
    ]
    assert missing == []
    assert "hdf5plugin" in (src / "store" / "compression.py").read_text(encoding="utf-8")
    assert "cellkd.store.compression import" in (src / "store" / "__init__.py").read_text(encoding="utf-8")
