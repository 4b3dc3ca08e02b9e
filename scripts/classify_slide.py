"""Snakemake adapter: classify every nucleus of a slide and export QuPath GeoJSON detections."""

from cellkd.classes import classes_from_config
from cellkd.device import set_default_device
from cellkd.predict import classify_nuclei
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
classify_nuclei(
    snakemake.input.model,
    snakemake.input.nuclei,
    classes_from_config(snakemake.params.classes),
    snakemake.output[0],
    include_background=snakemake.params.include_background,
    fragment_store=snakemake.input.fragments,
    object_type=snakemake.params.object_type,
)
