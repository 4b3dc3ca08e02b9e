"""The class-mask store ``results/masks/{slide}.h5``: its one reader.

Written by ``cellkd.annotations.rasterize.write_mask_store`` (atomically), which rasterizes each
annotation set (QuPath GeoJSON) onto every fragment and level of the slide's raw fragment store.
Read by the patch store (``cellkd.store.patches``: training windows) and Figure 4
(``cellkd.report.segmentation``), always through :class:`MaskStore`.

Layout:
    attrs: complete, slide, classes (names, config order), annotation_sets (e.g. ssa, wsa, ea, truth),
        annotation_files, downsamples [1, 2, 4]
    ``/fragments/{name}`` attrs x, y, width, height (level-0 box, as in the fragment store)
    ``/fragments/{name}/{set}/level{k}`` uint8 (H_k, W_k, C) 0/1, one channel per class; H_k, W_k equal
        the fragment store's level k
"""

from __future__ import annotations

import h5py

from cellkd.errors import StoreError
from cellkd.store.atomic import require_complete
from cellkd.store.attrs import ClosingStore, decode_strings, open_store
from cellkd.types import PathLike

_RERUN = "rerun the rasterize_annotations rule"


class MaskStore(ClosingStore):
    """Read-only view of a mask store. Use as a context manager."""

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        self._h5 = open_store(path, "mask store", _RERUN)
        try:
            require_complete(self._h5)
            self.classes: list[str] = decode_strings(self._h5.attrs["classes"])
            sets = self._h5.attrs["annotation_sets"]
            self.annotation_sets: list[str] = decode_strings(sets) if len(sets) else []
        except BaseException:
            self._h5.close()
            raise

    def has_fragment(self, name: str) -> bool:
        """Whether the store holds masks of fragment ``name``."""
        return f"fragments/{name}" in self._h5

    def level(self, fragment: str, annotation_set: str, level: int) -> h5py.Dataset:
        """uint8 (H_k, W_k, C) masks of ``annotation_set`` on ``fragment`` at ``level``; slice it to read."""
        key = f"fragments/{fragment}/{annotation_set}/level{level}"
        if key not in self._h5:
            raise StoreError(f"{self.path}: has no {key}; {_RERUN}")
        return self._h5[key]
