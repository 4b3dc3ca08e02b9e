"""Instance-level agreement of the segmented nuclei with the truth: the table next to Table 2.

Table 2 scores pixels, which cannot see a nucleus cut in two or two nuclei fused into one. This
table compares each slide's nuclei (the outlines in its nuclei store, mapped to level-0 px) with its ``truth``
GeoJSON nucleus by nucleus (``cellkd.metrics.instances``: one-to-one matches at IoU 0.5, split and
merge rates, panoptic quality), summed over the slides of each stain, in total and per true class.
Only slides with a ``truth`` set can be scored, so only the demo (and synthetic sheets) have it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd

from cellkd.annotations.qupath import AnnotationOptions, read_qupath_geojson
from cellkd.classes import ClassSpec
from cellkd.metrics.instances import INSTANCE_METRICS, InstanceCounts, instance_counts, instance_counts_by_class
from cellkd.report.tables import write_table
from cellkd.store.fragments import SlideGeometry
from cellkd.store.nuclei import NucleiStore
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

ALL_CLASSES = "all"
"""``class`` of the row that counts every nucleus (its precision counts every predicted instance)."""


def slide_instance_counts(
    nuclei_store: PathLike,
    truth_geojson: PathLike,
    classes: Sequence[ClassSpec],
    *,
    options: AnnotationOptions | None = None,
    mpp: float | None = None,
    geometry: SlideGeometry | None = None,
) -> dict[str, InstanceCounts]:
    """Counts of one slide's nuclei against its truth: ``"all"``, then one entry per class name.

    ``options`` and ``mpp`` are passed to ``read_qupath_geojson`` (how the export is read, and the
    slide's level-0 µm/px to set large annotation regions aside). ``geometry``: the fragment store's,
    which maps the nuclei store's working px to the truth's level-0 px (None: they are the same).
    """
    with NucleiStore(nuclei_store) as store:
        predicted = store.geometries()
    if geometry is not None:
        predicted = list(geometry.geometries_to_slide(predicted))
    truth = read_qupath_geojson(truth_geojson, classes, options=options, mpp=mpp)
    outlines = truth.geometry.to_numpy()
    per_class = instance_counts_by_class(predicted, outlines, truth["class_index"].to_numpy(), len(classes))
    counts = {ALL_CLASSES: instance_counts(predicted, outlines)}
    counts.update({spec.name: c for spec, c in zip(classes, per_class, strict=True)})
    logger.info("%s vs %s: %s", nuclei_store, truth_geojson, counts[ALL_CLASSES].metrics())
    return counts


def instance_table(slide_counts: Mapping[tuple[str, str], Mapping[str, InstanceCounts]]) -> pd.DataFrame:
    """One row per stain and class (``"all"`` first) of the counts summed over slides (keys ``(stain, slide)``).

    Columns: stain, class, slides, true, predicted, then :data:`INSTANCE_METRICS`.
    """
    totals: dict[tuple[str, str], InstanceCounts] = {}
    slides: dict[str, set[str]] = {}
    for (stain, slide), counts in slide_counts.items():
        slides.setdefault(stain, set()).add(slide)
        for name, c in counts.items():
            totals[(stain, name)] = totals.get((stain, name), InstanceCounts()) + c
    rows = [
        {"stain": stain, "class": name, "slides": len(slides[stain]), "true": c.true, "predicted": c.predicted}
        | c.metrics()
        for (stain, name), c in totals.items()
    ]
    return pd.DataFrame(rows, columns=["stain", "class", "slides", "true", "predicted", *INSTANCE_METRICS])


def write_instance_table(
    slide_counts: Mapping[tuple[str, str], Mapping[str, InstanceCounts]], csv_path: PathLike, md_path: PathLike
) -> pd.DataFrame:
    """:func:`instance_table` -> ``csv_path`` and ``md_path``."""
    table = instance_table(slide_counts)
    write_table(table, csv_path, md_path, "Table 2 (instances): segmented nuclei vs the truth, nucleus by nucleus")
    return table
