"""Snakemake adapter: a training slide's masks are the selected architecture's Figure 4 masks, copied, not
segmented a second time with the same model."""

from cellkd.report.segmentation import copy_selected_masks
from cellkd.workflow import log_to

log_to(snakemake.log[0])
# expand() in the rule lists the masks in params.archs order
masks_by_arch = dict(zip(snakemake.params.archs, snakemake.input.masks, strict=True))
copy_selected_masks(snakemake.input.selected, masks_by_arch, snakemake.output[0])
