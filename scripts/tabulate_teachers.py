"""Snakemake adapter: Table 4 (teachers per stain, training labels and architecture)."""

import itertools

from cellkd.report.classification import write_table4
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, then labels, then arch: the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.labels, snakemake.params.archs)
write_table4(dict(zip(keys, snakemake.input.metrics, strict=True)), snakemake.output.csv, snakemake.output.md)
