"""Snakemake adapter: score a trained classifier on the test split, the doctor (EA) set and the truth."""

from cellkd.report.classification import evaluate_classifier_stores
from cellkd.training.common import set_default_device
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
evaluate_classifier_stores(
    snakemake.input.model,
    snakemake.input.nuclei,
    snakemake.wildcards.weak_set,
    snakemake.output.metrics,
    snakemake.output.confusion,
)
