"""Snakemake adapter: write one synthetic demo slide and its truth/SSA/WSA/EA GeoJSON."""

from cellkd.synthetic import generate_demo_slide
from cellkd.workflow import log_to

log_to(snakemake.log[0])
generate_demo_slide(
    snakemake.wildcards.slide,
    snakemake.output.slide,
    {name: snakemake.output[name] for name in ("truth", "ssa", "wsa", "ea")},
    snakemake.params.demo,
    snakemake.params.classes,
    snakemake.params.seed,
)
