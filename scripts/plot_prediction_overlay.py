"""Snakemake adapter: the slide's predicted nuclei, coloured by class, over its largest fragment."""

from cellkd.classes import classes_from_config
from cellkd.predict import BACKGROUND_CLASS
from cellkd.report.overlay import plot_prediction_overlay
from cellkd.workflow import log_to

log_to(snakemake.log[0])
classes = classes_from_config(snakemake.params.classes)
if snakemake.params.include_background:
    classes = [*classes, BACKGROUND_CLASS]
plot_prediction_overlay(snakemake.input.fragments, snakemake.input.predictions, classes, snakemake.output[0])
