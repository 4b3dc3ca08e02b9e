"""Shared fixtures: small synthetic slides built with the project's own generator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train on one thread: on a busy 2-core machine two OpenMP threads contend and run ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_DATA = REPO.parent / "shared" / "data"
"""Real public samples beside the clone (see its SOURCES.md); never copied into the repository."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test skips, saying why, where that folder is absent."""
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (CI keeps ../shared beside the clone)")
    return SHARED_DATA


def write_one_slide_sheet(folder: Path, annotation_sets: tuple[str, ...]) -> Path:
    """A one-slide sheet in ``folder``: a real 64x64 RGB TIFF and an empty QuPath GeoJSON per annotation set."""
    import numpy as np
    import tifffile

    tifffile.imwrite(folder / "s1.tif", np.full((64, 64, 3), 200, dtype=np.uint8), photometric="rgb")
    columns = {"slide": "s1", "path": "s1.tif"}
    for name in annotation_sets:
        (folder / f"s1.{name}.geojson").write_text('{"type": "FeatureCollection", "features": []}')
        columns[name] = f"s1.{name}.geojson"
    sheet = folder / "slides.tsv"
    sheet.write_text("\t".join(columns) + "\n" + "\t".join(columns.values()) + "\n")
    return sheet
