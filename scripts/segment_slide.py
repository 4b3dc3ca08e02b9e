"""Snakemake adapter: segment every fragment of a slide with one model.

The model is ``input.model`` where the rule names one (segment_slide_per_arch, or a predict_model bundle's
weights), else the architecture that ``input.selected`` (selected.json) names.
"""

from cellkd.device import set_default_device
from cellkd.inference import segment_fragment_store
from cellkd.report.segmentation import selected_model_path
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
# Namedlist membership tests values, not names: the .keys() is needed.
named = "model" in snakemake.input.keys()  # noqa: SIM118
segment_fragment_store(
    snakemake.input.model if named else selected_model_path(snakemake.input.selected),
    snakemake.input.fragments,
    snakemake.output[0],
    **snakemake.params.inference,
)
