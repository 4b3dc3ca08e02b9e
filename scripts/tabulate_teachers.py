"""Snakemake adapter: Table 4 (teachers per stain, training labels and architecture, mean ± 95% CI over seeds)."""

import itertools

from cellkd.report.classification import write_table4
from cellkd.report.tables import SeedTablePaths
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, labels, arch, then seed: the same order as this product.
params = snakemake.params
keys = itertools.product(params.stains, params.labels, params.archs, params.seeds)
paths = SeedTablePaths(snakemake.output.csv, snakemake.output.per_seed, snakemake.output.md)
write_table4(dict(zip(keys, snakemake.input.metrics, strict=True)), paths)
