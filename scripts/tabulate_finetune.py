"""Snakemake adapter: Table 6 and the F1-against-labels-per-class curve."""

import itertools

from cellkd.report.finetune import write_table6
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, labels, then count: the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.labels, snakemake.params.counts)
metrics = dict(zip(keys, snakemake.input.metrics, strict=True))
write_table6(metrics, snakemake.output.csv, snakemake.output.md, snakemake.output.png)
