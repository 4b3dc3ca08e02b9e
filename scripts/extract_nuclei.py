"""Snakemake adapter: one row per segmented nucleus with multiscale crops and labels from every annotation set."""

from cellkd.annotations import AnnotationOptions
from cellkd.classes import classes_from_config
from cellkd.config import ANNOTATION_SETS
from cellkd.nuclei import NucleiParams, extract_nuclei
from cellkd.store.fragments import FragmentStore
from cellkd.store.patches import PatchParams
from cellkd.workflow import log_to

log_to(snakemake.log[0])
settings = snakemake.params.nuclei
with FragmentStore(snakemake.input.fragments) as fragments:
    # The slide's (or the sheet's) level-0 resolution; extract_fragments already warned when it fell back.
    mpp = fragments.geometry.slide_mpp_or(snakemake.params.mpp_fallback)
# split_by: area draws the nuclei by the patch store's blocks, so a nucleus shares its patches' split.
area_block = PatchParams(**snakemake.params.patches).block_size
# Namedlist membership tests values, not names: the .keys() is needed.
annotation_names = [name for name in ANNOTATION_SETS if name in snakemake.input.keys()]  # noqa: SIM118
extract_nuclei(
    snakemake.input.predicted,
    snakemake.input.fragments,
    {name: snakemake.input[name] for name in annotation_names},
    classes_from_config(snakemake.params.classes),
    snakemake.output[0],
    NucleiParams(
        **{**settings, "split": tuple(settings["split"]), "seed": snakemake.params.seed, "area_block": area_block}
    ),
    options=AnnotationOptions.from_config(snakemake.params.annotations),
    mpp=mpp,
)
