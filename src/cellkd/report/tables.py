"""Write result tables as CSV (for machines) and Markdown (for people), atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from cellkd.report.seeds import SEEDS_COLUMN, interval_note, markdown_view, mean_ci95
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


class SeedTablePaths(NamedTuple):
    """Where :func:`write_seed_table` writes: the aggregated CSV, the per-seed CSV and the Markdown view."""

    csv: str | os.PathLike[str]
    per_seed: str | os.PathLike[str]
    md: str | os.PathLike[str]


def write_seed_table(
    per_seed: pd.DataFrame,
    keys: Sequence[str],
    metrics: Sequence[str],
    paths: SeedTablePaths,
    title: str,
    carry: Sequence[str] = (),
) -> pd.DataFrame:
    """Write a table measured once per training seed: the per-seed rows, their mean ± 95% CI and its Markdown view.

    ``per_seed`` holds ``keys``, a ``seed`` column, ``metrics`` and ``carry`` (equal for every seed); the
    aggregation is :func:`cellkd.report.seeds.mean_ci95`. Returns the aggregated table.
    """
    aggregated = mean_ci95(per_seed, keys, metrics, carry)
    write_seed_outputs(per_seed, aggregated, metrics, paths, title)
    return aggregated


def write_seed_outputs(
    per_seed: pd.DataFrame, aggregated: pd.DataFrame, metrics: Sequence[str], paths: SeedTablePaths, title: str
) -> None:
    """Write ``per_seed`` to ``paths.per_seed``, ``aggregated`` (``<metric>_mean``/``_ci95``, ``seeds``) to
    ``paths.csv``, and to ``paths.md`` its ``mean ± ci`` view under ``# title (what the ± is)``."""
    with atomic_path(paths.per_seed) as tmp:
        per_seed.to_csv(tmp, index=False)
    with atomic_path(paths.csv) as tmp:
        aggregated.to_csv(tmp, index=False)
    # disable_numparse: a lone mean ("0.172", one seed) stays as written, not re-read as a number and padded to 0.1720
    markdown = markdown_view(aggregated, metrics).to_markdown(index=False, disable_numparse=True)
    note = interval_note(aggregated[SEEDS_COLUMN]) if len(aggregated) else "no rows"
    atomic_write_text(paths.md, f"# {title} ({note})\n\n{markdown}\n")
