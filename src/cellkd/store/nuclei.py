"""The nuclei store: its layout, its writer (:class:`NucleiWriter`) and its only reader (:class:`NucleiStore`).

One row per nucleus the segmentation model found in a slide (``cellkd.nuclei`` computes the rows;
``extract_nuclei`` writes them through :class:`NucleiWriter`). Readers: the classifier trainers
(``cellkd.training.classifier``), the reports (``cellkd.report.classification``) and the QuPath
export (``cellkd.predict``), all through :class:`NucleiStore`.

Nuclei store ``results/nuclei/{stain}/{slide}.h5`` (written atomically)
    attrs: complete, slide, stain, classes (names, ``"background"`` last), label_sets (the sets
        present), crop_size, multiscale_size, match, min_iou, min_area, max_size, tile, split_touching,
        split_depth, split_waist, split_by, split_ratios, split_block_size, seed,
        split_names ["train", "val", "test"], partial_sets, segmentation_level, predicted_store,
        fragment_store, annotation_files
    Coordinates are the fragment store's working px (``SlideGeometry`` maps them to the slide's level-0 px;
    the same when the slide is not resampled).
    1-D (N,): ``fragment`` (str), ``centroid_x``, ``centroid_y`` (float32, working px),
        ``area`` (int32, working px), ``split`` (int8: 0 train, 1 val, 2 test)
    ``bbox`` (N, 4) int32: x0, y0, x1, y1 in working px, half-open
    ``crops/level0`` (N, crop_size, crop_size, 3) uint8; ``crops/level1``, ``crops/level2``
        (N, multiscale_size, multiscale_size, 3) uint8; chunked (``CROP_CHUNK`` rows), compressed; centred
        on the centroid at downsample 1, 2, 4 (``cellkd.nuclei.crops``)
    ``labels/{set}`` int8 (N,): class index ``i`` is ``classes[i]``, ``len(classes) - 1`` is
        background, ``UNLABELLED`` (-1) a nucleus a partial set does not cover (``cellkd.nuclei.matching``)
    ``geometry`` (N,) variable-length uint8: WKB of the nucleus outline, a shapely Polygon in working px
        (``cellkd.nuclei.crops``); chunked (``CROP_CHUNK`` rows); read with
        :meth:`NucleiStore.geometries`

Rows run fragment by fragment (sorted names), then by extraction tile (row-major, ``nuclei.tile``
segmentation-level px), and within a tile by centroid (y, x) (``cellkd.nuclei.extract``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import pandas as pd
import shapely

from cellkd.errors import StoreError
from cellkd.store.atomic import require_complete
from cellkd.store.attrs import ClosingStore, decode_strings, open_store
from cellkd.store.compression import COMPRESSION
from cellkd.types import SPLIT_NAMES, PathLike

UNLABELLED = -1
"""Label of an instance that a partial annotation set (e.g. ea) does not cover."""
CROP_CHUNK = 1024
"""Rows per HDF5 chunk of the crop and outline datasets."""
CROP_LEVELS = (0, 1, 2)
"""Pyramid levels of the crops (downsample 1, 2, 4)."""


@dataclass
class FragmentNuclei:
    """The nuclei of one fragment (or one tile of it) as the store holds them, sorted by centroid (y, x)."""

    centroid_x: npt.NDArray[np.float64]  # working px (see the module docstring)
    centroid_y: npt.NDArray[np.float64]
    area: npt.NDArray[np.int64]  # working px
    bbox: npt.NDArray[np.int64]  # (n, 4) x0, y0, x1, y1, working px, half-open
    labels: dict[str, npt.NDArray[np.int64]]
    outline: npt.NDArray[np.object_]  # (n,) shapely Polygons, working px


class _Appender:
    """Append rows to a resizable chunked dataset, writing whole chunks only (no read-modify-write)."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.chunk = ds.chunks[0]
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        self.buffer.append(rows)
        self.buffered += rows.shape[0]
        if self.buffered >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        count = data.shape[0] // self.chunk * self.chunk if whole_chunks else data.shape[0]
        if count:
            self.ds.resize(self.written + count, axis=0)
            self.ds[self.written : self.written + count] = data[:count]
            self.written += count
        rest = data[count:]
        self.buffer = [rest] if rest.shape[0] else []
        self.buffered = rest.shape[0]

    def close(self) -> None:
        self._flush(whole_chunks=False)


def _wkb_rows(polygons: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
    """(n,) object array of uint8 WKB arrays, the form an h5py variable-length uint8 dataset stores."""
    rows = np.empty(polygons.size, dtype=object)
    rows[:] = [np.frombuffer(b, dtype=np.uint8) for b in shapely.to_wkb(polygons)]
    return rows


def _cat(parts: list[np.ndarray], dtype: type, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype=dtype)


class NucleiWriter:
    """Write a nuclei store (layout: module docstring) fragment by fragment into ``h5``, an open ``atomic_h5`` file.

    Crops and outlines go to disk as each fragment is appended, so those of a whole slide are never
    all in memory; the 1-D columns are kept and written by :meth:`finish`, with the attributes.
    """

    def __init__(self, h5: h5py.File, crop_size: int, multiscale_size: int, label_sets: Sequence[str]) -> None:
        self._h5 = h5
        self.crop_sizes = (crop_size, multiscale_size, multiscale_size)
        """Crop edge (px) at each level of ``CROP_LEVELS``."""
        self._label_sets = list(label_sets)
        self._crops = [
            _Appender(
                h5.create_dataset(
                    f"crops/level{k}",
                    shape=(0, size, size, 3),
                    maxshape=(None, size, size, 3),
                    dtype=np.uint8,
                    chunks=(CROP_CHUNK, size, size, 3),
                    **COMPRESSION,
                )
            )
            for k, size in zip(CROP_LEVELS, self.crop_sizes, strict=True)
        ]
        self._geometry = h5.create_dataset(
            "geometry", shape=(0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8), chunks=(CROP_CHUNK,)
        )
        self._columns: list[FragmentNuclei] = []
        self.fragments: list[str] = []
        """Fragment name of each row appended so far."""

    def append(self, fragment: str, nuclei: FragmentNuclei, crops: Iterable[npt.NDArray[np.uint8]]) -> None:
        """Append the rows of ``fragment``: ``nuclei`` and its uint8 (n, S, S, 3) crops at each of ``CROP_LEVELS``.

        ``crops`` is consumed one level at a time (pass a generator to hold one level in memory).
        """
        for appender, level_crops in zip(self._crops, crops, strict=True):
            appender.append(level_crops)
        start = self._geometry.shape[0]
        self._geometry.resize(start + nuclei.area.size, axis=0)
        if nuclei.area.size:
            # write_direct: h5py's __setitem__ stacks equal-length vlen rows into 2-D and fails.
            self._geometry.write_direct(_wkb_rows(nuclei.outline), dest_sel=np.s_[start:])
        # Outlines are on disk now: keep the 1-D columns only.
        columns = FragmentNuclei(
            nuclei.centroid_x, nuclei.centroid_y, nuclei.area, nuclei.bbox, nuclei.labels, np.empty(0, dtype=object)
        )
        self._columns.append(columns)
        self.fragments.extend([fragment] * nuclei.area.size)

    def finish(self, split: npt.NDArray[np.int8], attrs: Mapping[str, Any]) -> None:
        """Write the 1-D columns, ``split`` (int8 (N,) codes) and the store attributes ``attrs``."""
        for appender in self._crops:
            appender.close()
        h5, parts = self._h5, self._columns
        h5.create_dataset("fragment", data=np.array(self.fragments, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("centroid_x", data=_cat([p.centroid_x for p in parts], np.float32))
        h5.create_dataset("centroid_y", data=_cat([p.centroid_y for p in parts], np.float32))
        h5.create_dataset("area", data=_cat([p.area for p in parts], np.int32))
        h5.create_dataset("bbox", data=_cat([p.bbox for p in parts], np.int32, (4,)))
        h5.create_dataset("split", data=split)
        h5.require_group("labels")
        for set_name in self._label_sets:
            h5.create_dataset(f"labels/{set_name}", data=_cat([p.labels[set_name] for p in parts], np.int8))
        h5.attrs.update(attrs)


class NucleiStore(ClosingStore):
    """Read-only view of a nuclei store (layout: module docstring). Use as a context manager.

    Reads are explicit (``labels``, ``split``, ``crop_rows``, ...), so a caller that walks the
    crops in chunks never holds the whole store. Stores written by ``extract_nuclei`` carry every
    attribute; a store holding only ``classes``, ``crops/level0``, ``split`` and ``labels`` (as test
    and benchmark fixtures write) is read too, with ``slide``/``stain`` empty.
    """

    def __init__(self, path: PathLike) -> None:
        self._h5 = open_store(path, "nuclei store", "rerun the extract_nuclei rule")
        try:
            require_complete(self._h5)
            self.path = str(path)
            missing = [key for key in ("crops/level0", "split", "labels") if key not in self._h5]
            if missing:
                raise StoreError(f"{path}: nuclei store lacks {missing}; it is not a cellkd nuclei store")
            attrs = self._h5.attrs
            self.classes: list[str] = decode_strings(attrs["classes"])
            """Class names, ``"background"`` last (its index is ``len(classes) - 1``)."""
            self.slide: str = str(attrs.get("slide", ""))
            self.stain: str = str(attrs.get("stain", ""))
            if "label_sets" in attrs:
                self.label_sets: list[str] = decode_strings(attrs["label_sets"]) if len(attrs["label_sets"]) else []
            else:
                self.label_sets = sorted(self._h5["labels"])
            self.crop_size: int = int(self._h5["crops/level0"].shape[1])
            self.multiscale_size: int = int(self._h5["crops/level1"].shape[1]) if "crops/level1" in self._h5 else 0
            """Crop edge at levels 1 and 2 (0: the store has no multiscale crops)."""
            self.split_names: list[str] = decode_strings(attrs.get("split_names", list(SPLIT_NAMES)))
        except KeyError as err:
            self._h5.close()
            raise StoreError(f"{path}: not a nuclei store (missing {err}); rerun the extract_nuclei rule") from err
        except BaseException:
            self._h5.close()
            raise

    def __len__(self) -> int:
        return int(self._h5["split"].shape[0])

    def crops(self, level: int = 0) -> h5py.Dataset:
        """uint8 (N, S, S, 3) RGB crops at ``level`` (S = crop_size at 0, multiscale_size at 1, 2); index to read."""
        if level not in CROP_LEVELS:
            raise StoreError(f"{self.path}: no crops at level {level!r}; expected 0, 1 or 2")
        key = f"crops/level{level}"
        if key not in self._h5:
            raise StoreError(f"{self.path}: the nuclei store lacks {key}; rerun the extract_nuclei rule")
        return self._h5[key]

    def crop_rows(self, levels: Sequence[int], start: int, stop: int) -> npt.NDArray[np.uint8]:
        """uint8 (n, S, S, 3 * len(levels)) crops of rows [start, stop) at ``levels``, stacked along channels."""
        if len(levels) == 1:
            return self.crops(levels[0])[start:stop]
        return np.concatenate([self.crops(level)[start:stop] for level in levels], axis=-1)

    def labels(self, annotation_set: str) -> npt.NDArray[np.int8]:
        """int8 (N,) class indices from ``annotation_set``; background = len(classes) - 1, -1 = unlabelled."""
        if annotation_set not in self.label_sets:
            msg = (
                f"{self.path}: no label set {annotation_set!r} in the nuclei store (it has {self.label_sets}); "
                "use one of them"
            )
            raise StoreError(msg)
        return self._h5[f"labels/{annotation_set}"][:]

    @property
    def split(self) -> npt.NDArray[np.int8]:
        """int8 (N,) split codes: 0 train, 1 val, 2 test."""
        return self._h5["split"][:]

    def split_indices(self, split: str | int) -> npt.NDArray[np.int64]:
        """Sorted indices of the nuclei in ``split`` ("train", "val", "test" or its code 0, 1, 2)."""
        if isinstance(split, str):
            if split not in self.split_names:
                raise StoreError(f"{self.path}: unknown split {split!r}; expected one of {self.split_names}")
            split = self.split_names.index(split)
        return np.flatnonzero(self.split == split).astype(np.int64)

    def geometries(self, start: int = 0, stop: int | None = None) -> list[shapely.Polygon]:
        """The nucleus outlines of rows [start, stop) (default: all N) as shapely Polygons in working px, in row order.

        A row range reads only its HDF5 chunks, so a caller walking the store in ranges never holds every outline.
        """
        if "geometry" not in self._h5:
            msg = f"{self.path}: the nuclei store has no outlines (written by an older cellkd); rerun extract_nuclei"
            raise StoreError(msg)
        rows = self._h5["geometry"][start:stop]
        wkb = np.empty(rows.size, dtype=object)
        wkb[:] = [row.tobytes() for row in rows]
        return list(shapely.from_wkb(wkb))

    def areas(self) -> npt.NDArray[np.int32]:
        """int32 (N,) nucleus areas in working px² (every pixel of the instance), in row order."""
        return self._h5["area"][:]

    def table(self) -> pd.DataFrame:
        """One row per nucleus: fragment, centroid_x, centroid_y, area, x0, y0, x1, y1, split, label_{set}."""
        h5 = self._h5
        bbox = h5["bbox"][:]
        data: dict[str, np.ndarray] = {
            "fragment": h5["fragment"].asstr()[:],
            "centroid_x": h5["centroid_x"][:],
            "centroid_y": h5["centroid_y"][:],
            "area": h5["area"][:],
            "x0": bbox[:, 0],
            "y0": bbox[:, 1],
            "x1": bbox[:, 2],
            "y1": bbox[:, 3],
            "split": h5["split"][:],
        }
        for set_name in self.label_sets:
            data[f"label_{set_name}"] = h5[f"labels/{set_name}"][:]
        return pd.DataFrame(data)


__all__ = ["CROP_CHUNK", "CROP_LEVELS", "UNLABELLED", "FragmentNuclei", "NucleiStore", "NucleiWriter"]
