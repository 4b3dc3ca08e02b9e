"""Snakemake adapter: Table 5 (students per stain and teacher labels, mean ± 95% CI over seeds)."""

import itertools

from cellkd.report.classification import write_table5
from cellkd.report.tables import SeedTablePaths
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, labels, then seed: the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.labels, snakemake.params.seeds)
paths = SeedTablePaths(snakemake.output.csv, snakemake.output.per_seed, snakemake.output.md)
write_table5(dict(zip(keys, snakemake.input.metrics, strict=True)), paths)
