"""Snakemake adapter: fit Macenko once on the slide's tissue, normalize every fragment tile by tile."""

from cellkd.stain import MacenkoParams, normalize_fragment_store
from cellkd.workflow import log_to

log_to(snakemake.log[0])
normalize_fragment_store(
    snakemake.input[0], snakemake.output[0], MacenkoParams(**snakemake.params.macenko), seed=snakemake.params.seed
)
