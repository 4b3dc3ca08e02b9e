"""Snakemake adapter: rasterize the slide's QuPath GeoJSON sets into per-fragment class masks."""

from cellkd.annotations import AnnotationOptions, write_mask_store
from cellkd.classes import classes_from_config
from cellkd.config import ANNOTATION_SETS
from cellkd.store.fragments import FragmentStore
from cellkd.workflow import log_to

log_to(snakemake.log[0])
with FragmentStore(snakemake.input.fragments) as fragments:
    slide_size = fragments.slide_size
    # The slide's (or the sheet's) level-0 resolution; extract_fragments already warned when it fell back.
    mpp = fragments.geometry.slide_mpp_or(snakemake.params.mpp_fallback)
# Namedlist membership tests values, not names: the .keys() is needed.
annotation_names = [name for name in ANNOTATION_SETS if name in snakemake.input.keys()]  # noqa: SIM118
write_mask_store(
    snakemake.input.fragments,
    {name: snakemake.input[name] for name in annotation_names},
    classes_from_config(snakemake.params.classes),
    snakemake.output[0],
    slide_size=slide_size,
    options=AnnotationOptions.from_config(snakemake.params.annotations),
    mpp=mpp,
)
