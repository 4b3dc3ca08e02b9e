"""Snakemake adapter: Table 3, agreement of SSA and WSA with the expert (and the truth) on the found nuclei."""

from cellkd.report.classification import label_agreement, write_table3
from cellkd.workflow import log_to

log_to(snakemake.log[0])
n_slides = len(snakemake.params.slides)
# expand() iterates stain (outer) then slide (inner).
stores = {
    stain: snakemake.input.nuclei[i * n_slides : (i + 1) * n_slides] for i, stain in enumerate(snakemake.params.stains)
}
table = label_agreement(stores, candidates=("ssa", "wsa"), references=("ea", "truth"))
write_table3(table, snakemake.output.csv, snakemake.output.md)
