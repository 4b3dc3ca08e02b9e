"""Snakemake adapter: cut 512x512 image + mask patches (no overlap, zero-padded) with a seeded split."""

from cellkd.store.patches import PatchParams, cut_patches
from cellkd.workflow import log_to

log_to(snakemake.log[0])
cut_patches(
    snakemake.input.fragments,
    snakemake.input.masks,
    snakemake.output[0],
    source=snakemake.wildcards.slide,
    params=PatchParams(**snakemake.params.patches, seed=snakemake.params.seed),
)
