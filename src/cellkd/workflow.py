"""Glue between Snakemake scripts and the package: logging to the rule's log file, progress bars."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def log_to(path: str | None, level: int = logging.INFO) -> None:
    """Send the ``cellkd`` loggers (and warnings) to ``path`` (or stderr when None)."""
    handler: logging.Handler = logging.FileHandler(path, mode="w") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """tqdm over ``items`` written to the current log handler's stream (the rule's log)."""
    stream = next(
        (h.stream for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)),
        sys.stderr,
    )
    # mininterval keeps the log readable: a rule log gets a line every few seconds, not thousands.
    yield from tqdm(items, desc=desc, total=total, file=stream, mininterval=5.0, ascii=True)


def limit_threads(threads: int) -> None:
    """Make torch use the cores the rule was given (Snakemake ``threads:``), not every core of the node."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
