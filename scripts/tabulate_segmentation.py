"""Snakemake adapter: Table 2 (segmentation metrics per stain and architecture)."""

import itertools

from cellkd.report.segmentation import write_table2
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() iterates stain (outer) then arch (inner), the same order as this product.
keys = itertools.product(snakemake.params.stains, snakemake.params.archs)
write_table2(dict(zip(keys, snakemake.input.metrics, strict=True)), snakemake.output.csv, snakemake.output.md)
