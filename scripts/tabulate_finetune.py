"""Snakemake adapter: Table 6 (mean ± 95% CI over seeds, and its per-seed rows) and the F1-against-labels curve."""

import itertools

from cellkd.report.finetune import write_table6
from cellkd.report.tables import SeedTablePaths
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, labels, count, then seed: the same order as this product.
params = snakemake.params
keys = itertools.product(params.stains, params.labels, params.counts, params.seeds)
metrics = dict(zip(keys, snakemake.input.metrics, strict=True))
paths = SeedTablePaths(snakemake.output.csv, snakemake.output.per_seed, snakemake.output.md)
write_table6(metrics, paths, snakemake.output.png)
