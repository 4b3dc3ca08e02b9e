"""Snakemake adapter: Table 5 (students per stain and teacher labels)."""

import itertools

from cellkd.report.classification import write_table5
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, then labels: the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.labels)
write_table5(dict(zip(keys, snakemake.input.metrics, strict=True)), snakemake.output.csv, snakemake.output.md)
