"""Fragment store: each tissue fragment of one slide at levels 1, 1/2 and 1/4, at the working resolution.

See ``cellkd.store`` for the layout. Writing streams tile by tile into chunked,
compressed datasets; reading hands out ``h5py.Dataset`` objects so callers slice
only the window they need.

Working pixels: level 0 of a store is the slide resampled to the working resolution (config ``mpp``), so
fragment boxes, masks, patches and nuclei are all in *working px*. The slide's own level-0 pixels (QuPath's
GeoJSON, the exported predictions) differ from them by one scale, origin shared: ``SlideGeometry``, stored
in the store's attrs, is the one place that maps between the two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import h5py
import numpy as np
import numpy.typing as npt
import shapely

from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.attrs import ClosingStore, open_store
from cellkd.store.compression import COMPRESSION
from cellkd.types import DOWNSAMPLES, RGBImage

if TYPE_CHECKING:
    import geopandas as gpd

CHUNK = 256
"""Chunk edge (pixels) of stored images: one read/write tile."""

SCALE_SNAP = 1e-3
"""Relative distance within which a scale snaps to a whole ratio (1, 2, 1/2, ...): scanners round their mpp
(0.2499 for 0.25), and resampling by 1.0004 would only blur the pixels."""


@dataclass(frozen=True)
class Fragment:
    """A tissue fragment: bounding box in working pixels (``SlideGeometry``; level-0 slide px when not resampled)."""

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


@dataclass(frozen=True)
class SlideGeometry:
    """How a store's working pixels map onto the slide's own level-0 pixels: ``slide = scale * working``.

    Both frames share the origin (the slide's top-left corner) and use continuous coordinates with pixel
    corners on whole numbers, so a point, a polygon or a box maps by one multiplication. ``working_mpp`` is
    the µm per stored pixel (``slide_mpp * scale``: the configured ``mpp``, unless the scale snapped to a whole
    ratio, see ``SCALE_SNAP``); ``slide_mpp`` the slide's level-0 µm/px, ``slide_mpp_assumed`` when that is
    the ``mpp_fallback`` because the slide does not say. NaN mpps: unknown (a store written without them).
    """

    working_mpp: float
    slide_mpp: float
    scale: float = 1.0
    slide_mpp_assumed: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"slide scale {self.scale!r} must be a positive number")

    @classmethod
    def identity(cls, mpp: float, *, assumed: bool = False) -> SlideGeometry:
        """Working pixels that are the slide's own (no resampling), ``mpp`` µm each (NaN: unknown)."""
        return cls(float(mpp), float(mpp), 1.0, assumed)

    @classmethod
    def for_slide(cls, slide_mpp: float, working_mpp: float | None, *, assumed: bool = False) -> SlideGeometry:
        """The geometry of a slide of ``slide_mpp`` read at ``working_mpp`` (None: at its own resolution)."""
        if not (math.isfinite(slide_mpp) and slide_mpp > 0):
            raise ValueError(f"slide mpp {slide_mpp!r} must be a positive number")
        if working_mpp is None:
            return cls.identity(slide_mpp, assumed=assumed)
        if not (math.isfinite(working_mpp) and working_mpp > 0):
            raise ValueError(f"working mpp {working_mpp!r} must be a positive number (config mpp)")
        scale = working_mpp / slide_mpp
        whole = float(round(scale)) if scale >= 1 else 1 / round(1 / scale)
        if abs(scale - whole) <= SCALE_SNAP * scale:
            scale = whole
        return cls(slide_mpp * scale, float(slide_mpp), scale, assumed)

    def slide_mpp_or(self, fallback: float) -> float:
        """The slide's level-0 µm/px, which its GeoJSON is in; ``fallback`` (``mpp_fallback``) when unknown (NaN)."""
        return self.slide_mpp if math.isfinite(self.slide_mpp) else fallback

    @property
    def resampled(self) -> bool:
        """Whether the working pixels differ from the slide's own."""
        return self.scale != 1.0

    def to_slide(self, xy: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Working-px coordinates (any shape) -> the slide's level-0 px."""
        return np.asarray(xy, dtype=np.float64) * self.scale

    def to_working(self, xy: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The slide's level-0 px coordinates (any shape) -> working px."""
        return np.asarray(xy, dtype=np.float64) / self.scale

    def geometries_to_slide(self, geometries: npt.ArrayLike) -> npt.NDArray[np.object_]:
        """Shapely geometries in working px -> level-0 slide px (the same objects when not resampled)."""
        return self._map_geometries(geometries, self.to_slide)

    def geometries_to_working(self, geometries: npt.ArrayLike) -> npt.NDArray[np.object_]:
        """Shapely geometries in level-0 slide px -> working px (the same objects when not resampled)."""
        return self._map_geometries(geometries, self.to_working)

    def _map_geometries(self, geometries: npt.ArrayLike, mapping: object) -> npt.NDArray[np.object_]:
        array = np.asarray(geometries, dtype=object)
        return array if not self.resampled else shapely.transform(array, mapping)

    def frame_to_working(self, frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        """A GeoDataFrame (e.g. read QuPath annotations) in level-0 slide px -> a copy in working px."""
        if not self.resampled:
            return frame
        import geopandas as gpd  # only the readers of annotations need it

        out = frame.copy()
        name = frame.geometry.name
        out[name] = gpd.GeoSeries(self.geometries_to_working(frame.geometry.values), index=frame.index, crs=frame.crs)
        return out

    def area_to_slide(self, area: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Areas in working px² -> level-0 slide px²."""
        return np.asarray(area, dtype=np.float64) * self.scale**2

    def box_to_working(self, fragment: Fragment) -> Fragment:
        """The working-px box covering ``fragment``'s level-0 box (same name)."""
        if not self.resampled:
            return fragment
        x0, y0 = (math.floor(v / self.scale) for v in (fragment.x, fragment.y))
        x1 = math.ceil((fragment.x + fragment.width) / self.scale)
        y1 = math.ceil((fragment.y + fragment.height) / self.scale)
        return Fragment(fragment.name, x0, y0, max(1, x1 - x0), max(1, y1 - y0))

    def size_to_working(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of a level-0 slide in working px (rounded up: the last pixel is partly slide)."""
        return math.ceil(size[0] / self.scale), math.ceil(size[1] / self.scale)

    def attrs(self) -> dict[str, float | bool]:
        """The store attrs that record this geometry (read back by ``from_attrs``)."""
        return {
            "mpp": self.working_mpp,
            "slide_mpp": self.slide_mpp,
            "slide_scale": self.scale,
            "slide_mpp_assumed": self.slide_mpp_assumed,
        }

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager) -> SlideGeometry:
        """The geometry a store recorded; a store from before working resolutions is its slide's own pixels."""
        mpp = float(attrs.get("mpp", float("nan")))
        if "slide_scale" not in attrs:
            return cls.identity(mpp)
        return cls(mpp, float(attrs["slide_mpp"]), float(attrs["slide_scale"]), bool(attrs["slide_mpp_assumed"]))


def fragment_name(index: int) -> str:
    """Canonical fragment name for the ``index``-th fragment of a slide."""
    return f"f{index:03d}"


def iter_windows(height: int, width: int, tile: int = CHUNK) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(y, x, h, w)`` windows covering an (height, width) image once, row-major."""
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield y, x, min(tile, height - y), min(tile, width - x)


class FragmentStore(ClosingStore):
    """Read-only view of a fragment store. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._h5 = open_store(path, "fragment store", "rerun the extract_fragments rule")
        require_complete(self._h5)
        attrs = self._h5.attrs
        self.path = str(path)
        self.slide: str = str(attrs["slide"])
        self.source: str = str(attrs.get("source", ""))
        self.stain: str = str(attrs["stain"])
        self.geometry = SlideGeometry.from_attrs(attrs)
        self.mpp: float = self.geometry.working_mpp
        """µm per stored pixel (the working resolution; NaN when unknown)."""
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
        mpp: float = float("nan"),
        slide_size: tuple[int, int] | None = None,
        geometry: SlideGeometry | None = None,
    ) -> None:
        """``geometry``: how the stored pixels map to the slide's; None: they are the slide's own, ``mpp`` µm each."""
        self.path = path
        geometry = geometry or SlideGeometry.identity(mpp)
        self._attrs = {
            "slide": slide,
            "source": str(source),
            "stain": stain,
            **geometry.attrs(),
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
