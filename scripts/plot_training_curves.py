"""Snakemake adapter: loss and validation score per epoch of every trained model."""

from cellkd.report.plots import plot_training_curves
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# Input names are "<phase>|<model label>" (see get_training_histories in rules/common.smk).
histories: dict[str, dict[str, str]] = {}
for name, path in snakemake.input.items():
    phase, label = name.split("|", 1)
    histories.setdefault(phase, {})[label] = path
plot_training_curves(histories, snakemake.output[0])
