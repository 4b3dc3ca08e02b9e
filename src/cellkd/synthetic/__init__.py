"""Synthetic H&E whole-slide images with known ground truth, plus simulated annotations.

One call of ``generate_slide`` writes:

* an OpenSlide-readable pyramidal tiled TIFF (levels 1, 1/2, 1/4; 256x256 tiles; mpp in the
  resolution tags) showing irregular tissue fragments on a white background, with nuclei of three
  kinds (``other``, ``immune``, ``muscle``; ``spec``: their appearance, distinct or overlapping) and, with
  ``debris_per_nucleus`` > 0, nucleus-like debris (``DEBRIS_STYLE``) that no annotation set holds;
* QuPath-style GeoJSON: ``truth`` (every nucleus, true class, exact contour), ``ssa`` / ``wsa``
  (strong / weak synthetic annotations: some nuclei missed, contours jittered, labels from random
  flips or from a weak rule-based classifier, see ``annotate``) and ``ea`` (expert annotations: true
  labels on a random subset).

A nucleus keeps the same GeoJSON ``id`` in every set, so the sets can be joined on ``id``.
``scale`` builds the paper-scale benchmark fixture (one 48,724x17,910 slide, QuPath cell exports).

Modules: ``spec`` (parameters, appearance, rules), ``layout`` (fragments and nuclei), ``render``
(pixels and the TIFF pyramid), ``annotate`` (simulated annotators), ``export`` (GeoJSON writers),
``slide`` (one slide end to end), ``scale`` (the paper-scale fixture).
"""

from cellkd.synthetic.render import BACKGROUND_INTENSITY, REFERENCE_STAIN_MATRIX
from cellkd.synthetic.slide import draw_slide, generate_demo_slide, generate_slide
from cellkd.synthetic.spec import (
    ANNOTATION_SET_NAMES,
    APPEARANCES,
    DEBRIS_STYLE,
    DEFAULT_SSA_RULES,
    DEFAULT_WSA_RULES,
    NUCLEUS_STYLES,
    RULE_FEATURES,
    NucleusStyle,
    SlideTruth,
    SyntheticSlideParams,
    WeakRule,
    params_from_config,
)

__all__ = [
    "ANNOTATION_SET_NAMES",
    "APPEARANCES",
    "BACKGROUND_INTENSITY",
    "DEBRIS_STYLE",
    "DEFAULT_SSA_RULES",
    "DEFAULT_WSA_RULES",
    "NUCLEUS_STYLES",
    "REFERENCE_STAIN_MATRIX",
    "RULE_FEATURES",
    "NucleusStyle",
    "SlideTruth",
    "SyntheticSlideParams",
    "WeakRule",
    "draw_slide",
    "generate_demo_slide",
    "generate_slide",
    "params_from_config",
]
