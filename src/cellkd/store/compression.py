"""The one compression setting of every cellkd HDF5 store: Blosc (zstd, level 1, bit-shuffle) via ``hdf5plugin``.

Why this codec (single thread, 256² chunks, uint8; ratio = raw / stored bytes; write / read MB/s):

- lzf (before): CMU-1 SVS region (19.8 MB RGB) 2.27, 60 / 200; demo fragments (7.9 MB RGB) 1.44,
  64 / 140; demo masks (1.7 MB) 45.
- Blosc lz4 5 shuffle: CMU-1 2.31, 700-1300 / 1500-2200; demo 1.23, 300 / 730; masks 71.
- **Blosc zstd 1 bit-shuffle (chosen)**: CMU-1 2.58, 420-460 / 640; demo 1.53, 195 / 316; masks 155.
- Blosc zstd 3 bit-shuffle: demo 1.59, 81 / 358; masks 193.
- On a MoNuSeg tile (1000², 3.0 MB): lzf 1.00, zstd-1 bit-shuffle 1.19, zstd-1 byte-shuffle 1.04; byte-shuffle
  also loses on CMU-1 (2.53) and masks (134), so bit-shuffle it is.

(CMU-1 figures by the coordinator; demo figures on the demo's synthetic slides, both on a shared,
noisy 2-core machine, so speeds are indicative.) zstd-1 with bit-shuffle is the smallest of the fast
settings on real slides (12-16% smaller images than lzf, 3x smaller masks; on the demo's noisy synthetic
images 6% smaller raw and equal Macenko-normalized fragment stores) and still writes 2-7x faster
than lzf (which took 40% of preprocessing time) and reads as fast or up to 3x faster (a rerun on CMU-1 here:
lzf 144 / 452, zstd-1 bit-shuffle 287 / 440 MB/s). lz4 is faster still but stores the
noisy demo images larger than lzf; zstd-3 gains 4% in size for 2-5x slower writes; Blosc2 was slower
than Blosc on these chunks.

Reading: the stores are plain HDF5 with the registered Blosc filter (id 32001). A plain h5py user reads
them after ``import hdf5plugin`` (which registers the filter with HDF5); this module imports it, and
``cellkd.store`` imports this module, so every cellkd reader has the filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import hdf5plugin

COMPRESSION: Mapping[str, Any] = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
"""Keyword arguments of ``h5py.Group.create_dataset`` (``compression``, ``compression_opts``) for every store:
``group.create_dataset(name, ..., chunks=..., **COMPRESSION)``."""

FILTER_ID: int = hdf5plugin.BLOSC_ID
"""HDF5 filter id of ``COMPRESSION`` (what ``h5py.Dataset._filters`` / ``h5dump`` show)."""


def is_compressed(dataset: h5py.Dataset) -> bool:
    """Whether ``dataset`` was written with ``COMPRESSION``'s filter."""
    plist = dataset.id.get_create_plist()
    return any(plist.get_filter(i)[0] == FILTER_ID for i in range(plist.get_nfilters()))
