"""Snakemake adapter: write the predicting models as a self-describing bundle (results/models/{name}/)."""

from cellkd.bundle import ExportSettings, export_bundle
from cellkd.report.segmentation import selected_model_path
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# Namedlist membership tests values, not names: the .keys() is needed.
tables = {name: snakemake.input[name] for name in ("table2", "table5", "table6") if name in snakemake.input.keys()}  # noqa: SIM118
export_bundle(
    snakemake.output[0],
    ExportSettings(**snakemake.params.settings),
    segmentation_model=selected_model_path(snakemake.input.selected),
    classifier_model=snakemake.input.classifier,
    fragment_stores=snakemake.input.fragments,
    nuclei_stores=snakemake.input.nuclei,
    tables=tables,
)
