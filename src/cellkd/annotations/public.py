"""Public nucleus segmentation datasets (MoNuSeg, Lizard) as patch stores for Phase I training.

Each image of a dataset becomes one slide with a single fragment ``f000`` (box = the whole image,
level-0 px), written to fragment and mask stores in ``results/patches/{stain}/{source}.stores/`` that
``cut_patches`` indexes in the usual patch store ``results/patches/{stain}/{source}.h5`` (layout:
``cellkd.store``; the patch store reads its pixels from them). The masks
have one class channel, ``"nucleus"``, under the annotation set the caller names (the set the
segmentation trainer reads as its target).

Dataset layouts (image and annotation are paired by file stem, searched anywhere below the folder):

MoNuSeg
    ``NAME.tif`` (or ``.tiff`` / ``.png``) H&E tiles and ``NAME.xml`` Aperio ImageScope annotations,
    e.g. ``Tissue Images/NAME.tif`` + ``Annotations/NAME.xml``. Vertex X/Y are level-0 pixel
    coordinates; masks follow the pixel-centre rule of ``cellkd.annotations.rasterize`` at every level.
    The resolution is the XML's ``MicronsPerPixel`` (about 0.25, 40x): the tiles' TIFF resolution tags
    are placeholders (72 dpi or none).
Lizard
    ``Lizard_Images*/NAME.png`` and ``Lizard_Labels/Labels/NAME.mat`` (MATLAB v5, ``inst_map``
    (H, W) instance ids, 0 = background). PNGs in ``Overlay`` folders (Lizard's label previews) are
    skipped. A level-k mask pixel is nucleus when at least half of its level-0 block is. The images
    carry no resolution; Lizard was released at 20x, ``LIZARD_MPP`` = 0.5 µm/px.

Hidden files and folders (``.name``, ``__MACOSX``: leftovers of zip archives) are skipped for both.

At a working resolution (``working_mpp``, the config's ``mpp``) every image is resampled to it like a slide
(``cellkd.slides.working``): MoNuSeg's polygons are scaled with it before they are rasterized, Lizard's
instance map is sampled at the working pixels' centres (nearest), and the fragment store records the
``SlideGeometry``. A MoNuSeg tile at 0.25 µm/px imported at 0.5 is half as wide and high.
"""

from __future__ import annotations

import logging
import math
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import scipy.io
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon

from cellkd.annotations.rasterize import rasterize_fragment
from cellkd.errors import AnnotationError, ConfigError, StoreError
from cellkd.slides.downsample import block_mean
from cellkd.slides.reader import open_slide
from cellkd.slides.working import WorkingSlide
from cellkd.store.atomic import atomic_h5
from cellkd.store.compression import COMPRESSION
from cellkd.store.fragments import CHUNK, Fragment, FragmentStoreWriter, SlideGeometry, fragment_name
from cellkd.store.patches import PatchParams, cut_patches
from cellkd.types import DOWNSAMPLES, ClassMask, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)

PublicKind = Literal["monuseg", "lizard"]
"""Public datasets that ``import_public_dataset`` reads."""

PUBLIC_KINDS: tuple[str, ...] = get_args(PublicKind)

NUCLEUS_CLASS = "nucleus"
"""The single mask class of a public dataset's patch store."""

LIZARD_MPP = 0.5
"""µm/px of every Lizard image (20x, as the dataset was released); its PNGs carry no resolution."""

MAX_OUTSIDE_FRACTION = 0.01
"""Share of MoNuSeg nuclei (by centroid) allowed outside their image before the pair is rejected."""


@dataclass(frozen=True)
class _Layout:
    image_suffixes: tuple[str, ...]  # by preference, when one stem has several images
    annotation_suffix: str
    skip_dirs: frozenset[str]  # lower-case folder names whose files are never images
    expected: str  # the layout, for error messages


_LAYOUTS: dict[str, _Layout] = {
    "monuseg": _Layout(
        (".tif", ".tiff", ".png"),
        ".xml",
        frozenset(),
        "NAME.tif (or .png) H&E tiles and NAME.xml Aperio ImageScope annotations anywhere below it, "
        "e.g. 'Tissue Images/NAME.tif' + 'Annotations/NAME.xml'",
    ),
    "lizard": _Layout(
        (".png",),
        ".mat",
        frozenset({"overlay"}),
        "'Lizard_Images*/NAME.png' images and 'Lizard_Labels/Labels/NAME.mat' (MATLAB v5 with inst_map) "
        "anywhere below it",
    ),
}


def _layout(kind: str) -> _Layout:
    if kind not in _LAYOUTS:
        raise ConfigError(f"unknown public dataset kind {kind!r}; expected one of {list(PUBLIC_KINDS)}")
    return _LAYOUTS[kind]


# --------------------------------------------------------------------------- MoNuSeg


def _polygon_parts(geom: shapely.Geometry) -> list[Polygon]:
    """The polygons of positive area in ``geom`` (make_valid may return lines and points beside them)."""
    if isinstance(geom, Polygon):
        return [geom] if geom.area > 0 else []
    if isinstance(geom, (MultiPolygon, GeometryCollection)):
        return [part for g in geom.geoms for part in _polygon_parts(g)]
    return []


def read_monuseg_xml(path: PathLike) -> list[Polygon]:
    """Nucleus polygons (level-0 image px, x right, y down) of a MoNuSeg Aperio ImageScope XML file.

    Reads every ``Annotation/Regions/Region/Vertices/Vertex`` (X, Y floats). Invalid polygons are
    repaired with ``make_valid`` (a self-intersecting one may become several polygons); regions
    with fewer than 3 distinct vertices or no area are dropped with a warning.
    """
    return read_monuseg_annotation(path)[0]


def read_monuseg_annotation(path: PathLike) -> tuple[list[Polygon], float | None]:
    """Nucleus polygons (as ``read_monuseg_xml``) and the root's ``MicronsPerPixel`` (None when absent).

    A ``MicronsPerPixel`` that is not a positive number raises ``AnnotationError``.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: malformed XML ({err}); expected an Aperio ImageScope annotation file") from err
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read annotation file ({err})") from err
    if root.tag != "Annotations":
        msg = f"{path}: root element is <{root.tag}>, not <Annotations>; expected an Aperio ImageScope XML (MoNuSeg)"
        raise AnnotationError(msg)
    return _monuseg_polygons(root, path), _monuseg_mpp(root, path)


def _monuseg_mpp(root: ET.Element, path: PathLike) -> float | None:
    text = root.get("MicronsPerPixel")
    if text is None or not text.strip():
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not (math.isfinite(mpp) and mpp > 0):
        msg = (
            f'{path}: MicronsPerPixel="{text}" is not a positive number; fix it (e.g. "0.252") or delete the attribute'
        )
        raise AnnotationError(msg)
    return mpp


def _monuseg_polygons(root: ET.Element, path: PathLike) -> list[Polygon]:
    polygons: list[Polygon] = []
    for index, region in enumerate(root.iter("Region")):
        where = f"region {index} (Id={region.get('Id', '?')})"
        try:
            coords = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iterfind("Vertices/Vertex")]
        except (KeyError, ValueError) as err:
            msg = f'{path}: {where} has a Vertex without numeric X and Y ({err}); expected <Vertex X=".." Y=".."/>'
            raise AnnotationError(msg) from err
        if not all(math.isfinite(c) for xy in coords for c in xy):
            raise AnnotationError(f"{path}: {where} has a non-finite vertex coordinate; fix or delete the region")
        if len(set(coords)) < 3:
            logger.warning("%s: %s has %d distinct vertices (< 3) and is skipped", path, where, len(set(coords)))
            continue
        polygon = Polygon(coords)
        parts = _polygon_parts(polygon if polygon.is_valid else shapely.make_valid(polygon))
        if not parts:
            logger.warning("%s: %s has no area (collinear vertices) and is skipped", path, where)
            continue
        polygons.extend(parts)
    if not polygons:
        logger.warning("%s: holds no nucleus regions; its image gets an empty mask", path)
    return polygons


def polygon_masks(
    polygons: Sequence[Polygon], width: int, height: int, levels: Sequence[int] = (0, 1, 2)
) -> list[ClassMask]:
    """uint8 (ceil(H/d), ceil(W/d), 1) 0/1 nucleus masks of an image, one per level (d = its downsample).

    ``polygons`` in level-0 image px; rasterized with ``rasterize_fragment`` (pixel-centre rule),
    so polygons crossing the image edge are clipped.
    """
    frame = gpd.GeoDataFrame({"class_index": np.zeros(len(polygons), dtype=np.int64)}, geometry=list(polygons))
    fragment = Fragment(fragment_name(0), 0, 0, width, height)
    return [rasterize_fragment(frame, fragment, level, 1) for level in levels]


def _check_polygons_fit(polygons: Sequence[Polygon], width: int, height: int, xml: Path, image: Path) -> None:
    """Reject a pair whose nuclei mostly lie outside the image: a wrong pairing or a rescaled image."""
    if not polygons:
        return
    centroids = shapely.centroid(np.asarray(polygons, dtype=object))
    x, y = shapely.get_x(centroids), shapely.get_y(centroids)
    outside = ~((x >= 0) & (x <= width) & (y >= 0) & (y <= height))
    if outside.mean() > MAX_OUTSIDE_FRACTION:
        msg = (
            f"{xml}: {int(outside.sum())} of {len(polygons)} nuclei lie outside its image {image} "
            f"({width} x {height} px; nuclei span x {x.min():.0f}..{x.max():.0f}, y {y.min():.0f}..{y.max():.0f}); "
            "the annotation belongs to another image or the image was rescaled"
        )
        raise AnnotationError(msg)


# --------------------------------------------------------------------------- Lizard


def read_lizard_mat(path: PathLike) -> npt.NDArray[np.bool_]:
    """bool (H, W) nucleus mask (``inst_map > 0``) of a Lizard label file (MATLAB v5 ``.mat``).

    Other keys (``class``, ``id``, ``bbox``, ``centroid``) are ignored.
    """
    try:
        data = scipy.io.loadmat(path, variable_names=["inst_map"])
    except NotImplementedError as err:  # scipy reads v4-v7.2; v7.3 is HDF5
        msg = f"{path}: MATLAB v7.3 files are not supported ({err}); re-save it in MATLAB with save(..., '-v7')"
        raise AnnotationError(msg) from err
    except Exception as err:  # scipy raises IndexError, MatReadError, OSError, ... for non-MAT or damaged files
        raise AnnotationError(f"{path}: cannot read MATLAB file ({err}); expected a Lizard label .mat") from err
    if "inst_map" not in data:
        keys = sorted(name for name, _, _ in scipy.io.whosmat(path))
        msg = f"{path}: has no 'inst_map' variable (found {keys}); expected a Lizard label file with inst_map (H, W)"
        raise AnnotationError(msg)
    inst_map = np.asarray(data["inst_map"])
    if inst_map.ndim != 2 or inst_map.dtype.kind not in "biuf":
        msg = f"{path}: inst_map has shape {inst_map.shape} and dtype {inst_map.dtype}; expected a numeric (H, W) array"
        raise AnnotationError(msg)
    return inst_map > 0


def instance_masks(mask: npt.NDArray[np.bool_], levels: Sequence[int] = (0, 1, 2)) -> list[ClassMask]:
    """uint8 (ceil(H/d), ceil(W/d), 1) 0/1 nucleus masks from a bool (H, W) level-0 mask, one per level.

    A level-k pixel is set when at least half of the level-0 pixels of its d x d block are (blocks
    cut by the right/bottom edge count only the pixels present).
    """
    level0 = mask.astype(np.uint8)[..., None]
    # block_mean of 0/1 rounds half up: mean >= 0.5 -> 1, i.e. "at least half the block".
    return [level0 if DOWNSAMPLES[k] == 1 else block_mean(level0, DOWNSAMPLES[k]) for k in levels]


# --------------------------------------------------------------------------- pairing


def _skipped(relative: Path, layout: _Layout) -> bool:
    folders = relative.parts[:-1]
    if any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
        return True
    return any(part.lower() in layout.skip_dirs for part in folders)


def _names(paths: Sequence[Path], limit: int = 20) -> str:
    names = ", ".join(str(p) for p in paths[:limit])
    return names + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")


def _choose(stem: str, candidates: list[Path], rank: Sequence[str], what: str) -> Path:
    """The candidate of the most preferred suffix; several of that suffix are ambiguous."""
    best = min(rank.index(p.suffix.lower()) for p in candidates)
    top = [p for p in candidates if rank.index(p.suffix.lower()) == best]
    if len(top) > 1:
        msg = f"{what} name {stem!r} is ambiguous: {_names(top)}; keep one of them (pairs are matched by file stem)"
        raise AnnotationError(msg)
    if len(candidates) > 1:
        logger.info("%s: using %s and ignoring %s", stem, top[0], [str(p) for p in candidates if p != top[0]])
    return top[0]


def find_pairs(dataset_dir: PathLike, kind: PublicKind) -> list[tuple[Path, Path]]:
    """(image, annotation) file pairs of a public dataset folder, matched by stem, sorted by stem.

    Searches the whole folder tree (layouts: module docstring). Images without annotation and
    annotations without image are logged as a warning; no pair at all raises ``AnnotationError``.
    """
    layout = _layout(kind)
    root = Path(dataset_dir)
    if not root.is_dir():
        raise AnnotationError(f"{root}: {kind} dataset folder does not exist; expected a folder with {layout.expected}")
    images: dict[str, list[Path]] = {}
    annotations: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _skipped(path.relative_to(root), layout):
            continue
        suffix = path.suffix.lower()
        if suffix in layout.image_suffixes:
            images.setdefault(path.stem, []).append(path)
        elif suffix == layout.annotation_suffix:
            annotations.setdefault(path.stem, []).append(path)
    stems = sorted(images.keys() & annotations.keys())
    lonely_images = sorted(p for stem in images.keys() - annotations.keys() for p in images[stem])
    lonely_annotations = sorted(p for stem in annotations.keys() - images.keys() for p in annotations[stem])
    if lonely_images:
        logger.warning(
            "%s: %d image(s) without annotation skipped: %s", root, len(lonely_images), _names(lonely_images)
        )
    if lonely_annotations:
        logger.warning(
            "%s: %d annotation file(s) without image skipped: %s",
            root,
            len(lonely_annotations),
            _names(lonely_annotations),
        )
    if not stems:
        msg = (
            f"{root}: no {kind} image/annotation pairs found ({sum(map(len, images.values()))} image(s), "
            f"{sum(map(len, annotations.values()))} annotation file(s)); expected {layout.expected}"
        )
        raise AnnotationError(msg)
    return [
        (
            _choose(stem, images[stem], layout.image_suffixes, "image"),
            _choose(stem, annotations[stem], (layout.annotation_suffix,), "annotation"),
        )
        for stem in stems
    ]


# --------------------------------------------------------------------------- stores


_Nuclei = list[Polygon] | npt.NDArray[np.bool_]
"""An image's nuclei as its dataset gives them: MoNuSeg polygons or Lizard's nucleus mask (level-0 image px)."""


def _read_nuclei(
    kind: str, annotation: Path, image_path: Path, width: int, height: int
) -> tuple[_Nuclei, float | None]:
    """The image's nuclei (checked against its size) and the dataset's µm/px for it (None when it does not say)."""
    if kind == "monuseg":
        polygons, mpp = read_monuseg_annotation(annotation)
        _check_polygons_fit(polygons, width, height, annotation, image_path)
        return polygons, mpp
    mask = read_lizard_mat(annotation)
    if mask.shape != (height, width):
        msg = (
            f"{annotation}: inst_map is {mask.shape[1]} x {mask.shape[0]} px (W x H) but its image {image_path} is "
            f"{width} x {height} px; the label file belongs to another image"
        )
        raise AnnotationError(msg)
    return mask, LIZARD_MPP


def _nucleus_masks(nuclei: _Nuclei, geometry: SlideGeometry, width: int, height: int) -> list[ClassMask]:
    """The nucleus masks per level of a ``width`` x ``height`` working-px image (``geometry``: image -> working)."""
    if isinstance(nuclei, list):
        return polygon_masks(list(geometry.geometries_to_working(nuclei)), width, height)
    if geometry.resampled:
        # Each working pixel takes the label under its centre: resampling a label map must not blend labels.
        rows = np.minimum(np.floor(geometry.to_slide(np.arange(height) + 0.5)).astype(np.int64), nuclei.shape[0] - 1)
        cols = np.minimum(np.floor(geometry.to_slide(np.arange(width) + 0.5)).astype(np.int64), nuclei.shape[1] - 1)
        nuclei = nuclei[np.ix_(rows, cols)]
    return instance_masks(nuclei)


def _choose_mpp(image_mpp: float, dataset_mpp: float | None, image_path: Path, annotation: Path) -> float:
    """The dataset's µm/px when it gives one (a warning when the image's own tags disagree), else the image's."""
    if dataset_mpp is None:
        return image_mpp
    if math.isfinite(image_mpp) and not math.isclose(image_mpp, dataset_mpp, rel_tol=0.05):
        logger.warning(
            "%s: resolution tags say %.4g µm/px but %s says %.4g; using %.4g",
            image_path,
            image_mpp,
            annotation,
            dataset_mpp,
            dataset_mpp,
        )
    return dataset_mpp


def write_image_stores(
    image_path: PathLike,
    annotation_path: PathLike,
    kind: PublicKind,
    mask_set: str,
    fragment_out: PathLike,
    mask_out: PathLike,
    working_mpp: float | None = None,
) -> None:
    """Write one public image as a fragment store and its nucleus masks as a mask store (both atomic).

    The image is slide ``image_path.stem`` with one fragment ``f000`` = the whole image, levels
    0, 1, 2 (block means). Its resolution is the dataset's (MoNuSeg's XML ``MicronsPerPixel``,
    ``LIZARD_MPP``; the image's own tags when the XML has none); level 0 is the image resampled to
    ``working_mpp`` (None, or an image of unknown resolution: its own pixels). The mask store holds
    ``fragments/f000/{mask_set}/level{k}`` uint8 (H_k, W_k, 1), class ``"nucleus"`` (layouts: ``cellkd.store``).
    """
    _layout(kind)
    image_path, annotation_path = Path(image_path), Path(annotation_path)
    with open_slide(image_path) as reader:
        image_mpp = reader.mpp if reader.mpp is not None else float("nan")
        nuclei, dataset_mpp = _read_nuclei(kind, annotation_path, image_path, *reader.dimensions)
        mpp = _choose_mpp(image_mpp, dataset_mpp, image_path, annotation_path)
        if math.isfinite(mpp):
            geometry = SlideGeometry.for_slide(mpp, working_mpp)
        else:
            if working_mpp is not None:
                logger.warning(
                    "%s: no resolution known; imported at its own pixels, not %g µm/px", image_path, working_mpp
                )
            geometry = SlideGeometry.identity(mpp)
        width, height = geometry.size_to_working(reader.dimensions)
        image = WorkingSlide(reader, geometry).read_region(0, 0, width, height)
        slide_size = reader.dimensions
    masks = _nucleus_masks(nuclei, geometry, width, height)
    fragment = Fragment(fragment_name(0), 0, 0, width, height)
    slide = image_path.stem
    writer = FragmentStoreWriter(
        fragment_out, slide=slide, source=str(image_path), stain="raw", slide_size=slide_size, geometry=geometry
    )
    with writer:
        for level, down in enumerate(DOWNSAMPLES):
            # Same block means as extract_fragments, so public patches match slide patches level for level.
            writer.create_level(fragment, level)[:] = image if down == 1 else block_mean(image, down)
    with atomic_h5(mask_out) as h5:
        h5.attrs.update(
            {
                "slide": slide,
                "classes": [NUCLEUS_CLASS],
                "annotation_sets": [mask_set],
                "annotation_files": [str(annotation_path)],
                "downsamples": np.asarray(DOWNSAMPLES, dtype=np.int32),
            }
        )
        group = h5.require_group(f"fragments/{fragment.name}")
        group.attrs.update({"x": 0, "y": 0, "width": width, "height": height})
        for level, mask in enumerate(masks):
            group.create_dataset(
                f"{mask_set}/level{level}",
                data=mask,
                chunks=(min(CHUNK, mask.shape[0]), min(CHUNK, mask.shape[1]), 1),
                **COMPRESSION,
            )


def public_store_dir(out_path: PathLike) -> Path:
    """Folder of the fragment and mask stores that the patch store ``out_path`` of a public dataset reads.

    ``results/patches/{stain}/{dataset}.h5`` -> ``results/patches/{stain}/{dataset}.stores``.
    """
    return Path(out_path).with_suffix(".stores")


def import_public_dataset(
    dataset_dir: PathLike,
    kind: PublicKind,
    out_path: PathLike,
    mask_set: str,
    params: PatchParams,
    work_dir: PathLike | None = None,
    normalize: Callable[[Path, Path], object] | None = None,
    *,
    source: str | None = None,
    working_mpp: float | None = None,
) -> int:
    """Turn every image/annotation pair of a MoNuSeg or Lizard folder into stores and the patch store ``out_path``.

    Each image becomes a slide (provenance ``slide`` = image stem) with one fragment: its fragment and
    mask stores (``write_image_stores``) go to ``public_store_dir(out_path)`` as ``fragments/{stem}.h5``
    and ``masks/{stem}.h5``, which the patch store reads its pixels from; then ``cut_patches`` writes the
    patch store atomically with ``masks/{mask_set}`` of class ``"nucleus"``. ``normalize(raw, out)``,
    when given, turns each raw fragment store, written to a temporary folder under ``work_dir`` (default:
    the system temp folder, removed afterwards), into the kept one at ``out`` (e.g. Macenko via
    ``cellkd.stain.normalize_fragment_store``). ``source`` names the patch store's source and seeds its
    split (default: ``kind``). ``working_mpp``: the resolution every image is resampled to (config
    ``mpp``; None: their own). Returns N, the patch count.
    """
    _layout(kind)
    if not mask_set or "/" in mask_set:
        raise ConfigError(f"annotation set name {mask_set!r} must be non-empty and contain no '/'")
    pairs = find_pairs(dataset_dir, kind)
    stores = public_store_dir(out_path)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"cellkd-{kind}-", dir=work_dir) as tmp:
        fragment_paths: list[Path] = []
        mask_paths: list[Path] = []
        for image, annotation in progress(pairs, desc=f"import {kind}", total=len(pairs)):
            fragments = stores / "fragments" / f"{image.stem}.h5"
            masks = stores / "masks" / f"{image.stem}.h5"
            if normalize is None:
                write_image_stores(image, annotation, kind, mask_set, fragments, masks, working_mpp)
            else:
                raw = Path(tmp) / "raw.h5"
                write_image_stores(image, annotation, kind, mask_set, raw, masks, working_mpp)
                normalize(raw, fragments)
                if not fragments.is_file():
                    msg = f"normalize hook {normalize!r} wrote no fragment store at {fragments} for image {image}"
                    raise StoreError(msg)
                raw.unlink()  # keeps the temporary folder at one image
            fragment_paths.append(fragments)
            mask_paths.append(masks)
        count = cut_patches(fragment_paths, mask_paths, out_path, source or kind, params)
    logger.info(
        "%s: %d %s image(s) -> %d patches in %s (stores in %s)", dataset_dir, len(pairs), kind, count, out_path, stores
    )
    return count
