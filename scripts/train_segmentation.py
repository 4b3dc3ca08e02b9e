"""Snakemake adapter: train one segmentation architecture on the patch stores of one stain set."""

from pathlib import Path

from cellkd.device import set_default_device
from cellkd.training.segmentation import SegmentationTrainParams, train_segmentation
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
# loader settings are speed only: read from the config, not params, so that changing them reruns nothing
params = SegmentationTrainParams.from_dict({**snakemake.params.train, **snakemake.config["loader"]})
train_segmentation(snakemake.input.patches, Path(snakemake.output.model).parent, params)
