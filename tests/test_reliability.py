"""Reliability matrix: bad inputs, crashes (SIGKILL, disk full), determinism, inputs left untouched.

Rows already covered by a module's own tests are referenced in the README table, not repeated
here. This file adds what no module test covers:

- the config and the slide sheet (``cellkd.config``), called directly (no Snakemake);
- a class list that does not cover the annotations, end to end through ``write_mask_store``;
- a slide smaller than one patch, end to end through ``extract_fragments`` and ``cut_patches``;
- for every HDF5 store writer (fragments, masks, patches, nuclei, segmentation masks): SIGKILL
  mid-write then rerun, a simulated full disk, a stale ``.partial`` beside the output, two runs
  giving identical stores, and the inputs unchanged byte for byte.

Run as a script (``python tests/test_reliability.py child ...``), this file is the child process the
kill tests start: it runs one writer whose progress loop stops after the first item and waits to be killed.
Each kill test takes about a second; the segmentation one is marked slow (its child imports torch).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image

from cellkd.annotations import write_mask_store, write_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES, classes_from_config
from cellkd.config import load_sheet, validate_config
from cellkd.errors import AnnotationError, ConfigError, SlideError, StoreError
from cellkd.nuclei import NucleiParams, extract_nuclei
from cellkd.slides import TissueParams, extract_fragments
from cellkd.stain import MacenkoParams, normalize_fragment_store
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import FragmentStore
from cellkd.store.patches import PatchParams, PatchStore, cut_patches

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
CONFIG_SCHEMA = REPO / "schemas" / "config.schema.yaml"
SHEET_SCHEMA = REPO / "schemas" / "sheet.schema.yaml"

CLASSES = DEFAULT_CLASSES  # other, immune, muscle
WIDTH, HEIGHT, MPP = 640, 448, 0.5
TISSUE_RECTS = ((60, 50, 260, 200), (340, 220, 580, 400))
"""Level-0 tissue rectangles (x0, y0, x1, y1) of the test slide: two fragments."""
TISSUE = TissueParams(min_area_um2=1000.0)
PATCHES = PatchParams(size=64, seed=3)
NUCLEI = NucleiParams(seed=3)

# Every module whose writer loops through cellkd.workflow.progress: the child replaces each one's
# ``progress`` so that it stops after the first item, mid-write.
PROGRESS_USERS = (
    "cellkd.slides.extract",
    "cellkd.annotations.rasterize",
    "cellkd.store.patches",
    "cellkd.nuclei.extract",
    "cellkd.stain",
)


# --------------------------------------------------------------------------- the writers under test


def _write_segmentation(inputs: dict[str, str], out: str) -> None:
    from cellkd.inference import segment_fragment_store  # imports torch: only where needed

    segment_fragment_store(inputs["model"], inputs["fragments"], out, level=1, tile=64, overlap=16, device="cpu")


WRITERS: dict[str, Callable[[dict[str, str], str], object]] = {
    "fragments": lambda i, out: extract_fragments(i["slide"], out, "s1", TISSUE, tile=128),
    "masks": lambda i, out: write_mask_store(
        i["fragments"], {"ssa": i["ssa"], "wsa": i["wsa"]}, CLASSES, out, slide_size=(WIDTH, HEIGHT)
    ),
    "patches": lambda i, out: cut_patches(i["fragments"], i["masks"], out, "s1", PATCHES),
    "nuclei": lambda i, out: extract_nuclei(
        i["predicted"], i["fragments"], {"ssa": i["ssa"], "wsa": i["wsa"]}, CLASSES, out, NUCLEI
    ),
    "macenko": lambda i, out: normalize_fragment_store(i["fragments"], out, MacenkoParams(max_samples=5000), seed=3),
    "segmentation": _write_segmentation,
}
"""Store kind -> writer(inputs, out_path); ``inputs`` maps names to the paths built by ``inputs`` below."""

FAST_KINDS = ("fragments", "masks", "patches", "nuclei", "macenko")
"""Writers that need no torch (segmentation imports it: ~3 s more per process)."""


# --------------------------------------------------------------------------- fixtures


def _slide_pixels() -> np.ndarray:
    """uint8 (HEIGHT, WIDTH, 3): glass (RGB 240 +- 3) with two H&E-coloured noisy rectangles TISSUE_RECTS."""
    rng = np.random.default_rng(0)
    image = np.full((HEIGHT, WIDTH, 3), 240, dtype=np.int16)
    for x0, y0, x1, y1 in TISSUE_RECTS:
        image[y0:y1, x0:x1] = (170, 95, 180)
        image[y0:y1, x0:x1] += rng.integers(-25, 26, (y1 - y0, x1 - x0, 3), dtype=np.int16)
    image += rng.integers(-3, 4, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _nucleus_boxes() -> list[tuple[int, int, int, int]]:
    """8 x 8 px nuclei (x0, y0, x1, y1, level-0 px) on a 24-px grid inside each tissue rectangle."""
    return [
        (x, y, x + 8, y + 8)
        for x0, y0, x1, y1 in TISSUE_RECTS
        for y in range(y0 + 10, y1 - 10, 24)
        for x in range(x0 + 10, x1 - 10, 24)
    ]


def _write_geojson(path: Path, boxes: list[tuple[int, int, int, int]], labels: list[int]) -> Path:
    write_qupath_geojson(path, [shapely.box(*b) for b in boxes], np.asarray(labels, dtype=np.int64), CLASSES)
    return path


def _write_predicted(mask_store: Path, out: Path) -> Path:
    """Predicted nucleus masks at level 0 = the union of the ssa class channels (layout of segment_fragment_store)."""
    with h5py.File(mask_store, "r") as masks, atomic_h5(out) as h5:
        h5.attrs.update({"slide": "s1", "stain": "raw", "level": 0})
        for name, group in masks["fragments"].items():
            target = h5.require_group(f"fragments/{name}")
            target.attrs.update(dict(group.attrs))
            target["level0"] = group["ssa/level0"][:].any(axis=2).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Slide s1 and everything derived from it; every test only reads these files.

    - ``slide``: pyramidal TIFF (levels 1, 1/2, 1/4) of ``_slide_pixels`` at 0.5 µm/px;
    - ``ssa``: ``_nucleus_boxes`` with classes 0, 1, 2, 0, ...; ``wsa``: the same boxes minus every
      5th, classes shifted by one;
    - ``fragments``, ``masks``: the two fragments and their ssa/wsa masks (the library's own output);
    - ``predicted``: level-0 nucleus masks equal to the ssa masks.
    """
    folder = tmp_path_factory.mktemp("inputs")
    pixels = _slide_pixels()
    slide = folder / "s1.tiff"
    with tifffile.TiffWriter(slide) as tif:
        for i, down in enumerate((1, 2, 4)):
            resolution = (1e4 / (MPP * down), 1e4 / (MPP * down))
            tif.write(
                pixels[::down, ::down],
                tile=(128, 128),
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=resolution,
                resolutionunit="CENTIMETER",
            )
    boxes = _nucleus_boxes()
    ssa = _write_geojson(folder / "s1.ssa.geojson", boxes, [i % 3 for i in range(len(boxes))])
    kept = [i for i in range(len(boxes)) if i % 5]
    wsa = _write_geojson(folder / "s1.wsa.geojson", [boxes[i] for i in kept], [(i + 1) % 3 for i in kept])
    paths = {"slide": str(slide), "ssa": str(ssa), "wsa": str(wsa)}
    paths["fragments"] = str(folder / "s1.fragments.h5")
    WRITERS["fragments"](paths, paths["fragments"])
    paths["masks"] = str(folder / "s1.masks.h5")
    WRITERS["masks"](paths, paths["masks"])
    paths["predicted"] = str(_write_predicted(Path(paths["masks"]), folder / "s1.predicted.h5"))
    return paths


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """model.pt of an untrained tiny U-Net (mobilenet_v2 encoder, depth 3, random weights from seed 0)."""
    import torch

    from cellkd.models.checkpoint import save_segmentation_model
    from cellkd.models.segmentation import create_segmentation_model
    from cellkd.training.segmentation import SegmentationTrainParams

    params = SegmentationTrainParams(arch="unet", encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(8, 8, 8))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_segmentation_model(
            params.arch, encoder=params.encoder, encoder_depth=3, decoder_channels=params.decoder_channels
        )
    return str(save_segmentation_model(tmp_path_factory.mktemp("model") / "model.pt", model, params))


def _inputs_for(kind: str, inputs: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    if kind == "segmentation":
        return {**inputs, "model": request.getfixturevalue("model_path")}
    return inputs


# --------------------------------------------------------------------------- helpers


def _canonical(value: Any) -> Any:
    """A comparable form of an HDF5 attribute or dataset value: bytes for numbers (NaN-safe), lists for strings."""
    array = np.asarray(value)
    if array.dtype.kind == "O":
        return [bytes(v) if isinstance(v, np.ndarray) else v for v in array.ravel().tolist()]
    if array.dtype.kind in "SU":
        return array.tolist()
    return (array.dtype.str, array.shape, array.tobytes())


def store_contents(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every attribute and dataset of an HDF5 file, keyed by object path, in a form that compares with ==."""
    contents: dict[str, Any] = {}
    with h5py.File(path, "r") as h5:

        def visit(name: str, node: h5py.HLObject) -> None:
            for key, value in node.attrs.items():
                contents[f"{name}@{key}"] = _canonical(value)
            if isinstance(node, h5py.Dataset):
                contents[name] = (node.shape, node.dtype.str, _canonical(node[()]))

        visit("/", h5)
        h5.visititems(visit)
    return contents


def partials(folder: Path) -> list[Path]:
    """Temporary files that ``cellkd.store.atomic`` writes beside an output (hidden, ``.partial``)."""
    return sorted(folder.glob(".*.partial"))


def file_state(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """sha256, size and mtime (ns) of a file: any write to it changes at least one."""
    stat = os.stat(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns


# --------------------------------------------------------------------------- config and slide sheet


def test_config_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml: invalid config .*\n.*'bogus' was unexpected"):
        validate_config({"bogus": 1}, CONFIG_SCHEMA, "cfg.yaml")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"seed": "x"}, "seed: 'x' is not of type 'integer'"),
        ({"patches": {"size": "big"}}, "patches.size: 'big' is not of type 'integer'"),
        ({"tissue": {"closing_um": -1}}, "tissue.closing_um: -1 is less than the minimum of 0"),
        ({"stains": ["raw", "reinhard"]}, r"stains.1: 'reinhard' is not one of \['raw', 'macenko'\]"),
    ],
)
def test_config_wrong_type_or_value_names_key_and_schema(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml: invalid config \(keys and types are documented in .*"):
        validate_config(config, CONFIG_SCHEMA, "cfg.yaml")
    with pytest.raises(ConfigError, match=message):
        validate_config(config, CONFIG_SCHEMA, "cfg.yaml")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"classes": [{"name": "a", "qupath_name": "Tumor"}, {"name": "a", "qupath_name": "Stroma"}]},
            r"classes\[\]\.name must be unique; repeated: \['a'\]",
        ),
        (
            {"classes": [{"name": "a", "qupath_name": "Tumor"}, {"name": "b", "qupath_name": "tumor"}]},
            r"classes\[\]\.qupath_name/aliases must be unique; repeated: \['tumor'\]",
        ),
        ({"patches": {"split": [0.5, 0.2, 0.2]}}, r"patches\.split \[0\.5, 0\.2, 0\.2\] must sum to 1"),
        ({"demo": {"fragments": [4, 2]}}, r"demo\.fragments \[4, 2\] must be \[minimum, maximum\]"),
    ],
)
def test_config_cross_field_errors_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"cfg\.yaml: {message}"):
        validate_config(config, CONFIG_SCHEMA, "cfg.yaml")


def test_config_public_dataset_folder_must_exist(tmp_path: Path) -> None:
    config = {"public_datasets": [{"name": "monuseg", "kind": "monuseg", "path": str(tmp_path / "nope")}]}
    with pytest.raises(ConfigError, match=r"public dataset 'monuseg': folder .*nope does not exist"):
        validate_config(config, CONFIG_SCHEMA, "cfg.yaml")


def test_config_defaults_are_filled_in() -> None:
    config: dict[str, Any] = {}
    validate_config(config, CONFIG_SCHEMA, "cfg.yaml")
    assert config["patches"]["size"] == 512 and config["mpp_fallback"] == 0.5
    assert [c["name"] for c in config["classes"]] == ["other", "immune", "muscle"]


def write_sheet(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A TSV slide sheet with ``header`` and ``rows``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def sheet_files(tmp_path: Path) -> Path:
    """Folder with data/a.tiff, data/b.tiff and data/a.ssa.geojson (empty placeholders) and a sheets/ folder."""
    for name in ("a.tiff", "b.tiff", "a.ssa.geojson"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    (tmp_path / "sheets").mkdir()
    return tmp_path


def test_sheet_relative_paths_resolve_against_the_sheet_folder(
    sheet_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sheet = write_sheet(
        sheet_files / "sheets" / "slides.tsv",
        ["slide", "path", "ssa", "mpp"],
        [["a", "../data/a.tiff", "../data/a.ssa.geojson", "0.25"], ["b", str(sheet_files / "data/b.tiff"), "", ""]],
    )
    monkeypatch.chdir(sheet_files / "data")  # the working directory must not matter
    entries = load_sheet(sheet, SHEET_SCHEMA)
    assert list(entries) == ["a", "b"]
    assert entries["a"].path == str((sheet_files / "data" / "a.tiff").resolve())
    assert entries["a"].annotations == {"ssa": str((sheet_files / "data" / "a.ssa.geojson").resolve())}
    assert entries["a"].mpp == 0.25 and entries["b"].mpp is None and entries["b"].annotations == {}


def test_sheet_missing_relative_path_names_line_column_and_rule(sheet_files: Path) -> None:
    sheet = write_sheet(sheet_files / "sheets" / "slides.tsv", ["slide", "path"], [["a", "data/a.tiff"]])
    with pytest.raises(
        ConfigError,
        match=r"slides\.tsv, line 2, column path: data/a\.tiff does not exist .*resolved against the sheet's folder",
    ):
        load_sheet(sheet, SHEET_SCHEMA)


def test_sheet_duplicate_slide_id_is_named(sheet_files: Path) -> None:
    rows = [["a", "../data/a.tiff"], ["b", "../data/b.tiff"], ["a", "../data/b.tiff"]]
    sheet = write_sheet(sheet_files / "sheets" / "slides.tsv", ["slide", "path"], rows)
    with pytest.raises(ConfigError, match=r"slides\.tsv: duplicate slide ids \['a'\]; every slide needs its own id"):
        load_sheet(sheet, SHEET_SCHEMA)


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["slide", "path", "stain"], ["a", "../data/a.tiff", "he"], r"line 2: .*'stain' was unexpected"),
        (["slide"], ["a"], r"line 2: .*'path' is a required property"),
        (["slide", "path"], ["slide a", "../data/a.tiff"], r"line 2: slide: 'slide a' does not match"),
        (["slide", "path", "mpp"], ["a", "../data/a.tiff", "fast"], r"line 2: mpp 'fast' is not a number"),
        (["slide", "path", "mpp"], ["a", "../data/a.tiff", "-1"], r"line 2: mpp -1\.0 must be positive"),
    ],
    ids=["unknown-column", "missing-column", "bad-slide-id", "mpp-not-a-number", "mpp-negative"],
)
def test_sheet_bad_row_names_sheet_and_line(sheet_files: Path, header: list[str], row: list[str], message: str) -> None:
    sheet = write_sheet(sheet_files / "sheets" / "slides.tsv", header, [row])
    with pytest.raises(ConfigError, match=rf"slides\.tsv, {message}"):
        load_sheet(sheet, SHEET_SCHEMA)


def test_sheet_missing_or_empty_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.tsv: slide sheet not found; set sheet: in workflow_config\.yaml"):
        load_sheet(tmp_path / "nope.tsv", SHEET_SCHEMA)
    empty = write_sheet(tmp_path / "empty.tsv", ["slide", "path"], [])
    with pytest.raises(ConfigError, match=r"empty\.tsv: the slide sheet lists no slides"):
        load_sheet(empty, SHEET_SCHEMA)


def test_class_list_not_covering_the_annotations_stops_rasterization(inputs: dict[str, str], tmp_path: Path) -> None:
    """A config with only other and immune: the ssa GeoJSON's Muscle nuclei (features 2, 5, ...) are named."""
    classes = classes_from_config(
        [
            {"name": "other", "qupath_name": "Other", "color": [0, 160, 0]},
            {"name": "immune", "qupath_name": "Immune cells", "color": [160, 90, 160]},
        ]
    )
    out = tmp_path / "masks.h5"
    with pytest.raises(AnnotationError) as info:
        write_mask_store(inputs["fragments"], {"ssa": inputs["ssa"]}, classes, out)
    message = str(info.value)
    assert inputs["ssa"] in message
    assert "unknown class 'Muscle' (feature 2, 5, 8" in message
    assert "add the name under classes: in workflow_config.yaml" in message
    assert not out.exists() and not partials(tmp_path)


# --------------------------------------------------------------------------- slides


@pytest.mark.parametrize(
    ("name", "keep", "message"),
    [
        ("cut.tiff", 0.5, r"cut\.tiff: .*corrupt or truncated: copy the file again from its source"),
        ("cut.svs", 0.001, r"cut\.svs: OpenSlide does not recognise .*: copy the file again from its source"),
        ("slide.czi", 0.0, r"slide\.czi: unsupported slide format '\.czi'; .*convert the slide to a pyramidal TIFF"),
    ],
    ids=["truncated-tiff", "truncated-svs", "unsupported"],
)
def test_damaged_or_unsupported_slide_message_says_what_to_do(
    inputs: dict[str, str], tmp_path: Path, name: str, keep: float, message: str
) -> None:
    """Messages beyond test_slides.py's: each one ends with the fix."""
    data = Path(inputs["slide"]).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError, match=message):
        extract_fragments(tmp_path / name, tmp_path / "out.h5", "s1", TISSUE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_slide_smaller_than_one_patch_gives_one_zero_padded_patch_per_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 120 x 90 PNG (no resolution) with tissue at x 30..90, y 20..70; 256-px patches."""
    image = np.full((90, 120, 3), 240, dtype=np.uint8)
    image[20:70, 30:90] = (170, 95, 180)
    Image.fromarray(image).save(tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING):
        (fragment,) = extract_fragments(
            tmp_path / "tiny.png", tmp_path / "f.h5", "tiny", TissueParams(min_area_um2=100.0), mpp_fallback=0.5
        )
    assert "tiny.png: no resolution" in caplog.text and "assuming 0.5" in caplog.text
    assert cut_patches(tmp_path / "f.h5", None, tmp_path / "p.h5", "tiny", PatchParams(size=256)) == 3
    with PatchStore(tmp_path / "p.h5") as patches, FragmentStore(tmp_path / "f.h5") as fragments:
        assert patches.provenance["level"].tolist() == [0, 1, 2]
        for i in range(3):
            level = fragments.level(fragment, i)[:]
            h, w = level.shape[:2]
            np.testing.assert_array_equal(patches.images[i][:h, :w], level)
            assert not patches.images[i][h:].any() and not patches.images[i][:, w:].any()


# --------------------------------------------------------------------------- crashes


def _child_main(kind: str, inputs_json: str, out: str, marker: str) -> None:
    """Run ``WRITERS[kind]`` with every progress loop stopping after its first item until the process is killed."""

    def stall(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        iterator = iter(items)
        for item in iterator:
            yield item  # one item written, the file open mid-write
            break
        Path(marker).touch()
        time.sleep(600)  # the parent SIGKILLs us here
        yield from iterator

    for name in PROGRESS_USERS:
        importlib.import_module(name).progress = stall
    if kind == "segmentation":
        importlib.import_module("cellkd.inference").progress = stall
    WRITERS[kind](json.loads(inputs_json), out)
    raise SystemExit("the writer finished without stalling: the kill test no longer kills mid-write")


def _kill_mid_write(kind: str, inputs: dict[str, str], out: Path, log: Path) -> None:
    """Start the writer in a child process, wait until it stalls mid-write, check the .partial exists, SIGKILL it."""
    marker = out.parent / "stalled"
    with log.open("w") as stream:
        child = subprocess.Popen(
            [sys.executable, __file__, "child", kind, json.dumps(inputs), str(out), str(marker)],
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert child.poll() is None, f"child exited early ({child.returncode}):\n{log.read_text()}"
                assert time.monotonic() < deadline, f"child never stalled:\n{log.read_text()}"
                time.sleep(0.05)
            assert partials(out.parent), "the writer should be writing to a hidden .partial file"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    marker.unlink()


@pytest.mark.parametrize("kind", [*FAST_KINDS, pytest.param("segmentation", marks=pytest.mark.slow)])
def test_sigkill_mid_write_leaves_no_output_and_rerun_completes_identically(
    kind: str, inputs: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    paths = _inputs_for(kind, inputs, request)
    out = tmp_path / "run" / "s1.h5"
    out.parent.mkdir()
    _kill_mid_write(kind, paths, out, tmp_path / "child.log")

    assert not out.exists()
    stale = partials(out.parent)
    assert sorted(p.name for p in out.parent.iterdir()) == [p.name for p in stale]  # nothing but hidden leftovers
    assert all(p.name.startswith(f".{out.name}.") for p in stale)

    WRITERS[kind](paths, str(out))  # the rerun, with the killed run's .partial still there
    # Same folder depth as ``out``: a patch store records its fragment/mask stores relative to its folder.
    clean = tmp_path / "clean" / "s1.h5"
    WRITERS[kind](paths, str(clean))
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"]
    assert store_contents(out) == store_contents(clean)
    assert partials(out.parent) == stale  # the rerun neither used nor removed the stale file


@pytest.mark.parametrize("kind", [*FAST_KINDS, "segmentation"])
def test_disk_full_mid_write_raises_and_leaves_nothing(
    kind: str, inputs: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every h5py write after the first fails with ENOSPC, as on a full disk."""
    paths = _inputs_for(kind, inputs, request)
    original = h5py.Dataset.__setitem__
    writes = []

    def disk_full(self: h5py.Dataset, key: Any, value: Any) -> None:
        writes.append(self.name)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    out = tmp_path / "out" / "s1.h5"
    with pytest.raises(StoreError, match=r"s1\.h5: no space left on device while writing it; free space in") as info:
        WRITERS[kind](paths, str(out))
    assert isinstance(info.value.__cause__, OSError)
    assert len(writes) == 2  # failed mid-write, after one successful write
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temporary file is removed too


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_stale_partial_from_a_killed_run_does_not_disturb_the_rerun(
    kind: str, inputs: dict[str, str], tmp_path: Path
) -> None:
    stale = tmp_path / ".s1.h5.0123abcd.partial"
    stale.write_bytes(b"\x89HDF\r\n half a file")
    WRITERS[kind](inputs, str(tmp_path / "s1.h5"))
    with h5py.File(tmp_path / "s1.h5", "r") as h5:
        assert h5.attrs["complete"]
    assert stale.read_bytes() == b"\x89HDF\r\n half a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "s1.h5"]


# --------------------------------------------------------------------------- determinism and inputs


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_two_runs_with_the_same_seed_write_identical_stores(kind: str, inputs: dict[str, str], tmp_path: Path) -> None:
    WRITERS[kind](inputs, str(tmp_path / "a.h5"))
    WRITERS[kind](inputs, str(tmp_path / "b.h5"))
    first = store_contents(tmp_path / "a.h5")
    assert first == store_contents(tmp_path / "b.h5")
    assert [key for key in first if "@" not in key]  # datasets were compared, not only attributes


def test_writers_never_modify_their_inputs(inputs: dict[str, str], tmp_path: Path) -> None:
    names = ("slide", "ssa", "wsa", "fragments", "masks", "predicted")
    before = {name: file_state(inputs[name]) for name in names}
    for kind in FAST_KINDS:
        WRITERS[kind](inputs, str(tmp_path / f"{kind}.h5"))
    assert {name: file_state(inputs[name]) for name in names} == before


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child_main(*sys.argv[2:6])


def test_sheet_row_with_missing_trailing_cells_reads_them_as_empty(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "a.ssa.geojson").write_text("{}")
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("slide\tpath\tssa\twsa\tea\tmpp\na\ta.svs\ta.ssa.geojson\n")
    entries = load_sheet(sheet, REPO / "schemas" / "sheet.schema.yaml")
    assert entries["a"].mpp is None
    assert set(entries["a"].annotations) == {"ssa"}
