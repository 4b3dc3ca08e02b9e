"""Tiled fragment inference: seamless stitching, bounded reads/writes, the segmentation mask store."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cellkd.errors import ConfigError, StoreError
from cellkd.inference import predict_fragment, segment_fragment_store
from cellkd.models.checkpoint import load_segmentation_model, save_segmentation_model
from cellkd.models.segmentation import create_segmentation_model, preprocess
from cellkd.store.fragments import Fragment, FragmentStoreWriter
from cellkd.training.segmentation import SegmentationTrainParams

TILE, OVERLAP = 64, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def local_conv_net(seed: int = 0) -> nn.Module:
    """Fully convolutional net, random weights from ``seed``: receptive radius 2 + 2 + 1 = 5 px < OVERLAP / 2."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 5, padding=2, bias=True),
            nn.Tanh(),
            nn.Conv2d(4, 1, 3, padding=1),
        ).eval()


def direct_probability(model: nn.Module, image: np.ndarray, margin: int = OVERLAP // 2) -> np.ndarray:
    """float32 (H, W): sigmoid of one forward pass over ``image`` zero-padded (uint8) by ``margin`` on all sides."""
    padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)))
    with torch.inference_mode():
        logits = model(preprocess(padded))
    return torch.sigmoid(logits)[0, 0, margin:-margin, margin:-margin].numpy()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3) uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


class RecordingArray:
    """Wraps an array; records the (rows, cols) size of every read or write."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        window = self.array[key]
        self.reads.append(window.shape[:2])
        return window

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        self.array[key] = value
        self.writes.append(self.array[key].shape[:2])


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_predict_fragment_stitches_seamlessly(batch_size: int) -> None:
    model = local_conv_net()
    image = random_image(300, 200)
    tiled = predict_fragment(model, image, tile=TILE, overlap=OVERLAP, batch_size=batch_size)
    assert tiled.shape == (300, 200) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, direct_probability(model, image), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(height=st.integers(1, 150), width=st.integers(1, 150), overlap=st.sampled_from([12, 20, 32]))
def test_predict_fragment_equals_whole_image_pass_for_any_size(height: int, width: int, overlap: int) -> None:
    model = local_conv_net(1)
    image = random_image(height, width, seed=height * 1000 + width)
    tiled = predict_fragment(model, image, tile=48, overlap=overlap, batch_size=4)
    np.testing.assert_allclose(tiled, direct_probability(model, image, overlap // 2), atol=1e-5)


def test_predict_fragment_reads_tiles_and_writes_block_rows_only() -> None:
    model = local_conv_net()
    image = RecordingArray(random_image(300, 200))
    out = RecordingArray(np.zeros((300, 200), dtype=np.float32))
    predict_fragment(model, image, tile=TILE, overlap=OVERLAP, batch_size=4, out=out)
    assert max(h * w for h, w in image.reads) <= TILE * TILE
    assert len(image.reads) == 10 * 7  # ceil(300 / 32) x ceil(200 / 32) tiles, each read once
    assert out.writes == [(32, 200)] * 9 + [(12, 200)]  # one write per row of blocks
    np.testing.assert_allclose(out.array, direct_probability(model, image.array), atol=1e-5)


def test_predict_fragment_reads_and_writes_h5py_datasets(tmp_path: Path) -> None:
    model = local_conv_net()
    image = random_image(130, 70)
    with h5py.File(tmp_path / "io.h5", "w") as h5:
        source = h5.create_dataset("image", data=image, chunks=(32, 32, 3))
        target = h5.create_dataset("prob", shape=(130, 70), dtype=np.uint8, chunks=(32, 32))
        assert predict_fragment(model, source, tile=TILE, overlap=OVERLAP, out=target) is target
        stored = target[:]
    expected = np.rint(direct_probability(model, image) * 255)
    assert np.abs(stored.astype(int) - expected).max() <= 1


def test_predict_fragment_threshold_gives_binary_mask() -> None:
    model = local_conv_net()
    image = random_image(100, 90)
    mask = predict_fragment(model, image, tile=TILE, overlap=OVERLAP, threshold=0.5)
    probability = direct_probability(model, image)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    decided = np.abs(probability - 0.5) > 1e-5  # ties may round either way
    assert np.array_equal(mask[decided], (probability >= 0.5)[decided].astype(np.uint8))


def test_predict_fragment_moves_model_to_device() -> None:
    model = local_conv_net()
    out = predict_fragment(model, random_image(40, 40), tile=TILE, overlap=OVERLAP, device="cpu")
    assert out.shape == (40, 40) and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("tile", "overlap", "match"),
    [(64, 31, "overlap=31 must be an even number"), (32, 32, "tile=32 must be larger than overlap=32")],
)
def test_predict_fragment_rejects_bad_tiling(tile: int, overlap: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        predict_fragment(local_conv_net(), random_image(10, 10), tile=tile, overlap=overlap)


def test_predict_fragment_rejects_mismatched_out() -> None:
    with pytest.raises(ConfigError, match=r"out has shape \(5, 5\); expected \(10, 10\)"):
        predict_fragment(local_conv_net(), random_image(10, 10), tile=TILE, overlap=OVERLAP, out=np.zeros((5, 5)))


TINY = SegmentationTrainParams(arch="unet", encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(8, 8, 8))
FRAGMENTS = (Fragment("f000", 0, 0, 150, 100), Fragment("f001", 400, 200, 37, 90))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of an untrained TINY U-Net (random weights, seed 0)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_segmentation_model(
            TINY.arch, encoder=TINY.encoder, encoder_depth=3, decoder_channels=TINY.decoder_channels
        )
    return save_segmentation_model(tmp_path_factory.mktemp("model") / "model.pt", model, TINY)


@pytest.fixture(scope="module")
def fragment_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fragment store of slide "s1" with FRAGMENTS at levels 0 and 1, random RGB noise."""
    path = tmp_path_factory.mktemp("fragments") / "s1.h5"
    with FragmentStoreWriter(path, slide="s1", source="s1.tiff", stain="raw", mpp=0.5) as writer:
        for i, fragment in enumerate(FRAGMENTS):
            for level in (0, 1):
                writer.create_level(fragment, level)[:] = random_image(*fragment.shape_at(level), seed=10 * i + level)
    return path


@pytest.mark.parametrize("level", [0, 1])
def test_segment_fragment_store_writes_one_mask_per_fragment(
    model_path: Path, fragment_store: Path, tmp_path: Path, level: int
) -> None:
    out = tmp_path / "masks" / "s1.h5"
    # on the CPU both ways give bit-identical masks; CUDA vs CPU is checked, with a tolerance, below
    segment_fragment_store(
        model_path, fragment_store, out, level=level, threshold=0.5, tile=TILE, overlap=16, device="cpu"
    )
    model = load_segmentation_model(model_path, "cpu")
    with h5py.File(out) as h5, h5py.File(fragment_store) as source:
        assert h5.attrs["complete"] and h5.attrs["slide"] == "s1" and h5.attrs["threshold"] == 0.5
        assert h5.attrs["model"] == str(model_path) and h5.attrs["level"] == level
        assert sorted(h5["fragments"]) == ["f000", "f001"]
        for fragment in FRAGMENTS:
            group = h5[f"fragments/{fragment.name}"]
            assert list(group) == [f"level{level}"]
            assert dict(group.attrs) == {
                "x": fragment.x,
                "y": fragment.y,
                "width": fragment.width,
                "height": fragment.height,
            }
            mask = group[f"level{level}"][:]
            assert mask.shape == fragment.shape_at(level) and mask.dtype == np.uint8
            image = source[f"fragments/{fragment.name}/level{level}"][:]
            expected = predict_fragment(model, image, tile=TILE, overlap=16, threshold=0.5)
            assert np.array_equal(mask, expected)
    assert not list(out.parent.glob("*.partial"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run it on a GPU machine")
def test_segmentation_on_cuda_agrees_with_the_cpu(model_path: Path, fragment_store: Path, tmp_path: Path) -> None:
    """cuDNN's convolutions (TF32 where allowed) round differently: probabilities agree closely, not bitwise."""
    with h5py.File(fragment_store) as source:
        image = source["fragments/f000/level0"][:]
    on_cpu = predict_fragment(load_segmentation_model(model_path, "cpu"), image, tile=TILE, overlap=16)
    on_cuda = predict_fragment(load_segmentation_model(model_path, "cuda"), image, tile=TILE, overlap=16)
    assert on_cuda.shape == on_cpu.shape
    assert np.abs(on_cuda - on_cpu).max() < 1e-2

    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.h5"
        segment_fragment_store(model_path, fragment_store, out, tile=TILE, overlap=16, device=device)
        with h5py.File(out) as h5:
            masks[device] = np.concatenate([h5[f"fragments/{f.name}/level0"][:].ravel() for f in FRAGMENTS])
    assert (masks["cpu"] == masks["cuda"]).mean() > 0.99


def h5_contents(path: Path) -> dict[str, object]:
    """Every attribute and dataset of an HDF5 file, by name (``name@attr`` for attributes), as comparable values."""
    contents: dict[str, object] = {}

    def visit(name: str, item: h5py.Group | h5py.Dataset) -> None:
        contents.update({f"{name}@{k}": v for k, v in item.attrs.items()})
        if isinstance(item, h5py.Dataset):
            contents[name] = item[:].tobytes()

    with h5py.File(path) as h5:
        contents.update({f"@{k}": v for k, v in h5.attrs.items()})
        h5.visititems(visit)
    return contents


def test_copied_selected_masks_equal_segmenting_the_slide_with_the_selected_model(
    model_path: Path, fragment_store: Path, tmp_path: Path
) -> None:
    """The workflow's copy_selected_masks (training slides) writes what segment_slide would, without segmenting."""
    from cellkd.report.segmentation import copy_selected_masks, selected_model_path

    segmentation = tmp_path / "segmentation/raw"
    for arch, seed in (("unet", 0), ("unetplusplus", 0)):  # both first-seed models (here the same weights)
        (segmentation / arch / f"seed{seed}").mkdir(parents=True)
        (segmentation / arch / f"seed{seed}/model.pt").write_bytes(model_path.read_bytes())
    # segment_slide_per_arch's stores
    per_arch = {arch: segmentation / arch / "masks/s1.h5" for arch in ("unet", "unetplusplus")}
    settings = {"tile": TILE, "overlap": 16, "device": "cpu"}
    for arch, out in per_arch.items():
        segment_fragment_store(segmentation / arch / "seed0/model.pt", fragment_store, out, **settings)
    selected = segmentation / "selected.json"
    selected.write_text(json.dumps({"arch": "unetplusplus", "seed": 0}))
    segmented = tmp_path / "segmented.h5"  # what segment_slide does with selected.json
    segment_fragment_store(selected_model_path(selected), fragment_store, segmented, **settings)

    copied = segmentation / "masks/s1.h5"
    assert copy_selected_masks(selected, per_arch, copied) == "unetplusplus"
    assert h5_contents(copied) == h5_contents(segmented)
    assert copied.read_bytes() == per_arch["unetplusplus"].read_bytes()
    assert h5_contents(copied) != h5_contents(per_arch["unet"])  # the model attr tells the two apart

    # a store segmented with another model than the selected one is refused, not copied
    selected.write_text(json.dumps({"arch": "unet", "seed": 1}))
    other = tmp_path / "other.h5"
    with pytest.raises(StoreError, match=r"segmented with .*unet/seed0/model.pt, not with .*unet/seed1/model.pt"):
        copy_selected_masks(selected, per_arch, other)
    with pytest.raises(StoreError, match="selects 'unet', but masks were given for \\['unetplusplus'\\] only"):
        copy_selected_masks(selected, {"unetplusplus": per_arch["unetplusplus"]}, other)
    assert not other.exists()


def test_segment_fragment_store_missing_model_leaves_no_output(fragment_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s1.h5"
    with pytest.raises(StoreError, match="no such model checkpoint"):
        segment_fragment_store(tmp_path / "missing.pt", fragment_store, out)
    assert not out.exists()


def test_segment_fragment_store_rejects_bad_threshold(model_path: Path, fragment_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="threshold=1.5 must be in"):
        segment_fragment_store(model_path, fragment_store, tmp_path / "s1.h5", threshold=1.5)


def test_segment_fragment_store_logs_progress_by_tiles(model_path: Path, fragment_store: Path, tmp_path: Path) -> None:
    from cellkd.workflow import log_to

    log = tmp_path / "segment.log"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        log_to(str(log))
        segment_fragment_store(model_path, fragment_store, tmp_path / "s1.h5", tile=TILE, overlap=16, batch_size=2)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    text = log.read_text()
    stride = TILE - 16
    counts = [math.ceil(f.height / stride) * math.ceil(f.width / stride) for f in FRAGMENTS]
    assert f"2 fragments, {sum(counts)} tiles of {TILE} px" in text
    for number, (fragment, count) in enumerate(zip(FRAGMENTS, counts, strict=True), start=1):
        batches = math.ceil(count / 2)
        # the tqdm bar of the fragment's tile batches, written to the rule's log, reaches its end
        assert f"segment s1 {fragment.name} ({number}/2): {count} tiles, batches of 2: 100%" in text
        assert f"{batches}/{batches}" in text
    assert f"{sum(counts)}/{sum(counts)} tiles of the slide done" in text
