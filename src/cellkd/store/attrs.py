"""Reading HDF5 attributes written by the stores."""

from __future__ import annotations

import numpy as np


def decode_strings(values: object) -> list[str]:
    """A string attribute (scalar or array, bytes or str, as h5py returns it) as a list of ``str``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(np.asarray(values, dtype=object))]
