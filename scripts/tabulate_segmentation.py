"""Snakemake adapter: Table 2 (segmentation metrics per stain and architecture, mean ± 95% CI over seeds)."""

import itertools

from cellkd.report.segmentation import write_table2
from cellkd.report.tables import SeedTablePaths
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain, arch, then seed (inner): the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.archs, snakemake.params.seeds)
paths = SeedTablePaths(snakemake.output.csv, snakemake.output.per_seed, snakemake.output.md)
write_table2(dict(zip(keys, snakemake.input.metrics, strict=True)), paths)
