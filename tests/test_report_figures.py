"""The report's PNG helper: headless drawing, atomic writes, figures always closed."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.image import imread

from cellkd.report.figures import png_figure


def test_png_figure_writes_the_drawn_figure_at_the_requested_dpi(tmp_path: Path) -> None:
    png = tmp_path / "sub" / "plot.png"
    with png_figure(png, dpi=50, nrows=1, ncols=2, figsize=(4, 2)) as (fig, axes):
        assert matplotlib.get_backend().lower() == "agg"
        assert len(axes) == 2
        axes[0].plot([0, 1], [0, 1])
        assert not png.exists()  # nothing at the final path until the block is done
    assert imread(png).shape[:2] == (2 * 50, 4 * 50)
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in png.parent.iterdir()] == ["plot.png"]


def test_png_figure_leaves_no_file_when_drawing_fails(tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    with pytest.raises(RuntimeError, match="boom"), png_figure(png, dpi=50) as (fig, _):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not plt.fignum_exists(fig.number)


def test_png_figure_keeps_a_layout_engine_the_caller_chose(tmp_path: Path) -> None:
    with png_figure(tmp_path / "plot.png", dpi=50, layout="constrained") as (fig, _):
        pass
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
