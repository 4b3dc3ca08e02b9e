"""Atomic file writes: write to a temporary name in the same folder, then ``os.replace``.

A job that crashes or is killed never leaves a file at the final path, so Snakemake
(and a human) never mistakes a half-written artifact for a complete one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import h5py


def _temporary_sibling(path: Path) -> Path:
    # Same folder => os.replace is an atomic rename on the same filesystem.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        # h5py does not always set errno on a full disk, hence the text check too.
        if err.errno == errno.ENOSPC or "No space left" in str(err):
            from cellkd.errors import StoreError

            msg = f"{final}: no space left on device while writing it; free space in {final.parent} and rerun"
            raise StoreError(msg) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open a new HDF5 file for writing that appears at ``path`` only once it is closed cleanly.

    The file gets the attribute ``complete = True`` just before closing, so a reader can
    also tell a finished store from one copied mid-write (see ``require_complete``).
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["complete"] = False
        yield h5
        h5.attrs["complete"] = True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def require_complete(h5: h5py.File) -> None:
    """Raise ``StoreError`` unless ``h5`` was closed cleanly by ``atomic_h5``."""
    from cellkd.errors import StoreError

    if not bool(h5.attrs.get("complete", False)):
        msg = f"{h5.filename}: store is incomplete (a job was interrupted); delete it and rerun snakemake"
        raise StoreError(msg)
