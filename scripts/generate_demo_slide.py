"""Snakemake adapter: write one synthetic demo slide and its truth/SSA/WSA/EA GeoJSON."""

from cellkd.classes import classes_from_config
from cellkd.synthetic import SyntheticSlideParams, generate_slide
from cellkd.workflow import log_to

log_to(snakemake.log[0])
demo = dict(snakemake.params.demo)
demo.pop("slides")
generate_slide(
    snakemake.wildcards.slide,
    snakemake.output.slide,
    {name: snakemake.output[name] for name in ("truth", "ssa", "wsa", "ea")},
    SyntheticSlideParams(**{**demo, "fragments": tuple(demo["fragments"])}),
    classes=classes_from_config(snakemake.params.classes),
    seed=snakemake.params.seed,
)
