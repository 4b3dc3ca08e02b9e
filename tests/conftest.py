"""Shared fixtures: small synthetic slides built with the project's own generator."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


class KilledJob(Exception):
    """Raised by :func:`killed_after` where a real job would have been killed."""


@contextmanager
def killed_after(trainer_module: object, epochs: int) -> Iterator[None]:
    """A training run inside this block dies (``KilledJob``, expected) when its epoch ``epochs + 1`` starts.

    Like a job killed between epochs: last.pt, best.pt and history.csv of ``epochs`` epochs stay behind and the run
    never reaches its end. Patches ``trainer_module._train_epoch`` for the block only.
    """
    train_epoch = trainer_module._train_epoch  # type: ignore[attr-defined]
    calls = 0

    def dying(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > epochs:
            raise KilledJob(f"killed at the start of epoch {calls}")
        return train_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KilledJob):
        patch.setattr(trainer_module, "_train_epoch", dying)
        yield
