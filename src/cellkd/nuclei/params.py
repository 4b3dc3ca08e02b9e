"""Settings of nucleus extraction (``nuclei:`` in workflow_config.yaml), read by every stage of ``cellkd.nuclei``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellkd.params import SPLIT_FRACTIONS, check_parameters, is_int, is_split_fractions


@dataclass(frozen=True)
class NucleiParams:
    """How nuclei are found, cropped, labelled and split (``nuclei:`` in workflow_config.yaml)."""

    crop_size: int = 32
    """Level-0 crop edge (px), centred on the centroid, zero-padded outside the fragment."""
    multiscale_size: int = 16
    """Crop edge (px) at levels 1 and 2, centred on centroid / 2 and centroid / 4."""
    min_area: int = 8
    """Instances smaller than this (level-0 px) are dropped."""
    max_size: int = 256
    """Largest nucleus edge (level-0 px). Instances whose bounding box is wider or taller are not nuclei
    (merged blobs, tissue folds) and are dropped, whatever the tiling; it is also the tile halo
    (``cellkd.nuclei.extract``), so that every nucleus lies whole in the tile that keeps it."""
    tile: int = 2048
    """Edge (segmentation-level px) of the tiles a fragment is processed in: the peak memory is set by
    ``(tile + 2 * halo)^2`` pixels, not by the fragment size."""
    split_touching: bool = True
    """Split touching nuclei by a watershed on the distance transform."""
    split_depth: float = 1.5
    """Distance-transform peaks (segmentation-level px) split a component only when they rise at least
    this much above the saddle between them (h-maxima): smaller bumps of one outline do not split it."""
    split_waist: float = 2.0
    """Two watershed parts stay split only when their union has a waist: a concavity (convex-hull deficit)
    at least this deep (segmentation-level px). A convex outline of any elongation (a muscle nucleus) has
    none: its pixel staircase is 1 px deep, while two touching round nuclei pinch in by 2 px or more."""
    match: str = "iou"
    """``"iou"`` (best-overlapping annotated nucleus) or ``"centroid"`` (annotated nucleus containing it)."""
    min_iou: float = 0.1
    """For ``match="iou"``: below this IoU the instance is unmatched."""
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    """train / val / test fractions; each >= 0, summing to 1."""
    split_by: str = "nucleus"
    """``"nucleus"``: each nucleus drawn on its own. ``"fragment"``: whole fragments go to one split, so
    overlapping crops of neighbouring nuclei never straddle train and test; the ratios then count
    fragments (those with nuclei), and the nucleus fractions only approximate them. ``"area"``: the
    nuclei of one area block (``area_block`` px, the blocks of ``cellkd.store.patches``) share one
    split; the ratios count blocks."""
    area_block: int = 2048
    """Edge (level-0 px) of the area blocks of ``split_by="area"``; the workflow sets it to the patch
    store's ``PatchParams.block_size`` so that a nucleus and the patches of its area share one split."""
    seed: int = 0
    """Seed of the split; combined with the slide id."""
    partial_sets: tuple[str, ...] = ("ea",)
    """Annotation sets that label only a subset of nuclei: unmatched instances get -1, not background."""

    def __post_init__(self) -> None:
        # Config files give lists; tuples keep the dataclass hashable and comparable.
        object.__setattr__(self, "split", tuple(float(v) for v in self.split))
        object.__setattr__(self, "partial_sets", tuple(str(s) for s in self.partial_sets))
        integers = (("crop_size", 2), ("multiscale_size", 2), ("min_area", 1), ("max_size", 1), ("tile", 16))
        checks = [
            *(
                (is_int(getattr(self, n)) and getattr(self, n) >= low, n, f"an integer >= {low}")
                for n, low in (*integers, ("area_block", 1))
            ),
            (isinstance(self.split_touching, bool), "split_touching", "true or false"),
            (_positive(self.split_depth), "split_depth", "a number > 0 (pixels)"),
            (_positive(self.split_waist), "split_waist", "a number > 0 (pixels)"),
            (self.match in ("iou", "centroid"), "match", "'iou' or 'centroid'"),
            (_positive(self.min_iou) and self.min_iou <= 1.0, "min_iou", "a number in (0, 1]"),
            (is_split_fractions(self.split), "split", SPLIT_FRACTIONS),
            (self.split_by in ("nucleus", "fragment", "area"), "split_by", "'nucleus', 'fragment' or 'area'"),
            (is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0"),
        ]
        check_parameters(self, checks, "nuclei", " (see nuclei: in workflow_config.yaml)")


def _positive(value: object) -> bool:
    """A finite number > 0 (checked without raising on a non-number, as every check runs up front)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
