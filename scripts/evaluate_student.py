"""Snakemake adapter: score the student like the teachers, and measure student and teacher speed (crops/s)."""

from cellkd.report.classification import evaluate_classifier_stores, measure_throughput
from cellkd.training.common import set_default_device
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
speeds = {
    "student_crops_per_s": measure_throughput(snakemake.input.model, snakemake.input.nuclei),
    "teacher_crops_per_s": measure_throughput(snakemake.input.teacher, snakemake.input.nuclei),
}
evaluate_classifier_stores(
    snakemake.input.model,
    snakemake.input.nuclei,
    snakemake.wildcards.weak_set,
    snakemake.output.metrics,
    snakemake.output.confusion,
    extra_columns=speeds,
)
