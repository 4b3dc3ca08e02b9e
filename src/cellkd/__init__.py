"""cellkd: nucleus segmentation and knowledge-distilled nucleus classification in H&E whole-slide images.

Architecture
============

The Snakemake workflow (``Snakefile``, ``rules/*.smk``) calls one thin adapter per rule
(``scripts/*.py``), which calls one function of this package. Below, every artifact under
``results/`` names the modules that write it, where its layout is documented, and the modules that
read it (no others do). All writes are atomic (``cellkd.store.atomic``), so an interrupted job never
leaves a file that looks finished; HDF5 stores also carry ``attrs["complete"]`` (``require_complete``).

Artifacts, in data-flow order (path under ``results/``: writer -> layout -> readers)

``demo/slides/{slide}.tiff`` and ``{slide}.{truth,ssa,wsa,ea}.geojson``
    writer ``cellkd.synthetic`` (demo config only); read like real slides by ``cellkd.slides``
    (OpenSlide/tifffile) and ``cellkd.annotations.qupath`` (QuPath GeoJSON).
``fragments/{stain}/{slide}.h5`` (fragment store: tissue fragments at downsample 1, 2, 4)
    writer ``cellkd.slides`` (raw) and ``cellkd.stain`` (macenko), both through
    ``cellkd.store.fragments.FragmentStoreWriter``; layout in ``cellkd.store``; reader
    ``cellkd.store.fragments.FragmentStore``, used by ``cellkd.stain``, ``cellkd.annotations.rasterize``,
    ``cellkd.store.patches``, ``cellkd.inference``, ``cellkd.nuclei`` and ``cellkd.report.overlay``.
``masks/{slide}.h5`` (mask store: one class mask per annotation set)
    writer ``cellkd.annotations.rasterize.write_mask_store``; layout in ``cellkd.store``; readers
    ``cellkd.store.patches`` (patch masks, read through the patch index) and ``cellkd.report.segmentation``
    (QuPath comparison).
``patches/{stain}/{slide or dataset}.h5`` (patch store: an index of 512x512 patches of the fragment and
    mask stores, provenance, split; no pixels) writer ``cellkd.store.patches`` (``cellkd.annotations.public``
    feeds it the public datasets, whose fragment and mask stores go to ``patches/{stain}/{dataset}.stores/``);
    layout in ``cellkd.store``; reader ``cellkd.store.patches.PatchStore``, used by
    ``cellkd.training.segmentation`` (training and evaluation).
``segmentation/{stain}/{arch}/model.pt``, ``history.csv``, ``metrics.csv``, ``selected.json``
    writer ``cellkd.training.segmentation`` (checkpoint format and resume state with
    ``cellkd.training.common``) and ``cellkd.report.segmentation`` (metrics, selection); readers
    ``cellkd.inference`` (model), ``cellkd.report.segmentation`` and ``cellkd.report.plots``.
``segmentation/{stain}/masks/{slide}.h5`` (predicted nucleus masks per fragment, selected architecture)
    writer and layout ``cellkd.inference.segment_fragment_store``; reader ``cellkd.nuclei`` (instances).
``segmentation/{stain}/{arch}/masks/{slide}.h5`` (the same, of every architecture)
    same writer and layout; reader ``cellkd.report.segmentation`` (comparison with QuPath, Figure 4).
``nuclei/{stain}/{slide}.h5`` (nuclei store: one row per nucleus, crops, per-set labels, outline)
    computed by the ``cellkd.nuclei`` package (``instances``: components and watershed;
    ``matching``: annotations to labels; ``crops``: crops and outlines; ``extract``: the rule's
    entry point); layout, writer and only reader in ``cellkd.store.nuclei`` (``NucleiStore``), used
    by ``cellkd.training`` (classifier trainers), ``cellkd.report.classification`` and
    ``cellkd.predict``.
``teacher/``, ``student/``, ``finetune/`` (classifier ``model.pt``, ``history.csv``, ``metrics.csv``;
``teacher/{stain}/{weak_set}/{arch}/seed{seed}/logits.h5``, the teacher-logit cache)
    writers ``cellkd.training.classifier`` (teachers, the teacher-logit cache, students; checkpoint
    format and resume state with ``cellkd.training.common``), ``cellkd.training.finetune`` (Phase IV,
    its own metrics) and ``cellkd.report.classification`` (teacher and student metrics; the teacher's
    evaluation writes the logit cache through ``cache_teacher_logits``, read by the student's trainer). Models are
    read only through ``cellkd.training.classifier`` (``load_classifier``, ``predict_logits``): by
    the next phase's trainer, ``cellkd.predict`` and ``cellkd.report.classification``; metrics by
    ``cellkd.report.classification`` (Tables 4, 5) and ``cellkd.report.finetune`` (Table 6);
    histories by ``cellkd.report.plots``.
``predict/{slide}.geojson`` (classified nuclei as QuPath detections)
    writer ``cellkd.predict`` (streamed through ``cellkd.annotations.qupath.open_qupath_geojson``); readers
    QuPath and ``cellkd.report.overlay``.
``models/{name}/`` (model bundle: ``model.json``, ``MODEL_CARD.md``, safetensors weights)
    writer and only reader ``cellkd.bundle`` (layout in its docstring); the checkpoint readers of
    ``cellkd.models.checkpoint`` hand a bundle's ``.safetensors`` path to it, so ``cellkd.inference``
    and ``cellkd.predict`` predict with a bundle as with a ``model.pt``.
``tables/table{2..6}.{csv,md}``, ``tables/figure4.{csv,md}`` and ``report/*.png``
    writers ``cellkd.report`` (``tables``: CSV + Markdown; ``figures``: every PNG); read by people
    and by ``snakemake --report``.

Supporting modules: ``cellkd.config`` (config and slide-sheet validation; schema in
``schemas/config.schema.yaml``, reference generated by ``cellkd.config_docs``), ``cellkd.classes``
(class specs from the config), ``cellkd.params`` (the checks every settings dataclass shares,
torch-free), ``cellkd.models`` (architectures), ``cellkd.metrics`` (pixel and
classification scores), ``cellkd.errors`` (the error types users see), ``cellkd.workflow`` (log and
thread setup for the scripts), ``cellkd.types`` (shared aliases and constants).
"""

__version__ = "0.1.0"
