"""Snakemake adapter: segment every fragment of a slide with the selected architecture (or a bundle's model)."""

from cellkd.device import set_default_device
from cellkd.inference import segment_fragment_store
from cellkd.report.segmentation import selected_model_path
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
# Namedlist membership tests values, not names: the .keys() is needed.
bundled = "model" in snakemake.input.keys()  # noqa: SIM118
segment_fragment_store(
    snakemake.input.model if bundled else selected_model_path(snakemake.input.selected),
    snakemake.input.fragments,
    snakemake.output[0],
    **snakemake.params.inference,
)
