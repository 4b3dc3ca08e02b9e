"""Snakemake adapter: choose the segmentation architecture with the best mean test Dice over seeds."""

import itertools

from cellkd.report.segmentation import select_architecture
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates arch, then seed (inner): the same order as this product. The first seed's model is the one
# that segments the slides (select_architecture records it).
keys = itertools.product(snakemake.params.archs, snakemake.params.seeds)
metrics: dict[str, dict[int, str]] = {}
for (arch, seed), path in zip(keys, snakemake.input.metrics, strict=True):
    metrics.setdefault(arch, {})[seed] = path
select_architecture(metrics, snakemake.params.reference, snakemake.output[0])
