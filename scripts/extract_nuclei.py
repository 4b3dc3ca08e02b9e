"""Snakemake adapter: one row per segmented nucleus with multiscale crops and labels from every annotation set."""

from cellkd.classes import classes_from_config
from cellkd.config import ANNOTATION_SETS
from cellkd.nuclei import NucleiParams, extract_nuclei
from cellkd.workflow import log_to

log_to(snakemake.log[0])
settings = snakemake.params.nuclei
# Namedlist membership tests values, not names: the .keys() is needed.
annotation_names = [name for name in ANNOTATION_SETS if name in snakemake.input.keys()]  # noqa: SIM118
extract_nuclei(
    snakemake.input.predicted,
    snakemake.input.fragments,
    {name: snakemake.input[name] for name in annotation_names},
    classes_from_config(snakemake.params.classes),
    snakemake.output[0],
    NucleiParams(**{**settings, "split": tuple(settings["split"]), "seed": snakemake.params.seed}),
)
