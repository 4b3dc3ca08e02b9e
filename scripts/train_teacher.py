"""Snakemake adapter: train one teacher classifier on the SSA or WSA labels of one stain set."""

from pathlib import Path

from cellkd.training.classifier import ClassifierTrainParams, train_classifier
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
train_classifier(
    snakemake.input.nuclei,
    snakemake.wildcards.weak_set,
    Path(snakemake.output.model).parent,
    ClassifierTrainParams.from_dict(snakemake.params.train),
)
