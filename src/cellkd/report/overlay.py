"""Predicted nuclei drawn over the tissue, coloured by class: the report's look at what the model calls what.

Left panel: the largest fragment at its coarsest stored level, one dot per nucleus. Right panel: the
densest ``window``-pixel square of that fragment at full resolution, with the predicted outlines. Both are
bounded in memory whatever the slide size (a strided read of the coarsest level, one window at level 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cellkd.annotations.qupath import read_qupath_geojson
from cellkd.classes import ClassSpec
from cellkd.report.figures import png_figure
from cellkd.store.fragments import Fragment, FragmentStore
from cellkd.types import DOWNSAMPLES, PathLike

if TYPE_CHECKING:
    import geopandas as gpd


THUMBNAIL_EDGE = 1200
"""Longest edge (pixels) of the whole-fragment panel: coarser levels are read with a stride to fit."""


def plot_prediction_overlay(
    fragments_path: PathLike,
    predictions_path: PathLike,
    classes: Sequence[ClassSpec],
    png_path: PathLike,
    window: int = 512,
) -> dict[str, int]:
    """Draw the predictions of ``predictions_path`` (QuPath GeoJSON) over the largest fragment.

    The GeoJSON is in the slide's level-0 px; it is scaled to the fragment store's working px
    (its ``SlideGeometry``) to meet the stored pixels.

    ``classes`` are the classes the predictions may carry (background included where it was exported).
    Returns the number of nuclei per class name on the drawn fragment, which the legend shows too.
    """
    from matplotlib import patheffects
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch, Rectangle

    # a slide where nothing was predicted still gets its tissue drawn
    nuclei = read_qupath_geojson(predictions_path, classes, allow_empty=True)

    with FragmentStore(fragments_path) as store:
        nuclei = store.geometry.frame_to_working(nuclei)
        fragment = max(store.fragments, key=lambda f: f.width * f.height)
        coarse_level = len(DOWNSAMPLES) - 1
        thumbnail, thumbnail_scale = _strided_thumbnail(store, fragment, coarse_level)
        centroids, class_index, outlines = _nuclei_in(nuclei, fragment)
        x0, y0 = _densest_window(centroids, fragment, window)
        detail = store.level(fragment, 0)[y0 : y0 + window, x0 : x0 + window]

    colours = np.array([spec.color for spec in classes], dtype=float) / 255
    counts = {spec.name: int((class_index == i).sum()) for i, spec in enumerate(classes)}

    figure = png_figure(png_path, dpi=110, nrows=1, ncols=2, figsize=(13, 6.5), layout="constrained")
    with figure as (fig, (whole_ax, detail_ax)):
        whole_ax.imshow(thumbnail)
        if len(centroids):
            whole_ax.scatter(
                centroids[:, 0] * thumbnail_scale,
                centroids[:, 1] * thumbnail_scale,
                s=9,
                c=colours[class_index],
                edgecolors="white",
                linewidths=0.4,
            )
        whole_ax.add_patch(
            Rectangle(
                (x0 * thumbnail_scale, y0 * thumbnail_scale),
                detail.shape[1] * thumbnail_scale,
                detail.shape[0] * thumbnail_scale,
                fill=False,
                edgecolor="black",
                linewidth=1.2,
            )
        )
        whole_ax.set_title(f"{fragment.name}: {len(centroids)} nuclei (box: right panel)")

        detail_ax.imshow(detail, extent=(x0, x0 + detail.shape[1], y0 + detail.shape[0], y0))
        x, y = centroids[:, 0], centroids[:, 1]
        in_window = np.flatnonzero((x >= x0) & (x < x0 + detail.shape[1]) & (y >= y0) & (y < y0 + detail.shape[0]))
        detail_ax.add_collection(
            PolyCollection(
                [outlines[i] for i in in_window],
                facecolors="none",
                edgecolors=colours[class_index[in_window]] if len(in_window) else "none",
                linewidths=1.4,
                # a white halo: some QuPath colours (Immune cells' purple) vanish against haematoxylin
                path_effects=[patheffects.withStroke(linewidth=3.0, foreground="white")],
            )
        )
        detail_ax.set_xlim(x0, x0 + detail.shape[1])
        detail_ax.set_ylim(y0 + detail.shape[0], y0)
        detail_ax.set_title(f"full resolution, {len(in_window)} nuclei")
        for ax in (whole_ax, detail_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        fig.legend(
            handles=[
                Patch(color=colours[i], label=f"{spec.name} ({counts[spec.name]})") for i, spec in enumerate(classes)
            ],
            loc="outside lower center",
            ncol=len(classes),
            frameon=False,
        )
    return counts


def _strided_thumbnail(store: FragmentStore, fragment: Fragment, level: int) -> tuple[npt.NDArray[np.uint8], float]:
    """The fragment at ``level``, read with the stride that fits THUMBNAIL_EDGE; and level-0-px -> thumbnail-px."""
    dataset = store.level(fragment, level)
    stride = max(1, -(-max(dataset.shape[:2]) // THUMBNAIL_EDGE))
    return dataset[::stride, ::stride], 1 / (DOWNSAMPLES[level] * stride)


def _nuclei_in(
    nuclei: gpd.GeoDataFrame, fragment: Fragment
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], list[npt.NDArray[np.float64]]]:
    """Centroids (fragment px), class indices and exterior outlines (fragment px) of the nuclei inside ``fragment``."""
    if nuclei.empty:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64), []
    centroids = nuclei.geometry.centroid
    x = centroids.x.to_numpy() - fragment.x
    y = centroids.y.to_numpy() - fragment.y
    inside = (x >= 0) & (y >= 0) & (x < fragment.width) & (y < fragment.height)
    outlines = [
        np.asarray(_largest_polygon(geometry).exterior.coords) - (fragment.x, fragment.y)
        for geometry in nuclei.geometry[inside]
    ]
    return np.column_stack([x[inside], y[inside]]), nuclei["class_index"].to_numpy()[inside], outlines


def _largest_polygon(geometry):
    """The polygon itself, or the largest part of a MultiPolygon."""
    return max(geometry.geoms, key=lambda part: part.area) if hasattr(geometry, "geoms") else geometry


def _densest_window(centroids: npt.NDArray[np.float64], fragment: Fragment, window: int) -> tuple[int, int]:
    """Top-left corner (fragment px) of the ``window`` square holding the most nuclei, inside the fragment.

    Nuclei are counted on a grid of quarter-window cells and summed over every window-sized block of cells,
    so the window can sit anywhere on that grid rather than on a tiling of whole windows.
    """
    from scipy.ndimage import uniform_filter

    max_x = max(0, fragment.width - window)
    max_y = max(0, fragment.height - window)
    if not len(centroids):
        return max_x // 2, max_y // 2
    cell = max(1, window // 4)
    bins_x = -(-fragment.width // cell)
    bins_y = -(-fragment.height // cell)
    histogram, _, _ = np.histogram2d(
        centroids[:, 1], centroids[:, 0], bins=(bins_y, bins_x), range=((0, bins_y * cell), (0, bins_x * cell))
    )
    density = uniform_filter(histogram, size=window // cell, mode="constant")
    row, col = np.unravel_index(int(density.argmax()), density.shape)
    centre_x, centre_y = (col + 0.5) * cell, (row + 0.5) * cell
    return int(np.clip(centre_x - window / 2, 0, max_x)), int(np.clip(centre_y - window / 2, 0, max_y))
