"""Snakemake adapter: the instance table next to Table 2 (segmented nuclei vs the truth, per stain and class)."""

from cellkd.annotations import AnnotationOptions
from cellkd.classes import classes_from_config
from cellkd.report.instances import slide_instance_counts, write_instance_table
from cellkd.store.fragments import FragmentStore
from cellkd.workflow import log_to

log_to(snakemake.log[0])
classes = classes_from_config(snakemake.params.classes)
options = AnnotationOptions.from_config(snakemake.params.annotations)
slides = snakemake.params.slides
mpps, geometries = {}, {}
for slide, path in zip(slides, snakemake.input.fragments, strict=True):
    with FragmentStore(path) as fragments:
        # The slide's (or the sheet's) level-0 resolution, as rasterize_annotations reads it.
        mpps[slide] = fragments.geometry.slide_mpp_or(snakemake.params.mpp_fallback)
        geometries[slide] = fragments.geometry
truth = dict(zip(slides, snakemake.input.truth, strict=True))
# expand() iterates stain (outer) then slide (inner).
keys = [(stain, slide) for stain in snakemake.params.stains for slide in slides]
counts = {
    (stain, slide): slide_instance_counts(
        nuclei, truth[slide], classes, options=options, mpp=mpps[slide], geometry=geometries[slide]
    )
    for (stain, slide), nuclei in zip(keys, snakemake.input.nuclei, strict=True)
}
write_instance_table(counts, snakemake.output.csv, snakemake.output.md)
