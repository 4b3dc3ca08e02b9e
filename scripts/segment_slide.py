"""Snakemake adapter: segment every fragment of a slide with the selected architecture."""

from cellkd.device import set_default_device
from cellkd.inference import segment_fragment_store
from cellkd.report.segmentation import selected_model_path
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
segment_fragment_store(
    selected_model_path(snakemake.input.selected),
    snakemake.input.fragments,
    snakemake.output[0],
    **snakemake.params.inference,
)
