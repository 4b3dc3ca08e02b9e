"""Snakemake adapter: choose the segmentation architecture with the best test Dice."""

from cellkd.report.segmentation import select_architecture
from cellkd.workflow import log_to

log_to(snakemake.log[0])
metrics = dict(zip(snakemake.params.archs, snakemake.input.metrics, strict=True))
select_architecture(metrics, snakemake.params.reference, snakemake.output[0])
