"""One synthetic slide end to end: draw the layout, render the pyramid, write the annotation sets."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from cellkd.classes import DEFAULT_CLASSES, ClassSpec, classes_from_config
from cellkd.errors import ConfigError
from cellkd.store.atomic import atomic_path
from cellkd.synthetic.annotate import Annotation, Stain, expert_annotation, uuids, weak_annotation
from cellkd.synthetic.export import write_detections
from cellkd.synthetic.layout import Nuclei, SmoothField, fragment_box, fragment_polygons, sample_nuclei
from cellkd.synthetic.render import Renderer, stain_matrix, write_pyramid
from cellkd.synthetic.spec import (
    ANNOTATION_SET_NAMES,
    DEBRIS_STYLE,
    SlideTruth,
    SyntheticSlideParams,
    params_from_config,
    style_for,
)
from cellkd.types import PathLike

logger = logging.getLogger(__name__)


def _seed_sequence(seed: int, slide_id: str) -> np.random.SeedSequence:
    # Python's hash() is salted per process; a digest keeps slide ids reproducible across runs.
    digest = int.from_bytes(hashlib.sha256(slide_id.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, digest])


@dataclass
class DrawnSlide:
    """Everything random about one slide, drawn but not yet written; ``annotations`` derives the sets.

    ``debris``: the background objects, rendered in the pixels but held by no annotation set.
    """

    slide_id: str
    seed: int
    params: SyntheticSlideParams
    classes: tuple[ClassSpec, ...]
    fragments: list[shapely.Polygon]
    nuclei: Nuclei
    debris: Nuclei
    stain: Stain
    renderer: Renderer
    ids: list[str]
    set_rngs: dict[str, np.random.Generator]

    def annotations(self, names: Sequence[str]) -> Iterator[tuple[str, Annotation]]:
        """The requested sets among ``ANNOTATION_SET_NAMES``, in that order (each set has its own stream)."""
        n = len(self.nuclei.labels)
        for name in ANNOTATION_SET_NAMES:
            if name not in names:
                continue
            if name == "truth":
                yield name, Annotation(np.arange(n), self.nuclei.labels, self.nuclei.rings, self.nuclei.centres)
            elif name == "ea":
                yield name, expert_annotation(self.set_rngs[name], self.nuclei, self.params)
            else:
                yield (
                    name,
                    weak_annotation(self.set_rngs[name], self.nuclei, self.params, name, self.classes, self.stain),
                )

    def write_slide(self, path: PathLike) -> None:
        """Render the pyramidal TIFF atomically at ``path``."""
        description = f"cellkd synthetic H&E slide {self.slide_id} (seed {self.seed})"
        with atomic_path(path) as tmp:
            write_pyramid(tmp, self.renderer, self.params, description)

    def truth(self, counts: Sequence[tuple[str, int]]) -> SlideTruth:
        """What was drawn, with ``counts`` the features written per set."""
        params = self.params
        return SlideTruth(
            slide_id=self.slide_id,
            width=params.width,
            height=params.height,
            mpp=params.mpp,
            fragments=tuple(fragment_box(f, params.width, params.height) for f in self.fragments),
            class_names=tuple(c.name for c in self.classes),
            nuclei_per_class=tuple(int(v) for v in np.bincount(self.nuclei.labels, minlength=len(self.classes))),
            annotation_counts=tuple(counts),
            stain_matrix=tuple(tuple(float(v) for v in row) for row in self.stain.matrix),  # type: ignore[arg-type]
            debris=len(self.debris),
        )


def draw_slide(
    slide_id: str, params: SyntheticSlideParams, classes: Sequence[ClassSpec] = DEFAULT_CLASSES, seed: int = 0
) -> DrawnSlide:
    """Draw fragments, nuclei, stain and the renderer of one slide; a function of its arguments only.

    Raises ``ValueError`` for a negative seed or ``classes`` that do not fit ``params``.
    """
    params.check_classes(classes, slide_id)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"slide {slide_id}: seed must be a non-negative integer, got {seed!r}")
    # One independent stream per concern: e.g. changing wsa_flip leaves the image and the SSA untouched.
    streams = [np.random.default_rng(s) for s in _seed_sequence(int(seed), slide_id).spawn(8)]
    layout_rng, nuclei_rng, stain_rng, render_rng, id_rng, ssa_rng, wsa_rng, ea_rng = streams
    styles = [style_for(spec, i, params.styles) for i, spec in enumerate(classes)]
    fragments = fragment_polygons(layout_rng, params)
    orientation = SmoothField(layout_rng, params.width, params.height, cell=80 / params.mpp)
    nuclei, debris = sample_nuclei(nuclei_rng, fragments, params, styles, orientation, DEBRIS_STYLE)
    stain = Stain(*stain_matrix(stain_rng, params.stain_jitter))
    renderer = Renderer(render_rng, params, fragments, nuclei.concatenate(debris), stain.matrix, stain.scales)
    return DrawnSlide(
        slide_id,
        int(seed),
        params,
        tuple(classes),
        fragments,
        nuclei,
        debris,
        stain,
        renderer,
        uuids(id_rng, len(nuclei.labels)),
        {"ssa": ssa_rng, "wsa": wsa_rng, "ea": ea_rng},
    )


def generate_slide(
    slide_id: str,
    slide_path: PathLike,
    geojson_paths: Mapping[str, PathLike],
    params: SyntheticSlideParams,
    classes: Sequence[ClassSpec] = DEFAULT_CLASSES,
    seed: int = 0,
) -> SlideTruth:
    """Write one synthetic slide (pyramidal TIFF) and its annotation GeoJSONs; return what was drawn.

    ``geojson_paths`` maps any of ``truth``, ``ssa``, ``wsa``, ``ea`` to an output path; only those sets
    are written. The output depends only on (``params``, ``classes``, ``seed``, ``slide_id``): the same
    inputs give byte-identical files. All files are written atomically.
    Raises ``ValueError`` for an unknown annotation set, a negative seed, or ``classes`` that do not match
    ``params`` (fractions, rules).
    """
    unknown = sorted(set(geojson_paths) - set(ANNOTATION_SET_NAMES))
    if unknown:
        raise ValueError(
            f"slide {slide_id}: unknown annotation set(s) {unknown}; expected among {ANNOTATION_SET_NAMES}"
        )
    started = time.perf_counter()
    drawn = draw_slide(slide_id, params, classes, seed)
    drawn.write_slide(Path(slide_path))
    ids = np.array(drawn.ids, dtype=object)
    counts: list[tuple[str, int]] = []
    for name, annotation in drawn.annotations(list(geojson_paths)):
        write_detections(geojson_paths[name], ids[annotation.kept].tolist(), annotation, drawn.classes)
        counts.append((name, len(annotation.kept)))
    truth = drawn.truth(counts)
    logger.info(
        "slide %s: %dx%d px, %d fragments, %d nuclei %s, %d background objects, written in %.1f s",
        slide_id,
        params.width,
        params.height,
        len(drawn.fragments),
        truth.n_nuclei,
        dict(zip(truth.class_names, truth.nuclei_per_class, strict=True)),
        truth.debris,
        time.perf_counter() - started,
    )
    return truth


def generate_demo_slide(
    slide_id: str,
    slide_path: PathLike,
    geojson_paths: Mapping[str, PathLike],
    demo: Mapping[str, Any],
    classes: Sequence[Mapping[str, Any]],
    seed: int,
) -> SlideTruth:
    """``generate_slide`` from the config's ``demo:`` and ``classes:`` blocks (the ``generate_demo_slide`` rule)."""
    try:
        params = params_from_config(demo)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"workflow config demo: {err}") from err
    return generate_slide(slide_id, slide_path, geojson_paths, params, classes_from_config(classes), seed)
