"""Write result tables as CSV (for machines) and Markdown (for people), atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cellkd.store.atomic import atomic_path, atomic_write_text


def write_table(
    table: pd.DataFrame,
    csv_path: str | os.PathLike[str],
    markdown_path: str | os.PathLike[str],
    title: str,
    float_format: str = ".4f",
) -> None:
    """Write ``table`` to ``csv_path`` and, under a ``# title`` heading, to ``markdown_path``."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    markdown = table.to_markdown(index=False, floatfmt=float_format)
    atomic_write_text(markdown_path, f"# {title}\n\n{markdown}\n")


def read_tables(paths: list[str | os.PathLike[str]], **labels: list[str]) -> pd.DataFrame:
    """Concatenate CSV tables, adding one column per ``labels`` entry (a value per path, in order)."""
    frames = []
    for i, path in enumerate(paths):
        frame = pd.read_csv(Path(path))
        for column, values in labels.items():
            frame.insert(0, column, values[i])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
