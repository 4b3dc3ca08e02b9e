"""Point labels: an expert's click on a nucleus gives that nucleus the point's class.

QuPath users often mark cells with points instead of outlining them. ``read_qupath_annotations``
returns those points (``QuPathAnnotations.points``); a stage that has nucleus polygons (e.g. the
nuclei found by segmentation) labels them with ``label_nuclei_by_points``:

    annotations = read_qupath_annotations(path, classes, mpp=mpp)
    labels = label_nuclei_by_points(annotations.points, nucleus_polygons, path)
    labels.nucleus_class  # (N,) class index per nucleus, -1 where no point (or disagreeing points) fell

A point labels the nucleus that contains it (boundary included). Points in no nucleus are counted and
logged, as are nuclei holding points of two different classes, which stay unlabelled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointLabels:
    """The result of ``label_nuclei_by_points``.

    ``nucleus_class``: int64 (N nuclei,) class index, -1 for a nucleus without (agreeing) points.
    ``point_nucleus``: int64 (P points,) index of the nucleus holding each point, -1 for none.
    ``outside``: points in no nucleus; ``conflicting``: nuclei holding points of several classes.
    """

    nucleus_class: npt.NDArray[np.int64]
    point_nucleus: npt.NDArray[np.int64]
    outside: int
    conflicting: int


def label_nuclei_by_points(
    points: gpd.GeoDataFrame,
    nuclei: Sequence[shapely.Geometry] | npt.NDArray[np.object_] | gpd.GeoSeries,
    source: str | os.PathLike[str] = "point labels",
    *,
    warn: bool = True,
) -> PointLabels:
    """Give each nucleus polygon the class of the point labels inside it.

    ``points``: ``QuPathAnnotations.points`` (Point geometries and ``class_index``, level-0 px);
    ``nuclei``: polygons in the same frame. A point on several (overlapping) nuclei labels the first
    of them. ``source`` names the file in the log; ``warn=False`` leaves the counts to the caller
    (a caller that labels a slide tile by tile reports them once).
    """
    shapes = np.asarray(nuclei.values if isinstance(nuclei, gpd.GeoSeries) else nuclei, dtype=object)
    nucleus_class = np.full(len(shapes), -1, dtype=np.int64)
    point_nucleus = np.full(len(points), -1, dtype=np.int64)
    if len(points) and len(shapes):
        which_point, which_nucleus = shapely.STRtree(shapes).query(
            np.asarray(points.geometry.values), predicate="covered_by"
        )
        order = np.lexsort((which_nucleus, which_point))  # first nucleus per point
        which_point, which_nucleus = which_point[order], which_nucleus[order]
        first = np.ones(which_point.size, dtype=bool)  # not np.r_[True, ...]: no pair at all is possible
        first[1:] = which_point[1:] != which_point[:-1]
        point_nucleus[which_point[first]] = which_nucleus[first]
    inside = np.flatnonzero(point_nucleus >= 0)
    point_class = points["class_index"].to_numpy(dtype=np.int64)
    conflicting = 0
    if inside.size:
        nucleus, cls = point_nucleus[inside], point_class[inside]
        lowest = np.full(len(shapes), np.iinfo(np.int64).max)
        highest = np.full(len(shapes), -1)
        np.minimum.at(lowest, nucleus, cls)
        np.maximum.at(highest, nucleus, cls)
        agreed = (highest >= 0) & (lowest == highest)
        nucleus_class[agreed] = highest[agreed]
        conflicting = int(((highest >= 0) & ~agreed).sum())
    outside = int(len(points) - inside.size)
    if warn and outside:
        log.warning("%s: %d of %d point labels lie in no nucleus and label nothing", source, outside, len(points))
    if warn and conflicting:
        log.warning("%s: %d nuclei hold point labels of different classes and stay unlabelled", source, conflicting)
    return PointLabels(nucleus_class, point_nucleus, outside, conflicting)
