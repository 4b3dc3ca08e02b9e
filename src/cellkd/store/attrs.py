"""Reading cellkd's HDF5 stores: opening one with an error that says what to rerun, decoding string attributes."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

import h5py
import numpy as np

from cellkd.errors import StoreError
from cellkd.types import PathLike


def open_store(path: PathLike, what: str, fix: str) -> h5py.File:
    """``path`` opened read-only; ``StoreError`` "<path>: cannot open <what> (<reason>); <fix>" otherwise."""
    try:
        return h5py.File(path, "r")
    except OSError as err:  # FileNotFoundError included
        raise StoreError(f"{path}: cannot open {what} ({err}); {fix}") from err


def decode_strings(values: object) -> list[str]:
    """A string attribute (scalar or array, bytes or str, as h5py returns it) as a list of ``str``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(np.asarray(values, dtype=object))]


_Store = TypeVar("_Store", bound="ClosingStore")  # typing.Self needs Python 3.11; the project supports 3.10


class ClosingStore:
    """``with Reader(path) as store:`` for the store readers: ``__exit__`` calls the reader's ``close``.

    The default ``close`` closes the reader's ``_h5`` file; a reader that holds other files overrides it.
    """

    _h5: h5py.File

    def close(self) -> None:
        self._h5.close()

    def __enter__(self: _Store) -> _Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
