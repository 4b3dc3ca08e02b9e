"""Fragment store: each tissue fragment of one slide at levels 1, 1/2 and 1/4.

See ``cellkd.store`` for the layout. Writing streams tile by tile into chunked,
compressed datasets; reading hands out ``h5py.Dataset`` objects so callers slice
only the window they need.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import h5py
import numpy as np

from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.attrs import open_store
from cellkd.store.compression import COMPRESSION
from cellkd.types import DOWNSAMPLES, RGBImage

CHUNK = 256
"""Chunk edge (pixels) of stored images: one read/write tile."""


@dataclass(frozen=True)
class Fragment:
    """A tissue fragment: bounding box in level-0 slide pixels."""

    name: str
    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"fragment {self.name!r} has an empty box {self.width}x{self.height}")

    def shape_at(self, level: int) -> tuple[int, int]:
        """(height, width) of this fragment at ``level`` (ceil division by its downsample)."""
        down = DOWNSAMPLES[level]
        return math.ceil(self.height / down), math.ceil(self.width / down)


def fragment_name(index: int) -> str:
    """Canonical fragment name for the ``index``-th fragment of a slide."""
    return f"f{index:03d}"


def iter_windows(height: int, width: int, tile: int = CHUNK) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(y, x, h, w)`` windows covering an (height, width) image once, row-major."""
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield y, x, min(tile, height - y), min(tile, width - x)


class FragmentStore:
    """Read-only view of a fragment store. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._h5 = open_store(path, "fragment store", "rerun the extract_fragments rule")
        require_complete(self._h5)
        attrs = self._h5.attrs
        self.path = str(path)
        self.slide: str = str(attrs["slide"])
        self.source: str = str(attrs.get("source", ""))
        self.stain: str = str(attrs["stain"])
        self.mpp: float = float(attrs.get("mpp", float("nan")))
        width, height = (int(v) for v in attrs.get("slide_size", (0, 0)))
        self.slide_size: tuple[int, int] | None = (width, height) if width and height else None
        self.fragments: list[Fragment] = [
            Fragment(name, *(int(g.attrs[k]) for k in ("x", "y", "width", "height")))
            for name, g in sorted(self._h5["fragments"].items())
        ]

    def level(self, fragment: str | Fragment, level: int) -> h5py.Dataset:
        """uint8 (H_k, W_k, 3) dataset of ``fragment`` at ``level``; slice it to read."""
        name = fragment.name if isinstance(fragment, Fragment) else fragment
        return self._h5[f"fragments/{name}/level{level}"]

    def macenko_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The Macenko target this store was normalized to: (stain_matrix (3, 2), max_concentrations (2,)).

        None for a store that was not Macenko-normalized (the attrs are written by ``cellkd.stain``).
        """
        attrs = self._h5.attrs
        if "reference_stain_matrix" not in attrs:
            return None
        return np.asarray(attrs["reference_stain_matrix"]), np.asarray(attrs["reference_max_concentrations"])

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> FragmentStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FragmentStoreWriter:
    """Write a fragment store atomically: nothing appears at ``path`` unless ``__exit__`` succeeds.

    >>> with FragmentStoreWriter(path, slide="s1", source="s1.tiff", stain="raw", mpp=0.5) as w:
    ...     ds = w.create_level(fragment, level=0)
    ...     ds[y:y+h, x:x+w] = tile
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slide: str,
        source: str,
        stain: str,
        mpp: float,
        slide_size: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self._attrs = {
            "slide": slide,
            "source": str(source),
            "stain": stain,
            "mpp": float(mpp),
            "downsamples": np.asarray(DOWNSAMPLES, dtype=np.int32),
            # (width, height) of the slide's level 0; (0, 0) when unknown.
            "slide_size": np.asarray(slide_size or (0, 0), dtype=np.int64),
        }
        self._context = atomic_h5(path)
        self._h5: h5py.File | None = None

    def __enter__(self) -> FragmentStoreWriter:
        self._h5 = self._context.__enter__()
        self._h5.attrs.update(self._attrs)
        self._h5.require_group("fragments")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._context.__exit__(exc_type, exc, tb)

    @property
    def attrs(self) -> h5py.AttributeManager:
        """Root attrs of the file being written (e.g. the fitted stain parameters)."""
        assert self._h5 is not None, "use FragmentStoreWriter as a context manager"
        return self._h5.attrs

    def create_level(self, fragment: Fragment, level: int) -> h5py.Dataset:
        """Create (zero-filled) the uint8 (H_k, W_k, 3) dataset of ``fragment`` at ``level``."""
        assert self._h5 is not None, "use FragmentStoreWriter as a context manager"
        group = self._h5.require_group(f"fragments/{fragment.name}")
        group.attrs.update({"x": fragment.x, "y": fragment.y, "width": fragment.width, "height": fragment.height})
        height, width = fragment.shape_at(level)
        return group.create_dataset(
            f"level{level}",
            shape=(height, width, 3),
            dtype=np.uint8,
            chunks=(min(CHUNK, height), min(CHUNK, width), 3),
            **COMPRESSION,
        )

    def write_tiles(self, fragment: Fragment, level: int, tiles: Iterator[tuple[int, int, RGBImage]]) -> None:
        """Create the level dataset and fill it from ``(y, x, tile)`` items (level-k fragment pixels)."""
        ds = self.create_level(fragment, level)
        for y, x, tile in tiles:
            ds[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
