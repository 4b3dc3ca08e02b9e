"""Shared type aliases."""

import os
from typing import Literal

import numpy as np
import numpy.typing as npt

Level = Literal[0, 1, 2]
"""Pyramid level index: 0 = full size, 1 = 1/2, 2 = 1/4 (see ``DOWNSAMPLES``)."""

DOWNSAMPLES: tuple[int, int, int] = (1, 2, 4)
"""Downsample factor of each stored level, relative to the slide's level 0."""

Stain = Literal["raw", "macenko"]
RGBImage = npt.NDArray[np.uint8]
"""uint8 (H, W, 3) RGB pixels."""
ClassMask = npt.NDArray[np.uint8]
"""uint8 (H, W, C) 0/1 masks, one channel per class in config order."""

PathLike = str | os.PathLike[str]
"""Anything ``open`` and ``pathlib.Path`` accept as a file path."""

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
"""Names of the codes 0, 1, 2 stored in the ``split`` dataset of patch and nuclei stores."""

SPLITS: dict[str, int] = {name: code for code, name in enumerate(SPLIT_NAMES)}
"""Split name -> code in the ``split`` dataset of patch and nuclei stores."""
