"""Snakemake adapter: test-split metrics of one trained segmentation model."""

from cellkd.device import set_default_device
from cellkd.report.segmentation import evaluate_architecture
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
evaluate_architecture(snakemake.input.model, snakemake.input.patches, snakemake.params.references, snakemake.output[0])
