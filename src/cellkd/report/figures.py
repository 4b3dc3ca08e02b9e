"""Report figures: headless matplotlib and atomic PNG writes, in one place for every plot of the report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cellkd.store.atomic import atomic_path
from cellkd.types import PathLike

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@contextlib.contextmanager
def png_figure(png_path: PathLike, dpi: int, **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """Yield ``(fig, axes)`` of ``plt.subplots(**subplots)`` drawn with the headless Agg backend.

    When the block exits cleanly the figure is laid out (``tight_layout``, unless ``subplots`` chose a
    layout engine such as ``layout="constrained"``) and written to ``png_path`` atomically at ``dpi``,
    so an interrupted job never leaves a partial PNG. The figure is closed either way.
    """
    # matplotlib is imported here, not at module level: only the report jobs draw, and the import is slow.
    import matplotlib

    matplotlib.use("Agg")  # cluster nodes have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
