"""Snakemake adapter: score a trained classifier on the test split, the doctor (EA) set and the truth.

For the student, whose rule also names its teacher, the metrics get both speeds (crops/s) for Table 5.
For a teacher, whose rule has a ``logits`` output, the same pass caches its logits for the student.
"""

from cellkd.device import set_default_device
from cellkd.report.classification import evaluate_classifier_stores, measure_throughput
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
teacher = snakemake.input.get("teacher")
speeds = None
if teacher is not None:
    speeds = {
        "student_crops_per_s": measure_throughput(snakemake.input.model, snakemake.input.nuclei),
        "teacher_crops_per_s": measure_throughput(teacher, snakemake.input.nuclei),
    }
evaluate_classifier_stores(
    snakemake.input.model,
    snakemake.input.nuclei,
    snakemake.wildcards.weak_set,
    snakemake.output.metrics,
    snakemake.output.confusion,
    extra_columns=speeds,
    logits_h5=snakemake.output.get("logits"),  # only evaluate_teacher has them
)
