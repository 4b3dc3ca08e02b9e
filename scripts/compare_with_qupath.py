"""Snakemake adapter: Figure 4, each architecture's nuclei vs the QuPath segmentation (and truth), raw vs Macenko."""

import itertools

from cellkd.report.segmentation import compare_segmentations, write_qupath_comparison
from cellkd.workflow import log_to

log_to(snakemake.log[0])
slides = snakemake.params.slides
mask_stores = dict(zip(slides, snakemake.input.masks, strict=True))
# expand() iterates stain (outer), arch, then slide (inner): the same order as this product.
keys = list(itertools.product(snakemake.params.stains, snakemake.params.archs, slides))
comparisons = {
    (stain, arch, slide): compare_segmentations(
        predicted, mask_stores[slide], snakemake.params.references, snakemake.params.level
    )
    for (stain, arch, slide), predicted in zip(keys, snakemake.input.predicted, strict=True)
}
write_qupath_comparison(comparisons, snakemake.output.csv, snakemake.output.md, snakemake.output.png)
