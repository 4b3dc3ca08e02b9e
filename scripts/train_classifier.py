"""Snakemake adapter: train a teacher on one weak annotation set, or distil a student from cached teacher logits."""

from pathlib import Path

from cellkd.device import set_default_device
from cellkd.training.classifier import ClassifierTrainParams, train_classifier
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
train_classifier(
    snakemake.input.nuclei,
    snakemake.params.label_set,
    Path(snakemake.output.model).parent,
    ClassifierTrainParams.from_dict(snakemake.params.train),
    teacher_logits=snakemake.input.get("logits"),  # only train_student has them
)
