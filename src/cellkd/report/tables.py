"""Write result tables as CSV (for machines) and Markdown (for people), atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


def concat_tables(paths: Mapping[tuple[str, ...], str | os.PathLike[str]], key_names: Sequence[str]) -> pd.DataFrame:
    """Concatenate CSV tables, prefixing each with its key columns (e.g. ``("raw", "unet")`` -> stain, arch)."""
    frames = []
    for key, path in paths.items():
        frame = pd.read_csv(Path(path))
        for position, (name, value) in enumerate(zip(key_names, key, strict=True)):
            frame.insert(position, name, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
