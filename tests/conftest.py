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
