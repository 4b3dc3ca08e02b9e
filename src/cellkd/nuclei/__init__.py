"""Nuclei: every nucleus the segmentation model found in a slide, with its crops, outline and per-set labels.

Data flow, one module per step (``extract_nuclei`` runs them fragment by fragment, tile by tile with a halo):

``instances``  predicted mask -> instance labels (8-connected components, watershed for touching nuclei)
``matching``   instances + annotation set (QuPath GeoJSON polygons, then points) -> class index per instance
``crops``      instances + fragment images -> outlines (shapely, level-0 px) and crops at levels 0, 1, 2
``extract``    the orchestration and the train / val / test split; settings in ``params`` (``NucleiParams``)

Artifacts:

- Input: predicted masks ``results/segmentation/{stain}/masks/{slide}.h5`` (``cellkd.inference``), fragment store
  ``results/fragments/{stain}/{slide}.h5`` (``cellkd.store.fragments``), annotations
  QuPath GeoJSON per annotation set (from the slide sheet; ``cellkd.annotations.qupath``).
- Output: the nuclei store ``results/nuclei/{stain}/{slide}.h5``. Its layout, its writer and its only
  reader (``NucleiStore``) live in ``cellkd.store.nuclei``. Read by the classifier trainers
  (``cellkd.training.classifier``), the reports (``cellkd.report.classification``) and the QuPath
  export (``cellkd.predict``).
"""

from cellkd.nuclei.extract import extract_nuclei
from cellkd.nuclei.instances import find_instances
from cellkd.nuclei.params import NucleiParams
from cellkd.store.nuclei import UNLABELLED, NucleiStore

__all__ = ["UNLABELLED", "NucleiParams", "NucleiStore", "extract_nuclei", "find_instances"]
