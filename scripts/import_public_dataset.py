"""Snakemake adapter: a public dataset (MoNuSeg / Lizard) -> its fragment + mask stores and a patch store."""

import functools

from cellkd.annotations import import_public_dataset
from cellkd.stain import MacenkoParams, normalize_fragment_store
from cellkd.store.patches import PatchParams
from cellkd.workflow import log_to

log_to(snakemake.log[0])
seed = snakemake.params.seed
normalize = None
if snakemake.wildcards.stain == "macenko":
    normalize = functools.partial(normalize_fragment_store, params=MacenkoParams(**snakemake.params.macenko), seed=seed)
import_public_dataset(
    snakemake.input[0],
    snakemake.params.kind,
    snakemake.output.patches,  # its stores go to snakemake.output.stores (public_store_dir)
    mask_set=snakemake.params.mask_set,
    params=PatchParams(**snakemake.params.patches, seed=seed),
    normalize=normalize,
    source=snakemake.wildcards.dataset,
    working_mpp=snakemake.params.working_mpp,
)
