"""What a synthetic slide looks like: nucleus appearance per class, weak-annotator rules, slide parameters.

Two appearance sets exist. ``distinct`` (the historical demo) keeps the three classes apart in size,
shape and darkness, so any classifier separates them. ``overlapping`` lets the classes' ranges overlap
(small dark "other" nuclei look like immune cells, short muscle nuclei like elongated "other"), so some
nuclei are truly ambiguous and a weak classifier errs systematically on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cellkd.classes import ClassSpec
from cellkd.params import check_parameters, is_int, params_from_dict

ANNOTATION_SET_NAMES: tuple[str, ...] = ("truth", "ssa", "wsa", "ea")
"""Keys ``generate_slide`` accepts in ``geojson_paths``."""

EOSIN_KEPT_IN_NUCLEUS = 0.35
"""A nucleus displaces most of the eosinophilic cytoplasm and stroma: the eosin it keeps, relative."""

RULE_FEATURES: tuple[str, ...] = ("area_um2", "elongation", "circularity", "hematoxylin", "texture")
"""Measured nucleus features a weak-annotator rule may test (see ``annotate.measure_nuclei``)."""


@dataclass(frozen=True)
class NucleusStyle:
    """How one class of nucleus looks. Sizes in micrometres; concentrations in optical-density units."""

    semi_major_um: tuple[float, float]  # uniform range of the semi-major axis
    aspect: tuple[float, float]  # uniform range of major / minor axis ratio
    roughness: float  # relative amplitude of the smooth radial wobble of the contour
    hematoxylin: float  # mean hematoxylin concentration inside the nucleus
    hematoxylin_sd: float  # relative per-nucleus spread of that concentration
    chromatin: float  # relative amplitude of per-pixel chromatin texture
    aligned: bool  # long axis follows the slide's smooth fibre-orientation field
    eosin_kept: tuple[float, float] = (EOSIN_KEPT_IN_NUCLEUS, EOSIN_KEPT_IN_NUCLEUS)
    # uniform range of the eosin left inside the object, relative to the tissue's


DISTINCT_STYLES: Mapping[str, NucleusStyle] = {
    "other": NucleusStyle((3.8, 5.0), (1.2, 1.6), 0.05, 0.80, 0.10, 0.45, aligned=False),
    "immune": NucleusStyle((2.5, 3.2), (1.0, 1.15), 0.03, 1.70, 0.07, 0.08, aligned=False),
    "muscle": NucleusStyle((5.0, 8.0), (3.0, 5.0), 0.03, 1.15, 0.10, 0.15, aligned=True),
}
"""Classes that never overlap: medium oval light textured / small round dark / long aligned."""

OVERLAPPING_STYLES: Mapping[str, NucleusStyle] = {
    "other": NucleusStyle((3.2, 5.4), (1.1, 2.0), 0.06, 0.85, 0.15, 0.35, aligned=False),
    "immune": NucleusStyle((2.4, 3.8), (1.0, 1.35), 0.04, 1.65, 0.12, 0.12, aligned=False),
    "muscle": NucleusStyle((4.5, 8.0), (2.0, 4.5), 0.04, 1.10, 0.15, 0.20, aligned=True),
}
"""The same three kinds with overlapping size, elongation, darkness and texture ranges."""

DEBRIS_STYLE = NucleusStyle((1.4, 3.2), (1.0, 1.8), 0.16, 1.95, 0.15, 0.03, aligned=False, eosin_kept=(0.3, 1.6))
"""Nucleus-like objects that are not nuclei: apoptotic bodies and pyknotic debris. Small, irregular, very dark
and homogeneous (condensed chromatin, no texture), mostly in hypereosinophilic cytoplasm (pinker than a nucleus).
Small round ones look like immune nuclei; the texture, outline and eosin set most of them apart."""

APPEARANCES: Mapping[str, Mapping[str, NucleusStyle]] = {"distinct": DISTINCT_STYLES, "overlapping": OVERLAPPING_STYLES}
"""Appearance sets by name (``SyntheticSlideParams.appearance``)."""

NUCLEUS_STYLES = DISTINCT_STYLES
"""The default appearance set."""


def style_for(spec: ClassSpec, index: int, styles: Mapping[str, NucleusStyle] = DISTINCT_STYLES) -> NucleusStyle:
    """The style of class ``spec``: by name, else the style at its position (mod the number of styles)."""
    return styles.get(spec.name) or list(styles.values())[index % len(styles)]


@dataclass(frozen=True)
class WeakRule:
    """One line of a QuPath-like decision list: nuclei whose features lie inside all bounds get ``class_name``.

    ``minimum`` / ``maximum`` map a feature of ``RULE_FEATURES`` to an inclusive bound. A rule with no
    bounds matches every nucleus (the list's catch-all).
    """

    class_name: str
    minimum: tuple[tuple[str, float], ...] = ()
    maximum: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for side in ("minimum", "maximum"):
            bounds = getattr(self, side)
            items = bounds.items() if isinstance(bounds, Mapping) else bounds
            normalised = tuple((str(name), float(value)) for name, value in items)
            unknown = sorted({name for name, _ in normalised} - set(RULE_FEATURES))
            if unknown:
                msg = f"weak rule for {self.class_name!r}: unknown feature(s) {unknown} in {side}; use {RULE_FEATURES}"
                raise ValueError(msg)
            object.__setattr__(self, side, normalised)

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> WeakRule:
        """From a config mapping ``{class: NAME, min: {feature: value}, max: {feature: value}}``."""
        return cls(str(entry["class"]), tuple(entry.get("min", {}).items()), tuple(entry.get("max", {}).items()))


DEFAULT_SSA_RULES: tuple[WeakRule, ...] = (
    WeakRule("muscle", minimum=(("elongation", 2.3),)),
    WeakRule("immune", minimum=(("hematoxylin", 1.12),), maximum=(("area_um2", 42.0),)),
    WeakRule("other"),
)
"""A careful annotator's classifier: thresholds near (not at) the classes' true boundaries."""

DEFAULT_WSA_RULES: tuple[WeakRule, ...] = (
    WeakRule("muscle", minimum=(("elongation", 2.5),)),
    WeakRule("immune", minimum=(("hematoxylin", 1.06),), maximum=(("area_um2", 50.0),)),
    WeakRule("other"),
)
"""A hasty classifier: elongation threshold too high (short muscle nuclei become other), darkness too low and
area too generous (small dark 'other' nuclei become immune). The demo adds ``wsa_random_share`` noise on top; the
thresholds were 2.7 / 1.02 / 55 when the rules had to make all of WSA's errors alone."""


@dataclass(frozen=True)
class SyntheticSlideParams:
    """What one synthetic slide looks like and how noisy its simulated annotations are.

    ``width``/``height`` are level-0 pixels; ``mpp`` is micrometres per level-0 pixel (nucleus sizes
    are physical, so they shrink in pixels as mpp grows). ``nuclei_total``, when set, fixes the number
    of nuclei whatever the tissue area (``nuclei_per_mpx`` is then unused). ``fragment_aspect`` bounds
    the minor/major ratio of the tissue blobs; ``nucleus_size`` multiplies every nucleus axis (denser tissue).
    ``debris_per_nucleus``: nucleus-like non-nuclei (``DEBRIS_STYLE``) drawn per nucleus; they are in the
    pixels but in no annotation set (not even the truth), so a segmentation that finds them makes nuclei
    that every set labels background, as QuPath's cell detection finds debris that nobody classifies.

    ``annotator`` says how SSA and WSA labels arise: ``flips`` moves ``*_flip`` of the kept labels to
    another class uniformly at random; ``rules`` classifies every kept nucleus with the decision list
    ``*_rules`` applied to features measured on the annotator's own (jittered) contour, the way a
    parametric QuPath classifier errs (systematically, by size, shape and stain), then moves
    ``*_random_share`` of those labels to another class uniformly at random (the unsystematic part of a
    trained classifier's errors, which a network trained on the labels averages away). Either way
    ``*_miss`` is the fraction of nuclei left out and ``*_jitter_px`` the RMS displacement of contour
    vertices in level-0 pixels.
    """

    width: int = 4096
    height: int = 3072
    mpp: float = 0.5
    fragments: tuple[int, int] = (2, 4)
    fragment_aspect: tuple[float, float] = (0.55, 1.0)
    nuclei_per_mpx: float = 800.0
    # 800 nuclei per 1e6 tissue pixels at 0.5 mpp = 3200 per mm², a moderately cellular stroma.
    nuclei_total: int | None = None
    class_fractions: tuple[float, ...] = (0.5, 0.3, 0.2)
    appearance: Literal["distinct", "overlapping"] = "distinct"
    nucleus_size: float = 1.0
    debris_per_nucleus: float = 0.0
    annotator: Literal["flips", "rules"] = "flips"
    ssa_flip: float = 0.10
    ssa_miss: float = 0.05
    ssa_jitter_px: float = 1.5
    ssa_rules: tuple[WeakRule, ...] = field(default=DEFAULT_SSA_RULES)
    ssa_random_share: float = 0.0
    wsa_flip: float = 0.18
    wsa_miss: float = 0.08
    wsa_jitter_px: float = 2.5
    wsa_rules: tuple[WeakRule, ...] = field(default=DEFAULT_WSA_RULES)
    wsa_random_share: float = 0.0
    ea_count: int = 300
    ea_jitter_px: float = 0.3
    stain_jitter: float = 0.05
    compression: Literal["jpeg", "zlib"] = "jpeg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Config files give lists: store tuples (hashable, comparable), then check the stored values.
        for name in ("fragments", "ssa_rules", "wsa_rules"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("fragment_aspect", "class_fractions"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        fragments, aspect, fractions = self.fragments, self.fragment_aspect, self.class_fractions

        def catch_all(rules: tuple[WeakRule, ...]) -> bool:
            return (
                bool(rules)
                and all(isinstance(r, WeakRule) for r in rules)
                and not (rules[-1].minimum or rules[-1].maximum)
            )

        pixels = "an integer number of level-0 pixels in [256, 1048576]"
        fraction, jitter = "a fraction in [0, 1)", "an RMS displacement in [0, 20] level-0 pixels"
        checks = [
            (is_int(self.width) and 256 <= self.width <= 2**20, "width", pixels),
            (is_int(self.height) and 256 <= self.height <= 2**20, "height", pixels),
            (0.05 <= self.mpp <= 10.0, "mpp", "micrometres per pixel in [0.05, 10]"),
            (
                len(fragments) == 2
                and all(isinstance(v, int) for v in fragments)
                and 1 <= fragments[0] <= fragments[1] <= 16,
                "fragments",
                "(minimum, maximum) integers with 1 <= minimum <= maximum <= 16",
            ),
            (
                len(aspect) == 2 and 0.1 <= aspect[0] <= aspect[1] <= 1.0,
                "fragment_aspect",
                "(minimum, maximum) minor/major ratios in [0.1, 1]",
            ),
            (0.2 <= self.nucleus_size <= 5.0, "nucleus_size", "a factor on every nucleus axis in [0.2, 5]"),
            (
                0.0 <= self.debris_per_nucleus <= 2.0,
                "debris_per_nucleus",
                "background objects per nucleus in [0, 2]",
            ),
            (
                0.0 <= self.nuclei_per_mpx <= 10_000.0,
                "nuclei_per_mpx",
                "nuclei per million tissue pixels in [0, 10000]",
            ),
            (
                self.nuclei_total is None or (is_int(self.nuclei_total) and self.nuclei_total >= 0),
                "nuclei_total",
                "None or a non-negative integer",
            ),
            (
                bool(fractions) and min(fractions) >= 0 and math.isclose(sum(fractions), 1.0, abs_tol=1e-6),
                "class_fractions",
                "non-negative fractions, one per class, summing to 1",
            ),
            (self.appearance in APPEARANCES, "appearance", f"one of {sorted(APPEARANCES)}"),
            (self.annotator in ("flips", "rules"), "annotator", "'flips' or 'rules'"),
            *(
                (
                    catch_all(getattr(self, name)),
                    name,
                    "a non-empty list of WeakRule whose last rule has no bounds (catch-all)",
                )
                for name in ("ssa_rules", "wsa_rules")
            ),
            *(
                (0.0 <= getattr(self, name) < 1.0, name, fraction)
                for name in ("ssa_flip", "ssa_miss", "ssa_random_share", "wsa_flip", "wsa_miss", "wsa_random_share")
            ),
            *(
                (0.0 <= getattr(self, name) <= 20.0, name, jitter)
                for name in ("ssa_jitter_px", "wsa_jitter_px", "ea_jitter_px")
            ),
            (isinstance(self.ea_count, int) and self.ea_count >= 0, "ea_count", "a non-negative integer"),
            (0.0 <= self.stain_jitter <= 0.3, "stain_jitter", "a relative perturbation in [0, 0.3]"),
            (self.compression in ("jpeg", "zlib"), "compression", "'jpeg' or 'zlib'"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality", "an integer in [1, 100]"),
        ]
        check_parameters(self, checks, "synthetic slide", error=ValueError)

    @property
    def styles(self) -> Mapping[str, NucleusStyle]:
        """The appearance set named by ``appearance``."""
        return APPEARANCES[self.appearance]

    def check_classes(self, classes: Sequence[ClassSpec], slide_id: str) -> None:
        """Raise ``ValueError`` when ``classes`` do not fit these parameters (fractions, flips, rule classes)."""
        if len(classes) != len(self.class_fractions):
            msg = (
                f"slide {slide_id}: {len(classes)} classes {[c.name for c in classes]} but class_fractions has "
                f"{len(self.class_fractions)} entries {self.class_fractions}; give one fraction per class"
            )
            raise ValueError(msg)
        flip_keys = ("ssa_flip", "wsa_flip") if self.annotator == "flips" else ("ssa_random_share", "wsa_random_share")
        if len(classes) < 2 and max(getattr(self, key) for key in flip_keys) > 0:
            msg = f"slide {slide_id}: label flips need at least two classes; set {' and '.join(flip_keys)} to 0"
            raise ValueError(msg)
        if self.annotator == "rules":
            names = {c.name for c in classes}
            for set_name in ("ssa", "wsa"):
                unknown = sorted({r.class_name for r in getattr(self, f"{set_name}_rules")} - names)
                if unknown:
                    msg = (
                        f"slide {slide_id}: {set_name}_rules name class(es) {unknown} that are not among the "
                        f"configured classes {sorted(names)}; write rules for your classes (demo.{set_name}_rules)"
                    )
                    raise ValueError(msg)


def params_from_config(demo: Mapping[str, Any]) -> SyntheticSlideParams:
    """Slide parameters from the config's ``demo:`` block (``slides`` is the workflow's, not a slide's)."""
    values = {key: value for key, value in demo.items() if key != "slides"}
    for name in ("ssa_rules", "wsa_rules"):
        if name in values:
            values[name] = tuple(WeakRule.from_config(entry) for entry in values[name])
    return params_from_dict(SyntheticSlideParams, values, "demo")


@dataclass(frozen=True)
class SlideTruth:
    """What ``generate_slide`` drew.

    ``fragments``: (x, y, width, height) boxes in level-0 pixels that hold every tissue pixel of each
    fragment (including a 2-pixel optical-blur halo); outside them the slide is background.
    ``nuclei_per_class``: nucleus counts in ``class_names`` order. ``annotation_counts``: features
    written per GeoJSON set. ``stain_matrix``: the H and E optical-density rows actually used.
    ``debris``: background objects drawn (in the pixels, in no annotation set).
    """

    slide_id: str
    width: int
    height: int
    mpp: float
    fragments: tuple[tuple[int, int, int, int], ...]
    class_names: tuple[str, ...]
    nuclei_per_class: tuple[int, ...]
    annotation_counts: tuple[tuple[str, int], ...]
    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    debris: int = 0

    @property
    def n_nuclei(self) -> int:
        return sum(self.nuclei_per_class)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)
