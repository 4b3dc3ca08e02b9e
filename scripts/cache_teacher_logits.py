"""Snakemake adapter: run the teacher once over every nucleus and cache its logits for the student."""

from cellkd.device import set_default_device
from cellkd.training.classifier import cache_teacher_logits
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
cache_teacher_logits(snakemake.input.model, snakemake.input.nuclei, snakemake.output[0])
