"""Nucleus extraction: the orchestration that turns one slide's predicted masks into its nuclei store.

For each fragment (sorted names), tile by tile: instances (``cellkd.nuclei.instances``), their
labels per annotation set (``cellkd.nuclei.matching``), outlines and crops (``cellkd.nuclei.crops``);
the rows go to the nuclei store through ``cellkd.store.nuclei.NucleiWriter`` (layout: that module).
The train / val / test split is drawn once every fragment is done (per nucleus, per fragment or per
area block).

Tiles (bounded memory at any fragment size): the fragment's predicted mask is cut into ``tile`` x
``tile`` cores (segmentation-level px, row-major), each read with a halo of ``ceil(max_size / d) + 1``
px (``d``: the segmentation downsample), clipped to the fragment. Instances are found in the core
plus halo; a tile keeps an instance when the pixel holding its centroid lies in its core. The cores
partition the fragment, so each nucleus is kept by exactly one tile, and an instance at most
``max_size`` wide whose centroid is in the core lies whole inside the halo, so it is the same
instance (pixels, centroid, area, outline, labels) as in an untiled extraction. Instances wider than
``max_size`` (level-0 px) are dropped in every tiling (logged): they are merged blobs, not nuclei, and
no halo could keep them whole. Exactness holds when every connected clump of touching nuclei is at
most ``max_size`` across (the watershed split sees the whole clump); a larger clump may split
differently near a tile seam. Peak memory is that of one tile, about 12 bytes per pixel of
``(tile + 2 halo)^2`` plus one fragment-wide band of ``BAND_PIXELS`` for the IoU areas.

Row order: fragment by fragment (sorted names), then tile by tile (row-major), then by centroid
(y, x) within the tile. A fragment that fits one tile is ordered by centroid (y, x), as before tiling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h5py
import numpy as np
import numpy.typing as npt

from cellkd.annotations.qupath import AnnotationOptions, check_annotations_fit, read_qupath_annotations
from cellkd.errors import ConfigError, StoreError
from cellkd.nuclei.crops import cut_crops, instance_outlines
from cellkd.nuclei.instances import Instances, find_instances, instance_stats
from cellkd.nuclei.matching import AnnotationSet, FragmentMatcher, SetLabeller, Window
from cellkd.nuclei.params import NucleiParams
from cellkd.store.atomic import atomic_h5, require_complete
from cellkd.store.fragments import Fragment, FragmentStore, iter_windows
from cellkd.store.nuclei import CROP_LEVELS, FragmentNuclei, NucleiWriter
from cellkd.store.patches import assign_area_splits, assign_splits
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


@dataclass
class _Tally:
    """Counts of one fragment's extraction, for its log line."""

    nuclei: int = 0
    too_large: int = 0
    matched: dict[str, int] = field(default_factory=dict)


def _tile_nuclei(
    mask: npt.NDArray[np.uint8],
    fragment: Fragment,
    shape: tuple[int, int],
    window: Window,
    core: tuple[int, int, int, int],
    down: int,
    matchers: Sequence[FragmentMatcher],
    params: NucleiParams,
    tally: _Tally,
) -> FragmentNuclei:
    """The nuclei one tile keeps (module docstring), sorted by centroid (y, x), with their labels.

    ``mask``: the fragment's predicted mask over ``window`` (the tile's ``core`` (y, x, h, w) plus its
    halo, segmentation level, downsample ``down``); ``shape``: the fragment's (H, W) at that level.
    """
    labels = find_instances(mask, params, downsample=down)
    n = int(labels.max(initial=0))
    stats = instance_stats(labels, n)
    area = np.maximum(stats.area, 1)
    # Sums of fragment-level indices are whole numbers (exact in float64), so the centroids are the
    # same bits in every tiling, and so is the core each one falls in.
    mean_row = (stats.row_sum + window.r0 * stats.area) / area
    mean_col = (stats.col_sum + window.c0 * stats.area) / area
    top, bottom, left, right = (
        np.array([getattr(b[axis], end) for b in stats.boxes], dtype=np.int64).reshape(-1)
        for axis, end in ((0, "start"), (0, "stop"), (1, "start"), (1, "stop"))
    )
    y, x, h, w = core
    centre_row, centre_col = np.floor(mean_row + 0.5), np.floor(mean_col + 0.5)  # pixel holding the centroid
    in_core = (centre_row >= y) & (centre_row < y + h) & (centre_col >= x) & (centre_col < x + w)
    too_large = np.maximum(bottom - top, right - left) * down > params.max_size
    # Cut by the window edge (not the fragment's): only an instance wider than the halo can be, and
    # those are too large anyway; the test keeps a cut piece from ever passing for a nucleus.
    cut = (
        ((top == 0) & (window.r0 > 0))
        | ((bottom == mask.shape[0]) & (window.r1 < shape[0]))
        | ((left == 0) & (window.c0 > 0))
        | ((right == mask.shape[1]) & (window.c1 < shape[1]))
    )
    tally.too_large += int((in_core & too_large).sum())
    cx = fragment.x + down * (mean_col + 0.5)
    cy = fragment.y + down * (mean_row + 0.5)
    kept = np.flatnonzero(in_core & ~too_large & ~cut)
    order = kept[np.lexsort((cx[kept], cy[kept]))]
    # Relabel the kept instances 1..k in row order; the others become background.
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[order + 1] = np.arange(1, order.size + 1, dtype=np.int32)
    labels = lookup[labels]
    stats = Instances(
        area=stats.area[order],
        row_sum=stats.row_sum[order],
        col_sum=stats.col_sum[order],
        boxes=[stats.boxes[i] for i in order],
    )
    origin = (fragment.x + down * window.c0, fragment.y + down * window.r0)
    outlines = instance_outlines(labels, stats, origin, down)
    centroids = (cx[order], cy[order])
    matched = {m.owner.annotations.name: m.label(labels, stats, window, centroids, outlines) for m in matchers}
    boxes = np.stack(
        [left[order] + window.c0, top[order] + window.r0, right[order] + window.c0, bottom[order] + window.r0], axis=1
    )
    corner = np.array([fragment.x, fragment.y, fragment.x, fragment.y], dtype=np.int64)
    return FragmentNuclei(
        centroid_x=centroids[0],
        centroid_y=centroids[1],
        area=stats.area * down * down,
        bbox=boxes.reshape(-1, 4) * down + corner,
        labels=matched,
        outline=outlines,
    )


def _fragment_tiles(
    predicted: h5py.Dataset,
    fragment: Fragment,
    down: int,
    labellers: Sequence[SetLabeller],
    params: NucleiParams,
) -> Iterator[FragmentNuclei]:
    """The nuclei of one fragment, tile by tile (row-major tiles; module docstring), with their labels."""
    shape = (int(predicted.shape[0]), int(predicted.shape[1]))
    height, width = shape
    halo = math.ceil(params.max_size / down) + 1
    matchers = [labeller.for_fragment(fragment, shape, down) for labeller in labellers]
    tally = _Tally(matched={labeller.annotations.name: 0 for labeller in labellers})
    unmatched = {labeller.annotations.name: labeller.unmatched for labeller in labellers}
    for y, x, h, w in iter_windows(height, width, params.tile):
        window = Window(max(0, y - halo), min(height, y + h + halo), max(0, x - halo), min(width, x + w + halo))
        mask = predicted[window.r0 : window.r1, window.c0 : window.c1]
        nuclei = _tile_nuclei(mask, fragment, shape, window, (y, x, h, w), down, matchers, params, tally)
        tally.nuclei += nuclei.area.size
        for name, values in nuclei.labels.items():
            tally.matched[name] += int((values != unmatched[name]).sum())
        yield nuclei
    matched = "".join(f", {s} matched {c / max(tally.nuclei, 1):.0%}" for s, c in tally.matched.items())
    logger.info("%s: %d nuclei%s", fragment.name, tally.nuclei, matched)
    if tally.too_large:
        logger.warning(
            "%s: dropped %d instances wider than nuclei max_size=%d px (merged blobs, not nuclei); raise "
            "max_size under nuclei: if they are nuclei",
            fragment.name, tally.too_large, params.max_size,
        )  # fmt: skip


def _fragment_crops(
    store: FragmentStore, fragment: Fragment, nuclei: FragmentNuclei, sizes: Sequence[int]
) -> Iterator[npt.NDArray[np.uint8]]:
    """The crops of ``nuclei`` at each of ``CROP_LEVELS``, cut one level at a time (edge ``sizes[k]``)."""
    for k, size in zip(CROP_LEVELS, sizes, strict=True):
        d = DOWNSAMPLES[k]
        row = np.floor((nuclei.centroid_y - fragment.y) / d).astype(np.int64)
        col = np.floor((nuclei.centroid_x - fragment.x) / d).astype(np.int64)
        yield cut_crops(store.level(fragment, k), row, col, size)


def _read_set(
    set_name: str,
    path: PathLike,
    classes: Sequence[ClassSpec],
    store: FragmentStore,
    options: AnnotationOptions | None,
    mpp: float | None,
) -> AnnotationSet:
    """Read one annotation set (polygons and point labels) once per slide, check that it fits the slide and
    scale it from the slide's level-0 px to the store's working px."""
    read = read_qupath_annotations(path, classes, options=options, mpp=mpp)
    if store.slide_size is not None:
        for frame in (read.nuclei, read.points):
            check_annotations_fit(frame, *store.slide_size, path)
    to_working = store.geometry.frame_to_working
    return AnnotationSet(set_name, str(path), to_working(read.nuclei), to_working(read.points))


def extract_nuclei(
    predicted_store: PathLike,
    fragment_store: PathLike,
    annotations: Mapping[str, PathLike],
    classes: Sequence[ClassSpec],
    out_path: PathLike,
    params: NucleiParams | None = None,
    *,
    options: AnnotationOptions | None = None,
    mpp: float | None = None,
) -> int:
    """Write the nuclei store ``out_path`` (layout: ``cellkd.store.nuclei``) for one slide; return N, the nucleus count.

    ``predicted_store``: predicted nucleus masks (``cellkd.inference.segment_fragment_store``) of the
    fragments of ``fragment_store`` (same slide and stain). ``annotations``: set name -> QuPath GeoJSON
    path (level-0 slide px), any subset of ssa, wsa, ea, truth; may be empty. ``options`` (the
    config's ``annotations:`` block) and ``mpp`` (the slide's level-0 µm/px) say how the GeoJSON is
    read (``read_qupath_annotations``). Raises ``StoreError`` when the two stores do not describe the
    same fragments.
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
            # Once per slide; fragments and tiles query their spatial indexes.
            sets = [_read_set(name, path, classes, store, options, mpp) for name, path in annotations.items()]
            labellers = [SetLabeller(annotation_set, n_classes, params) for annotation_set in sets]
            writer = NucleiWriter(h5, params.crop_size, params.multiscale_size, [a.name for a in sets])
            centroids: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
            for fragment in progress(store.fragments, desc=f"nuclei {store.slide}", total=len(store.fragments)):
                dataset = predicted[f"fragments/{fragment.name}/level{level}"]
                for nuclei in _fragment_tiles(dataset, fragment, down, labellers, params):
                    writer.append(fragment.name, nuclei, _fragment_crops(store, fragment, nuclei, writer.crop_sizes))
                    centroids.append((nuclei.centroid_x, nuclei.centroid_y))
            for labeller in labellers:
                labeller.report(store.slide)

            names = writer.fragments
            split = _split(names, centroids, store, params)
            writer.finish(
                split,
                {
                    "slide": store.slide,
                    "stain": store.stain,
                    "classes": [spec.name for spec in classes] + ["background"],
                    "label_sets": [a.name for a in sets],
                    "crop_size": params.crop_size,
                    "multiscale_size": params.multiscale_size,
                    "match": params.match,
                    "min_iou": params.min_iou,
                    "min_area": params.min_area,
                    "max_size": params.max_size,
                    "tile": params.tile,
                    "split_touching": params.split_touching,
                    "split_depth": params.split_depth,
                    "split_waist": params.split_waist,
                    "split_by": params.split_by,
                    "split_ratios": np.asarray(params.split),
                    "split_block_size": params.area_block,
                    "seed": params.seed,
                    "split_names": list(SPLIT_NAMES),
                    "partial_sets": [s for s in params.partial_sets if s in annotations],
                    "segmentation_level": level,
                    "predicted_store": str(predicted_store),
                    "fragment_store": str(fragment_store),
                    "annotation_files": [str(p) for p in annotations.values()],
                },
            )
    counts = np.bincount(split, minlength=3)
    summary = ", ".join(f"{name} {c}" for name, c in zip(SPLIT_NAMES, counts, strict=True))
    logger.info("%s: %d nuclei (%s, split by %s) -> %s", store.slide, len(names), summary, params.split_by, out_path)
    return len(names)


def _split(
    fragments: list[str],
    centroids: Sequence[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
    store: FragmentStore,
    params: NucleiParams,
) -> npt.NDArray[np.int8]:
    """int8 (N,) split codes: per nucleus, per fragment (only fragments holding nuclei are drawn) or per area block."""
    if params.split_by == "nucleus":
        return assign_splits(len(fragments), params.split, params.seed, store.slide)
    if not fragments:
        return np.zeros(0, dtype=np.int8)
    if params.split_by == "area":
        x = np.concatenate([c[0] for c in centroids])
        y = np.concatenate([c[1] for c in centroids])
        return _area_split(fragments, x, y, store, params)
    names, index = np.unique(np.asarray(fragments, dtype=str), return_inverse=True)
    codes = assign_splits(len(names), params.split, params.seed, store.slide)
    return codes[index.ravel()]


def _area_split(
    fragments: list[str],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    store: FragmentStore,
    params: NucleiParams,
) -> npt.NDArray[np.int8]:
    """Split codes of nuclei at level-0 centroids (x, y): the code of the area block holding each centroid.

    The blocks are those of ``cellkd.store.patches`` (``area_block`` px squares from each fragment's
    origin), listed in the order the slide's patch store first meets them (fragment by fragment, block
    rows top-down, left to right) and drawn with the same seed and source (the slide), so with equal
    ``split`` ratios and block size a nucleus and the patches of its block share one split.
    """
    block = params.area_block
    first_block: dict[str, int] = {}
    blocks_across: dict[str, int] = {}
    keys: list[tuple[int, str, int, int]] = []
    for fragment in store.fragments:
        first_block[fragment.name] = len(keys)
        blocks_across[fragment.name] = math.ceil(fragment.width / block)
        keys.extend(
            (0, fragment.name, bx, by)
            for by in range(math.ceil(fragment.height / block))
            for bx in range(blocks_across[fragment.name])
        )
    codes = assign_area_splits(keys, params.split, params.seed, store.slide)
    boxes = {f.name: f for f in store.fragments}
    index = np.empty(len(fragments), dtype=np.int64)
    for name in np.unique(np.asarray(fragments, dtype=str)):
        rows = np.flatnonzero(np.asarray(fragments, dtype=str) == name)
        fragment = boxes[str(name)]
        bx = np.floor((x[rows] - fragment.x) / block).astype(np.int64)
        by = np.floor((y[rows] - fragment.y) / block).astype(np.int64)
        index[rows] = first_block[str(name)] + by * blocks_across[str(name)] + bx
    return codes[index]
