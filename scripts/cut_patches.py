"""Snakemake adapter: cut 512x512 image + mask patches (no overlap, zero-padded) with a seeded split."""

from cellkd.store.patches import PatchParams, cut_patches
from cellkd.workflow import log_to

log_to(snakemake.log[0])
settings = snakemake.params.patches
cut_patches(
    snakemake.input.fragments,
    snakemake.input.masks,
    snakemake.output[0],
    source=snakemake.wildcards.slide,
    params=PatchParams(
        size=settings["size"],
        split=tuple(settings["split"]),
        levels=tuple(settings["levels"]),
        seed=snakemake.params.seed,
    ),
)
