"""Patch store: an index of fixed-size image (+ mask) patches of fragment stores, with provenance and split.

See ``cellkd.store`` for the layout. Patches tile every fragment level by a sliding window
without overlap; windows that run past the right/bottom edge are zero-padded, so every
fragment pixel at every level lands in exactly one patch.

The store copies no pixels: it records each patch's slide, fragment, level and origin, and the paths of
the fragment and mask stores it was cut from (relative to the patch store's folder, so a results tree
moves whole). ``PatchStore`` reads each window from those stores when the patch is used; the chunks of
both are 256² (``cellkd.store.fragments.CHUNK``), so a 256² or 512² patch is whole chunks. A copy of the
pixels would double the disk of every slide and of every stain for nothing.

Splits go by area, not by patch: a patch at level 1 or 2 shows the same tissue as several level-0
patches, and a test patch whose area was trained on at another level would flatter the test scores.
Each fragment is cut into square blocks of ``patch_size * 4`` level-0 px (the level-2 patch footprint;
``patch_size * 2`` when level 1 is the coarsest cut, ``patch_size`` for level 0 alone), aligned with the
fragment's origin. Every patch at every level lies inside exactly one block, because the block edge is
a whole multiple of each level's patch footprint. The seeded split is drawn per block (fractions are of
blocks; edge blocks hold fewer patches, so patch fractions are near the ratios, not equal to them), and
each patch takes its block's split. Fragments never overlap (``cellkd.slides.merge_boxes``), so no area
is in two blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import pandas as pd

from cellkd.errors import StoreError
from cellkd.params import SPLIT_FRACTIONS, check_parameters, is_int, is_split_fractions
from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.attrs import ClosingStore, decode_strings, open_store
from cellkd.store.fragments import FragmentStore
from cellkd.store.masks import MaskStore
from cellkd.types import DOWNSAMPLES, SPLIT_NAMES, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

PIXELS = (
    "not copied: patch i is the patch_size window at (y[i], x[i]) of fragments/{fragment[i]}/level{level[i]} in "
    "stores/fragments[store[i]] (masks: fragments/{fragment[i]}/{set}/level{level[i]} in stores/masks[store[i]]), "
    "zero-padded past the edge; paths are relative to this file's folder"
)
"""Root attribute ``pixels`` of every patch store: how to read a patch without cellkd."""


@dataclass(frozen=True)
class PatchParams:
    """How patches are cut (``patches:`` in workflow_config.yaml)."""

    size: int = 512
    """Patch edge P (px, at the patch's own level)."""
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    """train / val / test fractions of the area blocks (module docstring); each >= 0, summing to 1."""
    levels: tuple[int, ...] = (0, 1, 2)
    """Fragment levels to cut (0 = full size, 1 = 1/2, 2 = 1/4)."""
    seed: int = 0
    """Seed of the split; combined with the source name."""

    def __post_init__(self) -> None:
        # Config files give lists; tuples keep the dataclass hashable and comparable.
        object.__setattr__(self, "split", tuple(float(v) for v in self.split))
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        levels = self.levels
        checks = [
            (is_int(self.size) and self.size >= 8, "size", "an integer >= 8"),
            (is_split_fractions(self.split), "split", SPLIT_FRACTIONS),
            (
                bool(levels) and len(set(levels)) == len(levels) and set(levels) <= {0, 1, 2},
                "levels",
                "distinct values from 0, 1, 2",
            ),
            (is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0"),
        ]
        check_parameters(self, checks, "patch", " (see patches: in workflow_config.yaml)")

    @property
    def block_size(self) -> int:
        """Edge (level-0 px) of the area blocks that splits are drawn for: the coarsest level's patch footprint."""
        return self.size * DOWNSAMPLES[max(self.levels)]


def split_counts(n: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """Patches per split for ``n`` patches: largest-remainder rounding of ``n * ratios``.

    When ``n >= len(ratios)``, every split with a positive ratio gets at least one patch
    (taken from the largest split), so a small source still has a test patch.
    """
    exact = [n * r for r in ratios]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(ratios):
        for i, ratio in enumerate(ratios):
            if ratio > 0 and counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return tuple(counts)


def assign_splits(n: int, ratios: Sequence[float], seed: int, source: str) -> npt.NDArray[np.int8]:
    """int8 (n,) split codes (0 train, 1 val, 2 test): a random permutation seeded by (seed, source), cut by counts."""
    # sha256, not hash(): Python salts str hashes per process, and splits must be reproducible.
    source_key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, source_key])
    order = rng.permutation(n)
    split = np.empty(n, dtype=np.int8)
    start = 0
    for code, count in enumerate(split_counts(n, ratios)):
        split[order[start : start + count]] = code
        start += count
    return split


def assign_area_splits(
    blocks: Sequence[Hashable], ratios: Sequence[float], seed: int, source: str
) -> npt.NDArray[np.int8]:
    """int8 split code per item, equal for items of the same block: ``assign_splits`` over the distinct blocks.

    Blocks are numbered in order of first appearance, so the split is reproducible for a given item order.
    """
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(block, len(index)) for block in blocks), dtype=np.int64, count=len(blocks))
    return assign_splits(len(index), ratios, seed, source)[codes]


def _block(row: tuple[int, str, str, int, int, int], block_size: int) -> tuple[int, str, int, int]:
    """(input, fragment, block column, block row) of a patch row: the block holding its level-0 footprint."""
    index, _, name, level, x, y = row
    down = DOWNSAMPLES[level]
    return index, name, x * down // block_size, y * down // block_size


@dataclass(frozen=True)
class _Input:
    """One fragment store (+ optional mask store), checked against each other."""

    fragments: str
    masks: str | None
    slide: str
    stain: str
    classes: tuple[str, ...]
    sets: tuple[str, ...]
    boxes: str
    """JSON ``[[name, x, y, width, height], ...]`` of the fragments: tells one fragment extraction from another."""


def _check_input(fragment_path: PathLike, mask_path: PathLike | None, levels: Sequence[int]) -> _Input:
    """Open both stores, check that every mask level has its fragment level's (H, W); return their metadata."""
    with FragmentStore(fragment_path) as frag:
        if not frag.fragments:
            raise StoreError(f"{fragment_path}: fragment store holds no fragments; rerun extract_fragments")
        shapes = {(f.name, k): frag.level(f, k).shape[:2] for f in frag.fragments for k in levels}
        slide, stain = frag.slide, frag.stain
        boxes = json.dumps([[f.name, f.x, f.y, f.width, f.height] for f in frag.fragments])
    if mask_path is None:
        return _Input(str(fragment_path), None, slide, stain, (), (), boxes)
    with MaskStore(mask_path) as masks:
        classes, sets = tuple(masks.classes), tuple(masks.annotation_sets)
        for (name, level), shape in shapes.items():
            for set_name in sets:
                ds = masks.level(name, set_name, level)
                if ds.shape != (*shape, len(classes)):
                    msg = (
                        f"{mask_path}: {ds.name} has shape {ds.shape} but fragment store {fragment_path} has "
                        f"{shape} at level {level} with {len(classes)} classes; the stores are from different "
                        "fragment extractions: rerun the rasterize rule"
                    )
                    raise StoreError(msg)
    return _Input(str(fragment_path), str(mask_path), slide, stain, classes, sets, boxes)


def _as_list(value: PathLike | Sequence[PathLike | None] | None) -> list[PathLike | None]:
    if value is None or isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def _window(ds: h5py.Dataset, y: int, x: int, size: int) -> np.ndarray:
    """(size, size, C) window of an (H, W, C) dataset at (y, x), zero-padded past the edge."""
    part = ds[y : y + size, x : x + size]
    if part.shape[:2] == (size, size):
        return part
    out = np.zeros((size, size, ds.shape[2]), dtype=ds.dtype)
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _relative_to(path: PathLike, folder: Path) -> str:
    """``path`` relative to ``folder`` (so that a results tree can be moved whole); absolute when impossible."""
    try:
        return os.path.relpath(Path(path).resolve(), folder)
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def cut_patches(
    fragment_store: PathLike | Sequence[PathLike],
    mask_store: PathLike | Sequence[PathLike | None] | None,
    out_path: PathLike,
    source: str,
    params: PatchParams | None = None,
) -> int:
    """Index the P x P patches of fragment store(s) (+ mask store(s)) in the patch store ``out_path``.

    ``fragment_store`` and ``mask_store`` are one path each, or equal-length lists pairing slides
    (a source such as MoNuSeg spans many slides); ``mask_store=None`` gives no masks. Patches run
    fragment by fragment, level by level, row-major; ``x``, ``y`` are the patch origin in that
    level's fragment px. Splits are drawn per area block (module docstring), so a patch and its views
    at the other levels share one split. The store holds the index and the paths of the stores
    (no pixels; ``PatchStore`` reads the windows from them); written atomically. Returns N, the patch count.
    """
    params = params or PatchParams()
    fragment_paths = [p for p in _as_list(fragment_store) if p is not None]
    mask_paths = [None] * len(fragment_paths) if mask_store is None else _as_list(mask_store)
    if not fragment_paths:
        raise StoreError(f"{out_path}: no fragment store given for source {source!r}")
    if len(mask_paths) != len(fragment_paths):
        msg = f"{out_path}: {len(fragment_paths)} fragment store(s) but {len(mask_paths)} mask store(s); pair them"
        raise StoreError(msg)
    inputs = [_check_input(f, m, params.levels) for f, m in zip(fragment_paths, mask_paths, strict=True)]
    first = inputs[0]
    for item in inputs[1:]:
        for attr, what in (("stain", "stain"), ("classes", "classes"), ("sets", "annotation sets")):
            if getattr(item, attr) != getattr(first, attr):
                msg = (
                    f"{item.fragments} / {item.masks}: {what} {getattr(item, attr)!r} differ from "
                    f"{first.fragments} / {first.masks}: {getattr(first, attr)!r}; one patch store needs "
                    f"the same {what} for every slide of source {source!r}"
                )
                raise StoreError(msg)
        if (item.masks is None) != (first.masks is None):
            msg = (
                f"source {source!r}: {item.fragments} has mask store {item.masks} but {first.fragments} has "
                f"{first.masks}; give a mask store for every slide of the source or for none"
            )
            raise StoreError(msg)

    # Provenance from shapes alone: the windows are read from the stores when a patch is used.
    rows: list[tuple[int, str, str, int, int, int]] = []
    size = params.size
    for index, item in enumerate(inputs):
        with FragmentStore(item.fragments) as frag:
            for fragment in frag.fragments:
                for level in params.levels:
                    height, width = frag.level(fragment, level).shape[:2]
                    rows.extend(
                        (index, item.slide, fragment.name, level, x, y)
                        for y in range(0, height, size)
                        for x in range(0, width, size)
                    )
    blocks = [_block(row, params.block_size) for row in rows]
    split = assign_area_splits(blocks, params.split, params.seed, source)

    folder = Path(out_path).resolve().parent
    with atomic_h5(out_path) as h5:
        h5.attrs.update(
            {
                "source": source,
                "stain": first.stain,
                "patch_size": size,
                "classes": list(first.classes),
                "annotation_sets": list(first.sets),
                "split_names": list(SPLIT_NAMES),
                "split_ratios": np.asarray(params.split),
                "levels": np.asarray(params.levels, dtype=np.int8),
                "seed": params.seed,
                "split_block_size": params.block_size,
                "pixels": PIXELS,
            }
        )

        text = h5py.string_dtype()
        per_slide = {
            "fragments": [_relative_to(item.fragments, folder) for item in inputs],
            "masks": [_relative_to(item.masks, folder) if item.masks else "" for item in inputs],
            "slide": [item.slide for item in inputs],
            "fragment_boxes": [item.boxes for item in inputs],
        }
        for name, values in per_slide.items():
            h5.create_dataset(f"stores/{name}", data=np.array(values, dtype=object), dtype=text)
        per_patch = {
            "store": np.array([r[0] for r in rows], dtype=np.int32),
            "slide": np.array([r[1] for r in rows], dtype=object),
            "fragment": np.array([r[2] for r in rows], dtype=object),
            "level": np.array([r[3] for r in rows], dtype=np.int8),
            "x": np.array([r[4] for r in rows], dtype=np.int32),
            "y": np.array([r[5] for r in rows], dtype=np.int32),
            "split": split,
        }
        columns = {
            name: h5.create_dataset(name, shape=(len(rows),), dtype=text if values.dtype == object else values.dtype)
            for name, values in per_patch.items()
        }
        # Slide by slide, so a source of many slides (MoNuSeg) shows progress; rows are grouped by slide.
        bounds = np.searchsorted(per_patch["store"], np.arange(len(inputs) + 1))
        for index in progress(range(len(inputs)), desc=f"patches {source}", total=len(inputs)):
            rows_of_slide = slice(bounds[index], bounds[index + 1])
            for name, ds in columns.items():
                ds[rows_of_slide] = per_patch[name][rows_of_slide]
    counts = np.bincount(split, minlength=3)
    logger.info(
        "%s: %d patches (%s) in %d area block(s) of %d px from %d slide(s) -> %s",
        source,
        len(rows),
        ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True)),
        len(set(blocks)),
        params.block_size,
        len(inputs),
        out_path,
    )
    return len(rows)


class PatchArray:
    """Lazy uint8 (N, P, P, C) array of patches, read window by window through the stores.

    Index it like an array: ``a[i]`` (P, P, C); ``a[:]``, ``a[2:5]``, ``a[[0, 3]]``, ``a[bool mask]``
    (n, P, P, C); ``np.asarray(a)`` reads all.
    """

    def __init__(self, read: Callable[[int], np.ndarray], n: int, channels: int, size: int) -> None:
        self._read = read
        self.shape: tuple[int, int, int, int] = (n, size, size, channels)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice | Sequence[int] | npt.NDArray[Any]) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"patch {key} is out of range for {n} patches")
            return self._read(i)
        rows = np.arange(n)[key]
        if rows.ndim != 1:
            raise IndexError(f"patches are indexed by an int, a slice or 1-D indices, not {key!r}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for j, i in enumerate(rows):
            out[j] = self._read(int(i))
        return out

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)


class PatchStore(ClosingStore):
    """Read-only view of a patch store. Use as a context manager.

    ``image(i)`` / ``mask(set, i)``: patch ``i`` read from its fragment / mask store, zero-padded past the
    edge (uint8 (P, P, 3) / (P, P, C) 0/1); ``images`` / ``masks(set)``: the same as ``PatchArray`` views;
    ``provenance``: DataFrame with columns slide, fragment, level, x, y, split (N rows). The index is read
    at opening; the fragment and mask stores are opened at the first patch read from them, and checked
    to be the ones the index was cut from.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        with open_store(path, "patch store", "rerun the rule that cuts patches") as h5:
            require_complete(h5)
            if "stores" not in h5:
                msg = (
                    f"{path}: patch store has no stores/ index (it is not a cellkd patch store, or one written "
                    "by an older cellkd that copied the pixels); delete it and rerun the rule that cuts patches"
                )
                raise StoreError(msg)
            attrs = h5.attrs
            self.source: str = str(attrs["source"])
            self.stain: str = str(attrs["stain"])
            self.patch_size: int = int(attrs["patch_size"])
            self.classes: list[str] = decode_strings(attrs["classes"]) if len(attrs["classes"]) else []
            self.annotation_sets: list[str] = (
                decode_strings(attrs["annotation_sets"]) if len(attrs["annotation_sets"]) else []
            )
            self.split_names: list[str] = decode_strings(attrs["split_names"])
            self._levels = [int(k) for k in attrs["levels"]]
            folder = Path(path).parent
            self.fragment_stores: list[Path] = [folder / p for p in h5["stores/fragments"].asstr()[:]]
            """Fragment store of each slide (the paths recorded relative to the patch store's folder)."""
            self.mask_stores: list[Path | None] = [folder / p if p else None for p in h5["stores/masks"].asstr()[:]]
            """Mask store of each slide, or None (a store cut without masks)."""
            self._store_slides = list(h5["stores/slide"].asstr()[:])
            self._store_boxes = list(h5["stores/fragment_boxes"].asstr()[:])
            self._store = h5["store"][:]
            self._slide = h5["slide"].asstr()[:]
            self._fragment = h5["fragment"].asstr()[:]
            self._level = h5["level"][:]
            self._x = h5["x"][:]
            self._y = h5["y"][:]
            self._split = h5["split"][:]
        self._open: dict[int, tuple[FragmentStore, MaskStore | None]] = {}
        self._provenance: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self._store)

    def _stores(self, index: int) -> tuple[FragmentStore, MaskStore | None]:
        """The open fragment and mask stores of slide ``index``, checked against the index at first use."""
        if index in self._open:
            return self._open[index]
        fragments, masks = self.fragment_stores[index], self.mask_stores[index]
        where = f"{self.path}: reads its pixels from {fragments}" + (f" and {masks}" if masks else "")
        try:
            found = _check_input(fragments, masks, self._levels)
        except StoreError as err:
            raise StoreError(f"{where}, but: {err}") from err
        recorded = (self._store_slides[index], self.stain, tuple(self.classes), tuple(self.annotation_sets))
        if (found.slide, found.stain, found.classes, found.sets) != recorded or found.boxes != self._store_boxes[index]:
            msg = (
                f"{where}, but they hold another extraction (slide, stain, classes, annotation sets or fragment "
                "boxes differ from those the patches were cut from); rerun the rule that cuts patches"
            )
            raise StoreError(msg)
        with contextlib.ExitStack() as stack:
            frag = stack.enter_context(FragmentStore(fragments))
            mask_store = stack.enter_context(MaskStore(masks)) if masks else None
            stack.pop_all()
        self._open[index] = (frag, mask_store)
        return frag, mask_store

    def image(self, i: int) -> np.ndarray:
        """uint8 (P, P, 3) RGB patch ``i``, zero-padded past the fragment's edge."""
        frag, _ = self._stores(int(self._store[i]))
        level = frag.level(str(self._fragment[i]), int(self._level[i]))
        return _window(level, int(self._y[i]), int(self._x[i]), self.patch_size)

    def mask(self, annotation_set: str, i: int) -> np.ndarray:
        """uint8 (P, P, C) 0/1 class masks of ``annotation_set`` for patch ``i``, zero-padded like ``image``."""
        self._require_set(annotation_set)
        _, mask_store = self._stores(int(self._store[i]))
        assert mask_store is not None  # every slide has a mask store when the store has annotation sets
        ds = mask_store.level(str(self._fragment[i]), annotation_set, int(self._level[i]))
        return _window(ds, int(self._y[i]), int(self._x[i]), self.patch_size)

    def _require_set(self, annotation_set: str) -> None:
        if annotation_set not in self.annotation_sets:
            msg = f"{self.path}: no masks for annotation set {annotation_set!r}; available: {self.annotation_sets}"
            raise StoreError(msg)

    @property
    def images(self) -> PatchArray:
        """uint8 (N, P, P, 3) RGB patches; index to read."""
        return PatchArray(self.image, len(self), 3, self.patch_size)

    def masks(self, annotation_set: str) -> PatchArray:
        """uint8 (N, P, P, C) 0/1 class masks of ``annotation_set``, aligned with ``images``."""
        self._require_set(annotation_set)
        return PatchArray(lambda i: self.mask(annotation_set, i), len(self), len(self.classes), self.patch_size)

    @property
    def provenance(self) -> pd.DataFrame:
        """One row per patch: slide, fragment (str), level (int8), x, y (int32, level-k fragment px), split (int8)."""
        if self._provenance is None:
            self._provenance = pd.DataFrame(
                {
                    "slide": self._slide,
                    "fragment": self._fragment,
                    "level": self._level,
                    "x": self._x,
                    "y": self._y,
                    "split": self._split,
                }
            )
        return self._provenance

    def split_indices(self, split: str | int) -> npt.NDArray[np.int64]:
        """Sorted indices of the patches in ``split`` ("train", "val", "test" or its code 0, 1, 2)."""
        if isinstance(split, str):
            if split not in self.split_names:
                raise StoreError(f"{self.path}: unknown split {split!r}; expected one of {self.split_names}")
            split = self.split_names.index(split)
        return np.flatnonzero(self._split == split).astype(np.int64)

    def close(self) -> None:
        """Close the fragment and mask stores opened so far (the index stays readable)."""
        for frag, mask_store in self._open.values():
            frag.close()
            if mask_store is not None:
                mask_store.close()
        self._open.clear()
