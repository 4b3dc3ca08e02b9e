"""Tests for cellkd.annotations.public: MoNuSeg XML / Lizard .mat readers and their import as patch stores."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import scipy.io
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import box

from cellkd.annotations import (
    find_pairs,
    import_public_dataset,
    instance_masks,
    polygon_masks,
    public_store_dir,
    read_lizard_mat,
    read_monuseg_annotation,
    read_monuseg_xml,
    write_image_stores,
)
from cellkd.errors import AnnotationError, ConfigError
from cellkd.slides import block_mean
from cellkd.store.fragments import FragmentStore, FragmentStoreWriter
from cellkd.store.patches import PatchParams, PatchStore, assign_splits, split_counts
from cellkd.types import DOWNSAMPLES

Vertices = Sequence[tuple[float, float]]
MASK_SET = "truth"


# --------------------------------------------------------------------------- writers in the real formats


def imagescope_xml(annotations: Sequence[Sequence[Vertices]]) -> str:
    """Aperio ImageScope XML as MoNuSeg ships it: one <Annotation> per item, one <Region> per vertex list."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<Annotations MicronsPerPixel="0.252100">']
    region_id = 0
    for a, regions in enumerate(annotations, start=1):
        out.append(f'<Annotation Id="{a}" Name="" ReadOnly="0" LineColor="65280" Visible="1">')
        out.append('<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes><Regions>')
        out.append('<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>')
        out.append("</RegionAttributeHeaders>")
        for vertices in regions:
            region_id += 1
            out.append(f'<Region Id="{region_id}" Type="0" Zoom="0.5" Selected="0" NegativeROA="0"><Attributes/>')
            out.append("<Vertices>")
            out.extend(f'<Vertex X="{x:.6f}" Y="{y:.6f}" Z="0"/>' for x, y in vertices)
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    return "\n".join(out)


def rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Vertices of the axis-aligned rectangle [x0, x1] x [y0, y1] (level-0 px), unclosed as ImageScope writes them."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def tile_pixels(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3) with every value in 1..255, so zero padding in a patch is unmistakable."""
    return np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)


def filled(height: int, width: int, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """bool (H, W): pixels whose centre lies in one of the level-0 boxes (x0, y0, x1, y1) with integer corners."""
    out = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        out[y0:y1, x0:x1] = True
    return out


def at_least_half(mask: np.ndarray, down: int) -> np.ndarray:
    """Oracle for Lizard's reduced levels: a block is set when >= half of its present pixels are."""
    height, width = mask.shape
    h, w = math.ceil(height / down), math.ceil(width / down)
    padded, present = np.zeros((h * down, w * down)), np.zeros((h * down, w * down))
    padded[:height, :width], present[:height, :width] = mask, 1
    sums = padded.reshape(h, down, w, down).sum(axis=(1, 3))
    counts = present.reshape(h, down, w, down).sum(axis=(1, 3))
    return 2 * sums >= counts


# --------------------------------------------------------------------------- fixtures

# MoNuSeg image A: 80 x 96 (H x W). Squares with corners on multiples of 4 cover exactly
# (side / d)^2 pixels at level k; the third crosses the right edge and is clipped to x < 96.
A_BOXES = [(8, 8, 24, 24), (40, 16, 72, 48), (88, 60, 104, 76)]
# Image B: a square and an L-shaped polygon (= two boxes), in two <Annotation> elements.
B_BOXES = [(0, 0, 16, 16), (32, 32, 64, 40), (32, 40, 40, 64)]
L_SHAPE = [(32, 32), (64, 32), (64, 40), (40, 40), (40, 64), (32, 64)]
MONUSEG_SHAPE = (80, 96)


@pytest.fixture
def monuseg_dir(tmp_path: Path) -> Path:
    """MoNuSeg-style folder: A in 'Tissue Images'/'Annotations' subfolders, B flat; both 80 x 96 RGB TIFFs.

    A.xml: the 3 ``A_BOXES`` squares + one 2-vertex (degenerate) region, region index 3.
    B.xml: ``B_BOXES`` as a square and an L-shaped polygon. Pixels: ``tile_pixels(80, 96, seed)``, A 1, B 2.
    """
    root = tmp_path / "MoNuSeg 2018 Training Data"
    (root / "Tissue Images").mkdir(parents=True)
    (root / "Annotations").mkdir()
    tifffile.imwrite(root / "Tissue Images" / "A.tif", tile_pixels(*MONUSEG_SHAPE, 1), photometric="rgb")
    a_regions = [rect(*b) for b in A_BOXES] + [[(50.0, 70.0), (60.0, 70.0)]]
    (root / "Annotations" / "A.xml").write_text(imagescope_xml([a_regions]), encoding="utf-8")
    tifffile.imwrite(root / "B.tif", tile_pixels(*MONUSEG_SHAPE, 2), photometric="rgb")
    (root / "B.xml").write_text(imagescope_xml([[rect(*B_BOXES[0])], [L_SHAPE]]), encoding="utf-8")
    return root


# Lizard: instance ids in (row slice, column slice). Instance 2 is a 2-row strip (level 2: 8 of 16
# pixels -> set); instance 3 a 1-row strip (level 1: 2 of 4 -> set; level 2: 4 of 16 -> unset).
LIZARD_INSTANCES = {
    1: (slice(4, 12), slice(8, 16)),
    2: (slice(0, 2), slice(20, 24)),
    3: (slice(8, 9), slice(0, 4)),
    4: (slice(4, 12), slice(16, 20)),  # touches instance 1: the masks see one blob
    5: (slice(30, 40), slice(40, 52)),  # reaches the bottom-right corner of L1
}
LIZARD_SHAPES = {"L1": (40, 52), "L2": (36, 44)}


def inst_map(height: int, width: int, shift: int) -> np.ndarray:
    """int32 (H, W) Lizard instance map: ``LIZARD_INSTANCES`` clipped to the image, ids + ``shift``."""
    out = np.zeros((height, width), dtype=np.int32)
    for inst, (rows, cols) in LIZARD_INSTANCES.items():
        out[rows, cols] = inst + shift
    return out


def write_lizard_mat(path: Path, instances: np.ndarray) -> None:
    """A Lizard label file: inst_map plus class, id, bbox, centroid as in the released .mat files."""
    ids = np.unique(instances[instances > 0])
    bbox = np.array([[*np.argwhere(instances == i).min(0), *np.argwhere(instances == i).max(0)] for i in ids])
    centroid = np.array([np.argwhere(instances == i).mean(0)[::-1] for i in ids])
    mat = {"inst_map": instances, "class": (ids % 6 + 1)[:, None], "id": ids[:, None], "bbox": bbox}
    scipy.io.savemat(path, {**mat, "centroid": centroid})


@pytest.fixture
def lizard_dir(tmp_path: Path) -> Path:
    """Lizard-style folder: L1 (40 x 52) in Lizard_Images1, L2 (36 x 44) in Lizard_Images2, labels in
    Lizard_Labels/Labels, plus an Overlay preview of L1 that must be ignored. Pixels: ``tile_pixels``, L1 3, L2 4.
    """
    root = tmp_path / "lizard"
    for i, (name, (height, width)) in enumerate(LIZARD_SHAPES.items(), start=1):
        (root / f"Lizard_Images{i}").mkdir(parents=True)
        Image.fromarray(tile_pixels(height, width, i + 2)).save(root / f"Lizard_Images{i}" / f"{name}.png")
    (root / "Lizard_Labels" / "Labels").mkdir(parents=True)
    (root / "Lizard_Labels" / "Overlay").mkdir()
    for name, (height, width) in LIZARD_SHAPES.items():
        write_lizard_mat(root / "Lizard_Labels" / "Labels" / f"{name}.mat", inst_map(height, width, shift=10))
    Image.fromarray(tile_pixels(8, 8, 0)).save(root / "Lizard_Labels" / "Overlay" / "L1.png")
    return root


def stitch(store: PatchStore, slide: str, level: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reassemble the (image, mask) canvases of one slide and level from its patches; each window used once."""
    size = store.patch_size
    rows = store.provenance.query("slide == @slide and level == @level")
    h, w = (math.ceil(s / size) * size for s in shape)
    image = np.zeros((h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w, 1), dtype=np.uint8)
    seen = np.zeros((h, w), dtype=int)
    masks = store.masks(MASK_SET)
    for i, row in rows.iterrows():
        window = np.s_[row.y : row.y + size, row.x : row.x + size]
        image[window], mask[window] = store.images[i], masks[i]
        seen[window] += 1
    assert (seen == 1).all(), f"patches of {slide} level {level} do not tile the canvas exactly once"
    return image, mask


def expected_padded(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` zero-padded at the bottom/right to whole ``size`` patches."""
    h, w = (math.ceil(s / size) * size for s in array.shape[:2])
    out = np.zeros((h, w, *array.shape[2:]), dtype=array.dtype)
    out[: array.shape[0], : array.shape[1]] = array
    return out


# --------------------------------------------------------------------------- MoNuSeg XML


def test_read_monuseg_xml_reads_every_region_and_warns_on_degenerate(
    monuseg_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        polygons = read_monuseg_xml(monuseg_dir / "Annotations" / "A.xml")
    assert [p.bounds for p in polygons] == [tuple(map(float, b)) for b in A_BOXES]
    assert "A.xml" in caplog.text
    assert "region 3 (Id=4)" in caplog.text


def test_read_monuseg_xml_repairs_self_intersecting_polygon(tmp_path: Path) -> None:
    """A bowtie (crossing at (56, 64)) becomes two valid triangles of area 64 each."""
    path = tmp_path / "bowtie.xml"
    path.write_text(imagescope_xml([[[(48, 56), (64, 72), (64, 56), (48, 72)]]]), encoding="utf-8")
    polygons = read_monuseg_xml(path)
    assert len(polygons) == 2
    assert all(p.is_valid for p in polygons)
    assert sorted(p.area for p in polygons) == pytest.approx([64.0, 64.0])


def test_read_monuseg_xml_collinear_region_is_dropped_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "line.xml"
    path.write_text(imagescope_xml([[rect(0, 0, 8, 8), [(0, 0), (4, 4), (8, 8)]]]), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        polygons = read_monuseg_xml(path)
    assert len(polygons) == 1
    assert "region 1 (Id=2) has no area" in caplog.text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<Annotations><Annotation><Regions><Region>", "malformed XML"),
        ('{"type": "FeatureCollection"}', "malformed XML"),
        ("<ASAP_Annotations/>", "root element is <ASAP_Annotations>"),
        ('<Annotations><Region><Vertices><Vertex X="1"/></Vertices></Region></Annotations>', "without numeric X and Y"),
        ('<Annotations><Region><Vertices><Vertex X="a" Y="1"/></Vertices></Region></Annotations>', "region 0"),
    ],
)
def test_read_monuseg_xml_malformed_raises_naming_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "broken.xml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=match) as info:
        read_monuseg_xml(path)
    assert str(path) in str(info.value)


def test_write_image_stores_takes_mpp_from_the_monuseg_xml_and_lizard_default(
    monuseg_dir: Path, lizard_dir: Path, tmp_path: Path
) -> None:
    """The TIFF has no resolution tags; the XML says 0.2521 µm/px. Lizard PNGs say nothing: 0.5 (20x)."""
    _, mpp = read_monuseg_annotation(monuseg_dir / "B.xml")
    assert mpp == pytest.approx(0.2521)
    write_image_stores(
        monuseg_dir / "B.tif", monuseg_dir / "B.xml", "monuseg", MASK_SET, tmp_path / "f.h5", tmp_path / "m.h5"
    )
    with FragmentStore(tmp_path / "f.h5") as store:
        assert store.mpp == pytest.approx(0.2521)
    labels = lizard_dir / "Lizard_Labels" / "Labels"
    image = lizard_dir / "Lizard_Images1" / "L1.png"
    write_image_stores(image, labels / "L1.mat", "lizard", MASK_SET, tmp_path / "lf.h5", tmp_path / "lm.h5")
    with FragmentStore(tmp_path / "lf.h5") as store:
        assert store.mpp == 0.5


def test_lizard_at_a_finer_working_mpp_is_upsampled_with_its_labels_sampled_not_blended(
    lizard_dir: Path, tmp_path: Path
) -> None:
    """Lizard (0.5 µm/px) imported at 0.25: twice the size; each working pixel takes the label under its centre."""
    labels = lizard_dir / "Lizard_Labels" / "Labels"
    image = lizard_dir / "Lizard_Images1" / "L1.png"
    write_image_stores(image, labels / "L1.mat", "lizard", MASK_SET, tmp_path / "f.h5", tmp_path / "m.h5", 0.25)
    height, width = LIZARD_SHAPES["L1"]
    with FragmentStore(tmp_path / "f.h5") as store:
        assert (store.mpp, store.geometry.slide_mpp, store.geometry.scale) == (0.25, 0.5, 0.5)
        assert store.slide_size == (width, height)
        (fragment,) = store.fragments
        assert (fragment.height, fragment.width) == (2 * height, 2 * width)
        pixels = store.level(fragment, 0)[()]
    # bilinear upsampling by 2 at the pixel centres: OpenCV's, inside the border (past it the slide reads white)
    reference = cv2.resize(tile_pixels(height, width, 3), (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    difference = np.abs(pixels.astype(int) - reference)[1:-1, 1:-1]
    assert difference.max() <= 1
    with h5py.File(tmp_path / "m.h5", "r") as masks:
        level0 = masks[f"fragments/f000/{MASK_SET}/level0"][()][..., 0]
    nucleus = inst_map(height, width, shift=10) > 0
    np.testing.assert_array_equal(level0, np.repeat(np.repeat(nucleus, 2, axis=0), 2, axis=1))


def test_monuseg_xml_mpp_overrides_disagreeing_tags_with_warning(
    monuseg_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tifffile.imwrite(
        tmp_path / "B.tif",
        tile_pixels(*MONUSEG_SHAPE, 2),
        photometric="rgb",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )  # 0.5 µm/px
    with caplog.at_level(logging.WARNING):
        write_image_stores(
            tmp_path / "B.tif", monuseg_dir / "B.xml", "monuseg", MASK_SET, tmp_path / "f.h5", tmp_path / "m.h5"
        )
    with FragmentStore(tmp_path / "f.h5") as store:
        assert store.mpp == pytest.approx(0.2521)
    assert "resolution tags say 0.5 µm/px but" in caplog.text and "B.xml says 0.2521" in caplog.text


@pytest.mark.parametrize(
    ("value", "expected"), [("", None), ("0.25", 0.25), ("0", "not a positive"), ("abc", "not a positive")]
)
def test_read_monuseg_annotation_reads_or_rejects_microns_per_pixel(
    tmp_path: Path, value: str, expected: object
) -> None:
    path = tmp_path / "a.xml"
    path.write_text(
        imagescope_xml([[rect(0, 0, 4, 4)]]).replace('MicronsPerPixel="0.252100"', f'MicronsPerPixel="{value}"')
    )
    if isinstance(expected, str):
        with pytest.raises(AnnotationError, match=rf'a\.xml: MicronsPerPixel="{value}" is {expected} number'):
            read_monuseg_annotation(path)
    else:
        assert read_monuseg_annotation(path)[1] == expected


@settings(max_examples=25, deadline=None)
@given(
    corners=st.tuples(*(st.integers(-4, 30) for _ in range(4))).filter(lambda c: c[0] < c[2] and c[1] < c[3]),
)
def test_polygon_masks_aligned_rectangle_covers_clipped_area_over_d_squared(
    corners: tuple[int, int, int, int],
) -> None:
    """A rectangle with corners on multiples of 4 covers (clipped area) / d^2 pixels at every level."""
    x0, y0, x1, y1 = (4 * c for c in corners)
    width, height = 100, 72
    masks = polygon_masks([box(x0, y0, x1, y1)], width, height)
    clipped = max(0, min(x1, width) - max(x0, 0)) * max(0, min(y1, height) - max(y0, 0))
    for level, mask in enumerate(masks):
        d = DOWNSAMPLES[level]
        assert mask.shape == (math.ceil(height / d), math.ceil(width / d), 1)
        assert int(mask.sum()) == clipped // d**2


# --------------------------------------------------------------------------- Lizard .mat


def test_read_lizard_mat_returns_foreground_of_inst_map(tmp_path: Path) -> None:
    instances = inst_map(40, 52, shift=10)
    write_lizard_mat(tmp_path / "L.mat", instances)
    mask = read_lizard_mat(tmp_path / "L.mat")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, instances > 0)


def test_read_lizard_mat_without_inst_map_raises_listing_keys(tmp_path: Path) -> None:
    path = tmp_path / "labels.mat"
    scipy.io.savemat(path, {"class": np.array([[1]]), "centroid": np.zeros((1, 2))})
    with pytest.raises(
        AnnotationError, match=r"labels\.mat: has no 'inst_map' variable \(found \['centroid', 'class'\]"
    ):
        read_lizard_mat(path)


def test_read_lizard_mat_not_a_mat_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "fake.mat"
    path.write_text("not a MATLAB file, just some text that is long enough", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"fake\.mat: cannot read MATLAB file"):
        read_lizard_mat(path)


def test_read_lizard_mat_inst_map_not_2d_raises(tmp_path: Path) -> None:
    path = tmp_path / "cube.mat"
    scipy.io.savemat(path, {"inst_map": np.zeros((4, 4, 2), dtype=np.int32)})
    with pytest.raises(AnnotationError, match=r"cube\.mat: inst_map has shape \(4, 4, 2\)"):
        read_lizard_mat(path)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    seed=st.integers(0, 2**16),
)
def test_instance_masks_set_a_block_when_at_least_half_is_nucleus(shape: tuple[int, int], seed: int) -> None:
    mask = np.random.default_rng(seed).random(shape) < 0.5
    for level, out in enumerate(instance_masks(mask)):
        np.testing.assert_array_equal(out[..., 0], at_least_half(mask, DOWNSAMPLES[level]))


# --------------------------------------------------------------------------- pairing


def test_find_pairs_matches_by_stem_in_any_subfolder(monuseg_dir: Path) -> None:
    pairs = find_pairs(monuseg_dir, "monuseg")
    assert [(i.relative_to(monuseg_dir), a.relative_to(monuseg_dir)) for i, a in pairs] == [
        (Path("Tissue Images/A.tif"), Path("Annotations/A.xml")),
        (Path("B.tif"), Path("B.xml")),
    ]


def test_find_pairs_lizard_ignores_overlay_previews(lizard_dir: Path) -> None:
    pairs = find_pairs(lizard_dir, "lizard")
    assert [(i.relative_to(lizard_dir).as_posix(), a.name) for i, a in pairs] == [
        ("Lizard_Images1/L1.png", "L1.mat"),
        ("Lizard_Images2/L2.png", "L2.mat"),
    ]


def test_find_pairs_skips_hidden_and_macosx_files(monuseg_dir: Path) -> None:
    (monuseg_dir / "__MACOSX").mkdir()
    (monuseg_dir / "__MACOSX" / "C.tif").write_bytes(b"resource fork")
    (monuseg_dir / "__MACOSX" / "C.xml").write_bytes(b"resource fork")
    (monuseg_dir / "._A.tif").write_bytes(b"resource fork")
    assert [i.stem for i, _ in find_pairs(monuseg_dir, "monuseg")] == ["A", "B"]


def test_find_pairs_warns_about_unpaired_files(monuseg_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tifffile.imwrite(monuseg_dir / "lonely.tif", tile_pixels(20, 20, 0), photometric="rgb")
    (monuseg_dir / "orphan.xml").write_text(imagescope_xml([]), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        pairs = find_pairs(monuseg_dir, "monuseg")
    assert [i.stem for i, _ in pairs] == ["A", "B"]
    assert "1 image(s) without annotation" in caplog.text and "lonely.tif" in caplog.text
    assert "1 annotation file(s) without image" in caplog.text and "orphan.xml" in caplog.text


def test_find_pairs_prefers_tif_and_rejects_ambiguous_names(monuseg_dir: Path) -> None:
    Image.fromarray(tile_pixels(*MONUSEG_SHAPE, 9)).save(monuseg_dir / "B.png")
    assert [i.name for i, _ in find_pairs(monuseg_dir, "monuseg")] == ["A.tif", "B.tif"]
    (monuseg_dir / "copy").mkdir()
    tifffile.imwrite(monuseg_dir / "copy" / "B.tif", tile_pixels(*MONUSEG_SHAPE, 2), photometric="rgb")
    with pytest.raises(AnnotationError, match=r"image name 'B' is ambiguous: .*B\.tif, .*copy/B\.tif"):
        find_pairs(monuseg_dir, "monuseg")


@pytest.mark.parametrize("kind", ["monuseg", "lizard"])
def test_find_pairs_without_pairs_raises_naming_folder_and_layout(tmp_path: Path, kind: str) -> None:
    (tmp_path / "only_images").mkdir()
    Image.fromarray(tile_pixels(20, 20, 0)).save(tmp_path / "only_images" / "x.png")
    expected = "Aperio ImageScope" if kind == "monuseg" else "Lizard_Labels/Labels/NAME.mat"
    with pytest.raises(AnnotationError, match=rf"only_images: no {kind} image/annotation pairs found .*{expected}"):
        find_pairs(tmp_path / "only_images", kind)  # type: ignore[arg-type]


def test_find_pairs_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"nowhere: monuseg dataset folder does not exist"):
        find_pairs(tmp_path / "nowhere", "monuseg")


def test_find_pairs_unknown_kind_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown public dataset kind 'pannuke'; expected one of \['monuseg'"):
        find_pairs(tmp_path, "pannuke")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- import as patch store


def test_import_monuseg_writes_patches_with_masks_in_place(monuseg_dir: Path, tmp_path: Path) -> None:
    """80 x 96 tiles, P = 64: level 0 gives 2 x 2 patches, levels 1 and 2 one each -> 6 per image."""
    out = tmp_path / "patches" / "raw" / "monuseg.h5"
    params = PatchParams(size=64, split=(0.5, 0.25, 0.25), seed=3)
    assert import_public_dataset(monuseg_dir, "monuseg", out, MASK_SET, params) == 12
    pixels = {"A": tile_pixels(*MONUSEG_SHAPE, 1), "B": tile_pixels(*MONUSEG_SHAPE, 2)}
    boxes = {"A": A_BOXES, "B": B_BOXES}
    with PatchStore(out) as store:
        assert (store.source, store.stain, store.classes, store.annotation_sets) == (
            "monuseg",
            "raw",
            ["nucleus"],
            [MASK_SET],
        )
        assert store.provenance.slide.value_counts().to_dict() == {"A": 6, "B": 6}
        assert set(store.provenance.fragment) == {"f000"}
        # Each 80 x 96 image is one area block (64 * 4 = 256 level-0 px), so all its patches share one split.
        per_image = assign_splits(2, params.split, 3, "monuseg")
        np.testing.assert_array_equal(store.provenance.split, np.repeat(per_image, 6))
        assert np.bincount(per_image, minlength=3).tolist() == list(split_counts(2, params.split))
        for slide in ("A", "B"):
            full = filled(*MONUSEG_SHAPE, boxes[slide])
            for level, d in enumerate(DOWNSAMPLES):
                shape = (math.ceil(80 / d), math.ceil(96 / d))
                image, mask = stitch(store, slide, level, shape)
                expected_image = pixels[slide] if d == 1 else block_mean(pixels[slide], d)
                np.testing.assert_array_equal(image, expected_padded(expected_image, 64))
                # Boxes have corners on multiples of 4, so level k is the level-0 mask sampled every d px.
                np.testing.assert_array_equal(mask[..., 0], expected_padded(full[::d, ::d].astype(np.uint8), 64))
    assert int(mask.sum()) == sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in B_BOXES) // 16
    # The patch store copies no pixels: it reads them from the stores kept beside it.
    stores = public_store_dir(out)
    assert stores == tmp_path / "patches" / "raw" / "monuseg.stores"
    assert sorted(p.relative_to(stores).as_posix() for p in stores.rglob("*.h5")) == [
        "fragments/A.h5",
        "fragments/B.h5",
        "masks/A.h5",
        "masks/B.h5",
    ]
    with PatchStore(out) as store:
        assert store.fragment_stores == [stores / "fragments/A.h5", stores / "fragments/B.h5"]
        assert store.mask_stores == [stores / "masks/A.h5", stores / "masks/B.h5"]


def test_import_lizard_writes_at_least_half_masks_per_level(lizard_dir: Path, tmp_path: Path) -> None:
    """L1 40 x 52 and L2 36 x 44, P = 32: 4 level-0 patches and one per reduced level -> 6 per image."""
    out = tmp_path / "lizard.h5"
    assert import_public_dataset(lizard_dir, "lizard", out, MASK_SET, PatchParams(size=32)) == 12
    with PatchStore(out) as store:
        assert store.provenance.slide.value_counts().to_dict() == {"L1": 6, "L2": 6}
        for i, (slide, (height, width)) in enumerate(LIZARD_SHAPES.items(), start=1):
            nuclei = inst_map(height, width, 0) > 0
            for level, d in enumerate(DOWNSAMPLES):
                shape = (math.ceil(height / d), math.ceil(width / d))
                image, mask = stitch(store, slide, level, shape)
                pixels = tile_pixels(height, width, i + 2)
                np.testing.assert_array_equal(image, expected_padded(pixels if d == 1 else block_mean(pixels, d), 32))
                expected = at_least_half(nuclei, d).astype(np.uint8)
                np.testing.assert_array_equal(mask[..., 0], expected_padded(expected, 32))
            _, level2 = stitch(store, slide, 2, (math.ceil(height / 4), math.ceil(width / 4)))
            assert level2[0, 5, 0] == 1, "instance 2 (8 of 16 px of the block) must be set at level 2"
            assert level2[2, 0, 0] == 0, "instance 3 (4 of 16 px of the block) must be unset at level 2"


def test_import_applies_normalize_hook_and_removes_temporary_stores(lizard_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[Path, Path]] = []

    def invert(raw: Path, out: Path) -> None:
        """Stand-in for Macenko: writes a stain="inverted" store with 255 - pixels."""
        calls.append((raw, out))
        with (
            FragmentStore(raw) as src,
            FragmentStoreWriter(out, slide=src.slide, source=src.source, stain="inverted", mpp=src.mpp) as w,
        ):
            for fragment in src.fragments:
                for level in range(len(DOWNSAMPLES)):
                    w.create_level(fragment, level)[:] = 255 - src.level(fragment, level)[:]

    work = tmp_path / "work"
    out = tmp_path / "lizard.h5"
    import_public_dataset(lizard_dir, "lizard", out, MASK_SET, PatchParams(size=32), work_dir=work, normalize=invert)
    assert len(calls) == 2
    assert list(work.iterdir()) == [], "the temporary folder must be removed"
    assert [out for _, out in calls] == [
        public_store_dir(out) / "fragments/L1.h5",
        public_store_dir(out) / "fragments/L2.h5",
    ]
    with PatchStore(out) as store:
        assert store.stain == "inverted"
        image, _ = stitch(store, "L1", 0, LIZARD_SHAPES["L1"])
        np.testing.assert_array_equal(image[:40, :52], 255 - tile_pixels(40, 52, 3))


def test_import_lizard_size_mismatch_raises_naming_both_files(lizard_dir: Path, tmp_path: Path) -> None:
    write_lizard_mat(lizard_dir / "Lizard_Labels" / "Labels" / "L2.mat", inst_map(40, 52, shift=0))
    work, out = tmp_path / "work", tmp_path / "lizard.h5"
    with pytest.raises(AnnotationError, match=r"L2\.mat: inst_map is 52 x 40 px .* its image .*L2\.png is 44 x 36 px"):
        import_public_dataset(lizard_dir, "lizard", out, MASK_SET, PatchParams(size=32), work_dir=work)
    assert not out.exists()
    assert list(work.iterdir()) == []


def test_import_monuseg_annotations_outside_image_raise_naming_both_files(monuseg_dir: Path, tmp_path: Path) -> None:
    """Nuclei of a 2000 x 2000 tile paired with an 80 x 96 image: the pairing is wrong."""
    far = [rect(1000 + 20 * i, 1500, 1010 + 20 * i, 1510) for i in range(5)]
    (monuseg_dir / "B.xml").write_text(imagescope_xml([far]), encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"B\.xml: 5 of 5 nuclei lie outside its image .*B\.tif \(96 x 80 px"):
        import_public_dataset(monuseg_dir, "monuseg", tmp_path / "m.h5", MASK_SET, PatchParams(size=64))


def test_import_monuseg_malformed_xml_raises_naming_file(monuseg_dir: Path, tmp_path: Path) -> None:
    (monuseg_dir / "B.xml").write_text("<Annotations><Region>", encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"B\.xml: malformed XML"):
        import_public_dataset(monuseg_dir, "monuseg", tmp_path / "m.h5", MASK_SET, PatchParams(size=64))
    assert not (tmp_path / "m.h5").exists()


def test_import_lizard_label_without_inst_map_raises(lizard_dir: Path, tmp_path: Path) -> None:
    scipy.io.savemat(lizard_dir / "Lizard_Labels" / "Labels" / "L1.mat", {"class": np.array([[1]])})
    with pytest.raises(AnnotationError, match=r"L1\.mat: has no 'inst_map'"):
        import_public_dataset(lizard_dir, "lizard", tmp_path / "l.h5", MASK_SET, PatchParams(size=32))


@pytest.mark.parametrize("mask_set", ["", "a/b"])
def test_import_rejects_invalid_mask_set_name(monuseg_dir: Path, tmp_path: Path, mask_set: str) -> None:
    with pytest.raises(ConfigError, match="must be non-empty and contain no '/'"):
        import_public_dataset(monuseg_dir, "monuseg", tmp_path / "m.h5", mask_set, PatchParams(size=64))
