"""Snakemake adapter: train one segmentation architecture on the patch stores of one stain set."""

from pathlib import Path

from cellkd.training.segmentation import SegmentationTrainParams, train_segmentation
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
params = SegmentationTrainParams.from_dict(snakemake.params.train)
train_segmentation(snakemake.input.patches, Path(snakemake.output.model).parent, params)
