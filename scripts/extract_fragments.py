"""Snakemake adapter: detect tissue fragments and store them at the working resolution and 1/2, 1/4 of it."""

from cellkd.slides import TissueParams, extract_fragments
from cellkd.workflow import log_to

log_to(snakemake.log[0])
extract_fragments(
    snakemake.input.slide,
    snakemake.output[0],
    slide_id=snakemake.wildcards.slide,
    params=TissueParams(**snakemake.params.tissue),
    mpp=snakemake.params.mpp,
    mpp_fallback=snakemake.params.mpp_fallback,
    threads=snakemake.threads,
    working_mpp=snakemake.params.working_mpp,
)
