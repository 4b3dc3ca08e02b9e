"""Nucleus extraction: the orchestration that turns one slide's predicted masks into its nuclei store.

For each fragment (sorted names): instances (``cellkd.nuclei.instances``), their labels per
annotation set (``cellkd.nuclei.matching``), outlines and crops (``cellkd.nuclei.crops``); the rows
go to the nuclei store through ``cellkd.store.nuclei.NucleiWriter`` (layout: that module). The
train / val / test split is drawn once every fragment is done (per nucleus or per fragment).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import geopandas as gpd
import h5py
import numpy as np
import numpy.typing as npt

from cellkd.annotations.qupath import check_annotations_fit, read_qupath_geojson
from cellkd.errors import ConfigError, StoreError
from cellkd.nuclei.crops import cut_crops, instance_outlines
from cellkd.nuclei.instances import find_instances, instance_stats
from cellkd.nuclei.matching import label_instances
from cellkd.nuclei.params import NucleiParams
from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.fragments import Fragment, FragmentStore
from cellkd.store.nuclei import CROP_LEVELS, FragmentNuclei, NucleiWriter
from cellkd.store.patches import assign_splits
from cellkd.types import DOWNSAMPLES, SPLIT_NAMES, PathLike
from cellkd.workflow import progress

if TYPE_CHECKING:
    from cellkd.classes import ClassSpec

logger = logging.getLogger(__name__)


def _check_predicted(h5: h5py.File, predicted_path: PathLike, store: FragmentStore) -> int:
    """Raise ``StoreError`` unless the predicted store covers exactly the fragments of ``store``; its level."""
    hint = f"rerun the segmentation of {store.path}"
    level = int(h5.attrs.get("level", 0))
    if level not in range(len(DOWNSAMPLES)):
        raise StoreError(f"{predicted_path}: segmentation level {level} is not one of 0, 1, 2; {hint}")
    for attr, expected in (("slide", store.slide), ("stain", store.stain)):
        found = h5.attrs.get(attr)
        if found is not None and str(found) != expected:
            msg = (
                f"{predicted_path}: {attr} {str(found)!r} differs from {attr} {expected!r} of fragment store "
                f"{store.path}; pass the predicted masks of the same slide and stain"
            )
            raise StoreError(msg)
    group = h5.get("fragments")
    names = sorted(group) if group is not None else []
    expected_names = [f.name for f in store.fragments]
    if names != expected_names:
        msg = (
            f"{predicted_path}: fragments {names} do not match fragments {expected_names} of fragment store "
            f"{store.path}; the stores are from different fragment extractions: {hint}"
        )
        raise StoreError(msg)
    for fragment in store.fragments:
        node = group[fragment.name]
        box = tuple(int(node.attrs.get(k, -1)) for k in ("x", "y", "width", "height"))
        expected_box = (fragment.x, fragment.y, fragment.width, fragment.height)
        key = f"level{level}"
        shape = tuple(node[key].shape) if key in node else None
        if box != expected_box or shape != fragment.shape_at(level):
            msg = (
                f"{predicted_path}: fragment {fragment.name} has box (x, y, w, h) {box} and {key} shape {shape}, "
                f"but fragment store {store.path} has {expected_box} and {fragment.shape_at(level)}; "
                f"the stores are from different fragment extractions: {hint}"
            )
            raise StoreError(msg)
    return level


def _open_predicted(path: PathLike, store: FragmentStore) -> tuple[h5py.File, int]:
    """Open the predicted mask store and check it against ``store``; returns (file, segmentation level)."""
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        msg = f"{path}: cannot open the predicted mask store ({err}); rerun the segmentation of {store.path}"
        raise StoreError(msg) from err
    try:
        require_complete(h5)
        return h5, _check_predicted(h5, path, store)
    except BaseException:
        h5.close()
        raise


def _fragment_nuclei(
    mask: npt.NDArray[np.uint8],
    fragment: Fragment,
    down: int,
    frames: Mapping[str, gpd.GeoDataFrame],
    n_classes: int,
    params: NucleiParams,
) -> FragmentNuclei:
    """Instances of one fragment's predicted ``mask`` (segmentation level, downsample ``down``) and their labels."""
    labels = find_instances(mask, params, downsample=down)
    n = int(labels.max(initial=0))
    stats = instance_stats(labels, n)
    # Continuous level-0 slide coordinates: mask pixel c covers [x + down*c, x + down*(c+1)).
    cx = fragment.x + down * (stats.col_sum / np.maximum(stats.area, 1) + 0.5)
    cy = fragment.y + down * (stats.row_sum / np.maximum(stats.area, 1) + 0.5)
    order = np.lexsort((cx, cy))
    matched = {
        set_name: label_instances(set_name, frame, labels, stats, (cx, cy), fragment, down, n_classes, params)[order]
        for set_name, frame in frames.items()
    }
    boxes = np.array([(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in stats.boxes], dtype=np.int64)
    origin = np.array([fragment.x, fragment.y, fragment.x, fragment.y], dtype=np.int64)
    return FragmentNuclei(
        centroid_x=cx[order],
        centroid_y=cy[order],
        area=stats.area[order] * down * down,
        bbox=boxes.reshape(-1, 4)[order] * down + origin,
        labels=matched,
        outline=instance_outlines(labels, stats, fragment, down)[order],
    )


def _fragment_crops(
    store: FragmentStore, fragment: Fragment, nuclei: FragmentNuclei, sizes: Sequence[int]
) -> Iterator[npt.NDArray[np.uint8]]:
    """The crops of ``nuclei`` at each of ``CROP_LEVELS``, cut one level at a time (edge ``sizes[k]``)."""
    for k, size in zip(CROP_LEVELS, sizes, strict=True):
        d = DOWNSAMPLES[k]
        row = np.floor((nuclei.centroid_y - fragment.y) / d).astype(np.int64)
        col = np.floor((nuclei.centroid_x - fragment.x) / d).astype(np.int64)
        yield cut_crops(store.level(fragment, k), row, col, size)


def extract_nuclei(
    predicted_store: PathLike,
    fragment_store: PathLike,
    annotations: Mapping[str, PathLike],
    classes: Sequence[ClassSpec],
    out_path: PathLike,
    params: NucleiParams | None = None,
) -> int:
    """Write the nuclei store ``out_path`` (layout: ``cellkd.store.nuclei``) for one slide; return N, the nucleus count.

    ``predicted_store``: predicted nucleus masks (``cellkd.inference.segment_fragment_store``) of the
    fragments of ``fragment_store`` (same slide and stain). ``annotations``: set name -> QuPath GeoJSON
    path (level-0 slide px), any subset of ssa, wsa, ea, truth; may be empty. Raises ``StoreError``
    when the two stores do not describe the same fragments.
    """
    params = params or NucleiParams()
    n_classes = len(classes)
    if not 1 <= n_classes < 127:
        raise ConfigError(f"{n_classes} classes given; int8 labels need 1..126 classes (see classes:)")
    for set_name in annotations:
        if not set_name or "/" in set_name:
            raise ConfigError(f"annotation set name {set_name!r} must be non-empty and contain no '/'")

    with FragmentStore(fragment_store) as store:
        predicted, level = _open_predicted(predicted_store, store)
        down = DOWNSAMPLES[level]
        with predicted, atomic_h5(out_path) as h5:
            frames: dict[str, gpd.GeoDataFrame] = {}
            for set_name, path in annotations.items():
                frame = read_qupath_geojson(path, classes)  # once per slide; fragments query its sindex
                if store.slide_size is not None:
                    check_annotations_fit(frame, *store.slide_size, path)
                frames[set_name] = frame
            writer = NucleiWriter(h5, params.crop_size, params.multiscale_size, list(frames))
            for fragment in progress(store.fragments, desc=f"nuclei {store.slide}", total=len(store.fragments)):
                mask = predicted[f"fragments/{fragment.name}/level{level}"][:]
                nuclei = _fragment_nuclei(mask, fragment, down, frames, n_classes, params)
                del mask
                writer.append(fragment.name, nuclei, _fragment_crops(store, fragment, nuclei, writer.crop_sizes))
                matched = "".join(
                    f", {s} matched {np.mean((v >= 0) & (v < n_classes)) if v.size else 0:.0%}"
                    for s, v in nuclei.labels.items()
                )
                logger.info("%s %s: %d nuclei%s", store.slide, fragment.name, nuclei.area.size, matched)

            names = writer.fragments
            split = _split(names, store, params)
            writer.finish(
                split,
                {
                    "slide": store.slide,
                    "stain": store.stain,
                    "classes": [spec.name for spec in classes] + ["background"],
                    "label_sets": list(frames),
                    "crop_size": params.crop_size,
                    "multiscale_size": params.multiscale_size,
                    "match": params.match,
                    "min_iou": params.min_iou,
                    "min_area": params.min_area,
                    "split_touching": params.split_touching,
                    "split_depth": params.split_depth,
                    "split_by": params.split_by,
                    "split_ratios": np.asarray(params.split),
                    "seed": params.seed,
                    "split_names": list(SPLIT_NAMES),
                    "partial_sets": [s for s in params.partial_sets if s in frames],
                    "segmentation_level": level,
                    "predicted_store": str(predicted_store),
                    "fragment_store": str(fragment_store),
                    "annotation_files": [str(p) for p in annotations.values()],
                },
            )
    counts = np.bincount(split, minlength=3)
    summary = ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True))
    logger.info("%s: %d nuclei (%s) -> %s", store.slide, len(names), summary, out_path)
    return len(names)


def _split(fragments: list[str], store: FragmentStore, params: NucleiParams) -> npt.NDArray[np.int8]:
    """int8 (N,) split codes, per nucleus or per fragment (only fragments holding nuclei are drawn)."""
    if params.split_by == "nucleus":
        return assign_splits(len(fragments), params.split, params.seed, store.slide)
    if not fragments:
        return np.zeros(0, dtype=np.int8)
    names, index = np.unique(np.asarray(fragments, dtype=str), return_inverse=True)
    codes = assign_splits(len(names), params.split, params.seed, store.slide)
    return codes[index.ravel()]
