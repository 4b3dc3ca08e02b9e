"""Patch store: fixed-size image (+ mask) patches cut from fragment stores, with provenance and split.

See ``cellkd.store`` for the layout. Patches tile every fragment level by a sliding window
without overlap; windows that run past the right/bottom edge are zero-padded, so every
fragment pixel at every level lands in exactly one patch.

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
import logging
import math
import os
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import h5py
import numpy as np
import numpy.typing as npt
import pandas as pd

from cellkd.errors import ConfigError, StoreError
from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.attrs import decode_strings
from cellkd.store.fragments import FragmentStore
from cellkd.types import DOWNSAMPLES, SPLIT_NAMES, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)


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
        where = "(see patches: in workflow_config.yaml)"
        if not (isinstance(self.size, int) and self.size >= 8):
            raise ConfigError(f"patch size={self.size!r} is invalid; expected an integer >= 8 {where}")
        split = tuple(float(v) for v in self.split)
        if len(split) != 3 or any(not math.isfinite(v) or v < 0 for v in split) or not math.isclose(sum(split), 1.0):
            expected = "three fractions >= 0 (train, val, test) summing to 1"
            msg = f"patch split={self.split!r} is invalid; expected {expected} {where}"
            raise ConfigError(msg)
        object.__setattr__(self, "split", split)
        levels = tuple(int(v) for v in self.levels)
        if not levels or len(set(levels)) != len(levels) or not set(levels) <= {0, 1, 2}:
            raise ConfigError(
                f"patch levels={self.levels!r} are invalid; expected distinct values from 0, 1, 2 {where}"
            )
        object.__setattr__(self, "levels", levels)
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"patch seed={self.seed!r} is invalid; expected an integer >= 0 {where}")

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


def _check_input(fragment_path: PathLike, mask_path: PathLike | None, levels: Sequence[int]) -> _Input:
    """Open both stores, check that every mask level has its fragment level's (H, W); return their metadata."""
    with FragmentStore(fragment_path) as frag:
        if not frag.fragments:
            raise StoreError(f"{fragment_path}: fragment store holds no fragments; rerun extract_fragments")
        shapes = {(f.name, k): frag.level(f, k).shape[:2] for f in frag.fragments for k in levels}
        slide, stain = frag.slide, frag.stain
    if mask_path is None:
        return _Input(str(fragment_path), None, slide, stain, (), ())
    try:
        h5 = h5py.File(mask_path, "r")
    except OSError as err:
        raise StoreError(f"{mask_path}: cannot open mask store ({err}); rerun the rasterize rule") from err
    with h5:
        require_complete(h5)
        classes = tuple(decode_strings(h5.attrs["classes"]))
        sets = tuple(decode_strings(h5.attrs["annotation_sets"]))
        for (name, level), shape in shapes.items():
            for set_name in sets:
                key = f"fragments/{name}/{set_name}/level{level}"
                if key not in h5:
                    msg = f"{mask_path}: has no {key} for fragment store {fragment_path}; rerun the rasterize rule"
                    raise StoreError(msg)
                ds = h5[key]
                if ds.shape != (*shape, len(classes)):
                    msg = (
                        f"{mask_path}: {key} has shape {ds.shape} but fragment store {fragment_path} has "
                        f"{shape} at level {level} with {len(classes)} classes; the stores are from different "
                        "fragment extractions: rerun the rasterize rule"
                    )
                    raise StoreError(msg)
    return _Input(str(fragment_path), str(mask_path), slide, stain, classes, sets)


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


def _iter_patches(
    inputs: Sequence[_Input], rows: Sequence[tuple[int, str, str, int, int, int]]
) -> Iterator[tuple[str, int, int, int, FragmentStore, h5py.File | None]]:
    """Yield (fragment, level, x, y, fragment store, mask file) per row, keeping one input pair open."""
    i = 0
    for index, item in enumerate(inputs):
        with contextlib.ExitStack() as stack:
            frag = stack.enter_context(FragmentStore(item.fragments))
            mask_h5 = stack.enter_context(h5py.File(item.masks, "r")) if item.masks else None
            while i < len(rows) and rows[i][0] == index:
                _, _, name, level, x, y = rows[i]
                yield name, level, x, y, frag, mask_h5
                i += 1


def cut_patches(
    fragment_store: PathLike | Sequence[PathLike],
    mask_store: PathLike | Sequence[PathLike | None] | None,
    out_path: PathLike,
    source: str,
    params: PatchParams | None = None,
) -> int:
    """Cut P x P patches from fragment store(s) (+ mask store(s)) into the patch store ``out_path``.

    ``fragment_store`` and ``mask_store`` are one path each, or equal-length lists pairing slides
    (a source such as MoNuSeg spans many slides); ``mask_store=None`` writes no masks. Patches run
    fragment by fragment, level by level, row-major; ``x``, ``y`` are the patch origin in that
    level's fragment px. Splits are drawn per area block (module docstring), so a patch and its views
    at the other levels share one split. Streams one patch at a time; written atomically. Returns N,
    the patch count.
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

    # Pass 1: provenance from shapes alone, so N (and the split) is known before any pixel moves.
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
    n = len(rows)
    blocks = [_block(row, params.block_size) for row in rows]
    split = assign_area_splits(blocks, params.split, params.seed, source)

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
            }
        )
        text = h5py.string_dtype()
        h5.create_dataset("slide", data=np.array([r[1] for r in rows], dtype=object), dtype=text)
        h5.create_dataset("fragment", data=np.array([r[2] for r in rows], dtype=object), dtype=text)
        h5.create_dataset("level", data=np.array([r[3] for r in rows], dtype=np.int8))
        h5.create_dataset("x", data=np.array([r[4] for r in rows], dtype=np.int32))
        h5.create_dataset("y", data=np.array([r[5] for r in rows], dtype=np.int32))
        h5.create_dataset("split", data=split)
        images = h5.create_dataset(
            "images", shape=(n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3), compression="lzf"
        )
        masks = {
            name: h5.create_dataset(
                f"masks/{name}",
                shape=(n, size, size, len(first.classes)),
                dtype=np.uint8,
                chunks=(1, size, size, len(first.classes)),
                compression="lzf",
            )
            for name in first.sets
        }

        # Pass 2: stream patch by patch, one input pair open at a time.
        patches = _iter_patches(inputs, rows)
        for i, (name, level, x, y, frag, mask_h5) in enumerate(progress(patches, desc=f"patches {source}", total=n)):
            images[i] = _window(frag.level(name, level), y, x, size)
            for set_name, ds in masks.items():
                assert mask_h5 is not None  # masks exist only when every input has a mask store
                ds[i] = _window(mask_h5[f"fragments/{name}/{set_name}/level{level}"], y, x, size)
    counts = np.bincount(split, minlength=3)
    logger.info(
        "%s: %d patches (%s) in %d area block(s) of %d px from %d slide(s) -> %s",
        source,
        n,
        ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True)),
        len(set(blocks)),
        params.block_size,
        len(inputs),
        out_path,
    )
    return n


class PatchStore:
    """Read-only view of a patch store. Use as a context manager.

    ``images``: uint8 (N, P, P, 3) dataset; ``masks(set)``: uint8 (N, P, P, C) dataset;
    ``provenance``: DataFrame with columns slide, fragment, level, x, y, split (N rows).
    """

    def __init__(self, path: PathLike) -> None:
        try:
            self._h5 = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"{path}: cannot open patch store ({err}); rerun the cut_patches rule") from err
        try:
            require_complete(self._h5)
            attrs = self._h5.attrs
            self.path = str(path)
            self.source: str = str(attrs["source"])
            self.stain: str = str(attrs["stain"])
            self.patch_size: int = int(attrs["patch_size"])
            self.classes: list[str] = decode_strings(attrs["classes"]) if len(attrs["classes"]) else []
            self.annotation_sets: list[str] = (
                decode_strings(attrs["annotation_sets"]) if len(attrs["annotation_sets"]) else []
            )
            self.split_names: list[str] = decode_strings(attrs["split_names"])
        except BaseException:
            self._h5.close()
            raise
        self._provenance: pd.DataFrame | None = None

    def __len__(self) -> int:
        return int(self._h5["images"].shape[0])

    @property
    def images(self) -> h5py.Dataset:
        """uint8 (N, P, P, 3) RGB patches; index to read."""
        return self._h5["images"]

    def masks(self, annotation_set: str) -> h5py.Dataset:
        """uint8 (N, P, P, C) 0/1 class masks of ``annotation_set``, aligned with ``images``."""
        if annotation_set not in self.annotation_sets:
            msg = f"{self.path}: no masks for annotation set {annotation_set!r}; available: {self.annotation_sets}"
            raise StoreError(msg)
        return self._h5[f"masks/{annotation_set}"]

    @property
    def provenance(self) -> pd.DataFrame:
        """One row per patch: slide, fragment (str), level (int8), x, y (int32, level-k fragment px), split (int8)."""
        if self._provenance is None:
            h5 = self._h5
            self._provenance = pd.DataFrame(
                {
                    "slide": h5["slide"].asstr()[:],
                    "fragment": h5["fragment"].asstr()[:],
                    "level": h5["level"][:],
                    "x": h5["x"][:],
                    "y": h5["y"][:],
                    "split": h5["split"][:],
                }
            )
        return self._provenance

    def split_indices(self, split: str | int) -> npt.NDArray[np.int64]:
        """Sorted indices of the patches in ``split`` ("train", "val", "test" or its code 0, 1, 2)."""
        if isinstance(split, str):
            if split not in self.split_names:
                raise StoreError(f"{self.path}: unknown split {split!r}; expected one of {self.split_names}")
            split = self.split_names.index(split)
        return np.flatnonzero(self._h5["split"][:] == split).astype(np.int64)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
