"""Classified nuclei back to QuPath: one GeoJSON detection per nucleus, with its class and probabilities.

``results/predict/{slide}.geojson`` is a QuPath-importable FeatureCollection (File > Import objects,
or drag the file onto the viewer). Each feature is::

    {"type": "Feature",
     "geometry": {"type": "Polygon", ...},          # the nucleus outline, level-0 slide px
     "properties": {"objectType": "detection",
                    "classification": {"name": <qupath_name>, "color": [r, g, b]},
                    "measurements": {"Nucleus: Area µm^2": ..., "Area px": ..., "Class probability": ...,
                                     "P(<qupath_name>)": ..., ..., "P(Background)": ...}}}

The nuclei store is in the fragment store's working px; polygons and ``Area px`` are mapped to the
slide's own level-0 px by its ``SlideGeometry`` (the one mapping of ``cellkd.store.fragments``), so the
file overlays the slide in QuPath whatever the working resolution.
``Area px`` is the nucleus area in level-0 pixels (the nuclei store's ``area``: every pixel of the
instance, so it can exceed the polygon's area where the outline dropped a diagonally attached part);
``Nucleus: Area µm^2`` (QuPath's name for it) is that area in µm², left out when the mpp is not known.
``objectType`` is ``detection`` (nucleus objects), or ``cell``, where
QuPath expects cell objects: then the cell boundary and its ``nucleusGeometry`` are the nucleus outline.
``Class probability`` is the probability of the predicted class; ``P(...)`` one per class, QuPath
names, background last.

An expert can correct the classes in QuPath, export the detections again as GeoJSON and use that
file as the slide's EA annotation: ``read_qupath_geojson(path, classes)`` reads it back with the same
polygons and class indices. Nuclei predicted as background are left out unless ``include_background``;
those then carry the classification ``"Background"`` (``BACKGROUND_CLASS``, grey), which QuPath does
not have by default (it adds the class on import) and which ``read_qupath_geojson`` rejects as an
unknown class unless ``BACKGROUND_CLASS`` is appended to the classes: reclassify or delete them before
using the file as an annotation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cellkd.annotations.qupath import class_lookup, open_qupath_geojson
from cellkd.bundle import check_resolution, is_bundle_weights, read_bundle
from cellkd.classes import ClassSpec
from cellkd.errors import ConfigError
from cellkd.store.fragments import SlideGeometry
from cellkd.store.nuclei import CROP_CHUNK, NucleiStore
from cellkd.types import PathLike

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)


BACKGROUND_CLASS = ClassSpec("background", "Background", (128, 128, 128))
"""QuPath classification of nuclei predicted as background (exported only with ``include_background``)."""
AREA_MEASUREMENT = "Area px"
"""Measurement name of the nucleus area in level-0 pixels."""
AREA_UM2_MEASUREMENT = "Nucleus: Area µm^2"
"""Measurement name of the nucleus area in µm², as QuPath's cell detection names it."""
PROBABILITY_MEASUREMENT = "Class probability"
"""Measurement name of the probability of the predicted class."""
EXPORT_CHUNK_ROWS = 16 * CROP_CHUNK
"""Nuclei rows whose outlines are read, mapped and written at a time (16 HDF5 chunks of the outline dataset)."""


def probability_measurement(spec: ClassSpec) -> str:
    """Measurement name of the probability of class ``spec``: ``"P(<qupath_name>)"``."""
    return f"P({spec.qupath_name})"


@contextlib.contextmanager
def _opened(nuclei_store: PathLike | NucleiStore) -> Iterator[NucleiStore]:
    """``nuclei_store`` itself when already open (left open), else the store at that path (closed after)."""
    if isinstance(nuclei_store, NucleiStore):
        yield nuclei_store
    else:
        with NucleiStore(nuclei_store) as store:
            yield store


def export_predictions(
    nuclei_store: PathLike | NucleiStore,
    probabilities: npt.ArrayLike,
    classes: Sequence[ClassSpec],
    out_path: PathLike,
    *,
    include_background: bool = False,
    mpp: float | None = None,
    object_type: str = "detection",
    geometry: SlideGeometry | None = None,
) -> int:
    """Write the nuclei of ``nuclei_store`` with their predicted classes as QuPath GeoJSON detections (atomic).

    ``probabilities``: float (N, K), row i for nucleus row i of the store, K = len(classes) + 1
    (background last), e.g. a classifier's softmax. The predicted class is the argmax (ties: the lower
    index). Polygons are the store's outlines mapped to level-0 slide px by ``geometry`` (the fragment
    store's; None: the store is in slide px); the file layout and measurements are in the module
    docstring. Nuclei predicted as background are written (as ``"Background"``) only with
    ``include_background``. ``mpp``: microns per nuclei-store pixel for the µm² area (default: the
    geometry's working mpp; None or NaN = not known: no µm² area); ``object_type``: QuPath ``detection``
    or ``cell``.
    The outlines are read, mapped and written ``EXPORT_CHUNK_ROWS`` rows at a time, so memory holds the
    per-nucleus numbers but not every outline or the file's text.
    Returns the number of features written (0 gives an empty
    FeatureCollection, which ``read_qupath_geojson`` rejects with "no features").

    Raises ``ValueError`` when ``probabilities`` is not a finite (N, K) array, ``ConfigError`` when
    ``classes`` are not the classes the store was extracted with, ``StoreError`` for a bad store.
    """
    specs = tuple(classes)
    k = len(specs) + 1
    written = (*specs, BACKGROUND_CLASS) if include_background else specs
    try:
        class_lookup(written)  # a class already named "Background" would make the file ambiguous
    except ValueError as err:
        raise ConfigError(f"cannot export predictions to {out_path}: {err}") from err
    with _opened(nuclei_store) as store:
        n = len(store)
        expected = [spec.name for spec in specs] + ["background"]
        if store.classes != expected:
            msg = (
                f"{store.path}: the nuclei store has classes {store.classes}, but the classes given are {expected}; "
                "pass the classes of workflow_config.yaml that the store was extracted with, or rerun extract_nuclei"
            )
            raise ConfigError(msg)
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.shape != (n, k):
            msg = (
                f"probabilities must have shape (N, K) = ({n}, {k}): one row per nucleus of {store.path} and one "
                f"column per class ({len(specs)} classes + background, last); got shape {probs.shape}"
            )
            raise ValueError(msg)
        if not np.isfinite(probs).all():
            bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
            raise ValueError(f"probabilities has non-finite values in rows {bad[:10].tolist()}; expected a softmax")
        predicted = probs.argmax(axis=1)
        keep = np.ones(n, dtype=bool) if include_background else predicted < len(specs)
        area = store.areas()
        if geometry is not None:
            mpp = geometry.working_mpp if mpp is None else mpp
        with open_qupath_geojson(out_path, written, object_type) as writer:
            # Chunks of rows: the outlines (and their text) of one chunk at a time, not of the whole slide.
            for start in range(0, n, EXPORT_CHUNK_ROWS):
                stop = min(start + EXPORT_CHUNK_ROWS, n)
                rows = start + np.flatnonzero(keep[start:stop])
                if not rows.size:
                    continue
                outlines = np.asarray(store.geometries(start, stop), dtype=object)[rows - start]
                if geometry is not None:
                    outlines = geometry.geometries_to_slide(outlines)
                measurements = _measurements(area[rows], probs[rows], predicted[rows], specs, mpp, geometry)
                writer.write(outlines, predicted[rows], measurements)
            exported = writer.count
    counts = np.bincount(predicted, minlength=k)
    summary = ", ".join(f"{spec.name} {c}" for spec, c in zip((*specs, BACKGROUND_CLASS), counts, strict=True))
    logger.info("%s: exported %d of %d nuclei (%s) -> %s", store.slide, exported, n, summary, out_path)
    return exported


def _measurements(
    area: npt.NDArray[np.integer],
    probs: npt.NDArray[np.float64],
    predicted: npt.NDArray[np.intp],
    specs: tuple[ClassSpec, ...],
    mpp: float | None,
    geometry: SlideGeometry | None,
) -> dict[str, npt.ArrayLike]:
    """The measurements of some nuclei (module docstring) from their working-px areas and (n, K) probabilities."""
    measurements: dict[str, npt.ArrayLike] = {}
    if mpp is not None and np.isfinite(mpp) and mpp > 0:
        measurements[AREA_UM2_MEASUREMENT] = area * float(mpp) ** 2
    measurements |= {
        AREA_MEASUREMENT: area if geometry is None or not geometry.resampled else geometry.area_to_slide(area),
        PROBABILITY_MEASUREMENT: probs[np.arange(len(predicted)), predicted],
    }
    for j, spec in enumerate((*specs, BACKGROUND_CLASS)):
        measurements[probability_measurement(spec)] = probs[:, j]
    return measurements


__all__ = [
    "AREA_MEASUREMENT",
    "BACKGROUND_CLASS",
    "PROBABILITY_MEASUREMENT",
    "classify_nuclei",
    "export_predictions",
    "probability_measurement",
]


def classify_nuclei(
    model_path: PathLike,
    nuclei_store: PathLike,
    classes: Sequence[ClassSpec],
    out_path: PathLike,
    *,
    include_background: bool = False,
    fragment_store: PathLike | None = None,
    object_type: str = "detection",
) -> int:
    """Classify every nucleus of ``nuclei_store`` with a trained classifier and export QuPath GeoJSON.

    ``model_path``: a classifier ``model.pt``, or a model bundle's classifier weights
    (``cellkd.bundle``; its classes must be ``classes``, and a slide scanned at another resolution
    than the bundle's working resolution is warned about). ``fragment_store``: the slide's fragment store,
    whose ``SlideGeometry`` maps the nuclei to the slide's level-0 px and gives the areas in µm² (None: the
    nuclei store is taken to be in slide px, areas in px only).
    Returns the number of exported detections (see ``export_predictions``).
    """
    import torch

    from cellkd.store.fragments import FragmentStore
    from cellkd.training.classifier import predict_logits

    geometry = None
    if fragment_store is not None:
        with FragmentStore(fragment_store) as fragments:
            geometry = fragments.geometry
    if is_bundle_weights(model_path):
        mpp = None if geometry is None else geometry.working_mpp
        check_resolution(read_bundle(Path(model_path).parent, classes), mpp, str(nuclei_store))
    logits = torch.from_numpy(predict_logits(model_path, [nuclei_store]))
    probabilities = torch.softmax(logits, dim=1).numpy()
    count = export_predictions(
        nuclei_store,
        probabilities,
        classes,
        out_path,
        include_background=include_background,
        object_type=object_type,
        geometry=geometry,
    )
    logger.info("%s: exported %d of %d nuclei to %s", nuclei_store, count, len(probabilities), out_path)
    return count
