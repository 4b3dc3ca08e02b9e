import copy
import itertools
import re
from pathlib import Path

from snakemake.logging import logger

from cellkd.config import (
    ANNOTATION_SETS,
    apply_preset,
    demo_sheet,
    gpu_jobs,
    load_sheet,
    plan_phases,
    validate_config,
)
from cellkd.classes import classes_from_config
from cellkd.errors import ConfigError
from cellkd.bundle import bundle_config, read_bundle

SCHEMAS = Path(workflow.basedir) / "schemas"

# The keys the user set, before any preset or default: linked keys left out follow the sheet (plan_phases).
GIVEN_CONFIG = copy.deepcopy(config)
PRESET = apply_preset(config, Path(workflow.basedir) / "config")
validate_config(
    config,
    SCHEMAS / "config.schema.yaml",
    source="workflow config (workflow_config.yaml / --config)",
)

if config["sheet"]:
    SLIDES = load_sheet(config["sheet"], SCHEMAS / "sheet.schema.yaml")
else:
    SLIDES = demo_sheet(config["demo"]["slides"])

# Threads of the jobs that can use several (torch's intra-op threads; extract_fragments' tile decoders): the scripts
# pass them on (cellkd.workflow.limit_threads). The demo's small models, batches and slides keep about one core busy
# (measured on the 3-seed demo at 2 threads: training 0.9-1.0 CPU s per wall s), so there each asks for 1 and
# `--cores 2` runs two side by side; a real sheet's ask for 2. Raise a rule's with `--set-threads RULE=N` (the SLURM
# profile does). Torch's float sums depend on the thread count: the same seed gives the same models at the same
# threads, and differs in rounding at other threads (measured: up to 9e-4 on a VGG-4's weights after 2 epochs).
JOB_THREADS = 2 if config["sheet"] else 1

# Fail fast: which phases the sheet can feed, and the annotation-set keys that follow from it.
PHASES = plan_phases(config, GIVEN_CONFIG, SLIDES)
for note in (PRESET, *PHASES.notes):
    logger.info(note)

# `gpu` resource of the training and inference jobs: the profile caps it (profiles/default: gpu=1), so that
# `--cores 16` runs one of them at a time on a GPU node; 0 on CPU, where they may run side by side.
# The device itself is read by each job from config["device"] (not a param: changing it reruns nothing).
GPU_JOBS = gpu_jobs(config["device"])

# Slides to classify with `snakemake predict`: a sheet of their own, or the first training slide.
if config["predict_sheet"]:
    PREDICT_SLIDES = load_sheet(config["predict_sheet"], SCHEMAS / "sheet.schema.yaml")
else:
    PREDICT_SLIDES = dict(list(SLIDES.items())[:1])
reused = sorted(
    s for s in set(PREDICT_SLIDES) & set(SLIDES) if PREDICT_SLIDES[s] != SLIDES[s]
)
if reused:
    raise ConfigError(
        f"{config['predict_sheet']}: slide ids {reused} are also in the training sheet with other files; rename them"
    )
# `snakemake predict --config predict_model=results/models/<name>`: predict with an exported bundle, so nothing
# is trained; its classes must match the config's, and its stain, resolution and sizes replace the config's.
PREDICT_MODEL = config["predict_model"]
if PREDICT_MODEL:
    if not config["predict_sheet"]:
        raise ConfigError(
            f"predict_model is {PREDICT_MODEL}, but predict_sheet is empty; set predict_sheet to a TSV of the "
            "slides to classify (slide, path[, mpp])"
        )
    BUNDLE = read_bundle(PREDICT_MODEL, classes_from_config(config["classes"]))
    for note in bundle_config(config, BUNDLE):
        logger.info(note)
# Every slide that is preprocessed and segmented; training uses SLIDES only.
ALL_SLIDES = {**SLIDES, **PREDICT_SLIDES}
PREDICT = config["predict"]
PREDICT_COUNT = PREDICT["count"] or max(config["finetune"]["counts"])

STAINS = config["stains"]
# Training seeds: every model is trained (and evaluated) once per seed, and Tables 2, 4-6 report mean ± 95% CI
# over them. `seed` stays the data seed (demo slides, splits), so every training seed sees the same data. What
# segments the slides, and what predict and export_model use, is the first seed's model.
SEEDS = config["seeds"]
FIRST_SEED = SEEDS[0]
if PREDICT["stain"] not in STAINS and not PREDICT_MODEL:
    raise ConfigError(
        f"predict.stain {PREDICT['stain']!r} is not in stains {STAINS}; add it or change predict.stain"
    )
DATASETS = {d["name"]: d for d in config["public_datasets"]}
clashes = sorted(set(DATASETS) & set(SLIDES))
if clashes:
    raise ConfigError(
        f"public_datasets names {clashes} are also slide ids; rename the datasets"
    )


def name_pattern(names):
    """Regex (a wildcard constraint) matching exactly ``names``; one that matches nothing when there are none."""
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


# Slides whose masks (results/segmentation/{stain}/masks/) are the selected architecture's Figure 4 masks, copied
# (by copy_selected_masks): the training slides, which segment_slide_per_arch segments with every architecture
# anyway. segment_slide segments the others: the predict-only slides, or every slide with predict_model.
COPIED_MASK_SLIDES = [] if PREDICT_MODEL else list(SLIDES)
SEGMENTED_SLIDES = [s for s in ALL_SLIDES if s not in COPIED_MASK_SLIDES]


wildcard_constraints:
    slide=name_pattern(ALL_SLIDES),
    stain="raw|macenko",
    dataset=name_pattern(DATASETS),
    arch="[a-z0-9]+",
    weak_set="ssa|wsa",
    seed=r"\d+",


def get_slide_path(wildcards):
    return ALL_SLIDES[wildcards.slide].path


def get_slide_mpp(wildcards):
    return ALL_SLIDES[wildcards.slide].mpp


def get_rasterize_inputs(wildcards):
    """The raw fragment store plus one named input per annotation set the slide has."""
    return {
        "fragments": f"results/fragments/raw/{wildcards.slide}.h5",
        **ALL_SLIDES[wildcards.slide].annotations,
    }


def slides_with(annotation_set):
    return [
        slide for slide, entry in SLIDES.items() if annotation_set in entry.annotations
    ]


def get_segmentation_patch_stores(wildcards):
    """Patch stores of every slide annotated with the segmentation target set, and of the public datasets."""
    mask_set = config["segmentation"]["mask_set"]
    sources = [*slides_with(mask_set), *DATASETS]
    if not sources:
        raise ConfigError(
            f"segmentation.mask_set is {mask_set!r}, but no slide in the sheet has a {mask_set} GeoJSON; "
            "add that column to the sheet, choose another mask_set or add public_datasets"
        )
    return expand(
        "results/patches/{stain}/{source}.h5", stain=wildcards.stain, source=sources
    )


def get_segmentation_pixel_stores(wildcards):
    """The stores the segmentation patch stores read their pixels from (patch stores hold only an index)."""
    mask_set = config["segmentation"]["mask_set"]
    slides = slides_with(mask_set)
    return [
        *expand(
            "results/fragments/{stain}/{slide}.h5", stain=wildcards.stain, slide=slides
        ),
        *expand("results/masks/{slide}.h5", slide=slides),
        *expand(
            "results/patches/{stain}/{dataset}.stores",
            stain=wildcards.stain,
            dataset=DATASETS,
        ),
    ]


def get_segmentation_train_params(wildcards):
    settings = {
        k: v
        for k, v in config["segmentation"].items()
        if k not in ("archs", "inference")
    }
    return {**settings, "arch": wildcards.arch, "seed": int(wildcards.seed)}


def get_segmentation_references(wildcards):
    """Sets the test metrics are computed against: the target, and the truth where every slide has it."""
    mask_set = config["segmentation"]["mask_set"]
    training_slides = slides_with(mask_set)
    extra = [
        s
        for s in ANNOTATION_SETS
        if s != mask_set and set(training_slides) <= set(slides_with(s))
    ]
    return [mask_set, *(s for s in extra if s == "truth")]


def get_nuclei_inputs(wildcards):
    """Predicted masks and fragments of the slide, plus one named input per annotation set it has."""
    return {
        "predicted": f"results/segmentation/{wildcards.stain}/masks/{wildcards.slide}.h5",
        "fragments": f"results/fragments/{wildcards.stain}/{wildcards.slide}.h5",
        **ALL_SLIDES[wildcards.slide].annotations,
    }


def get_nuclei_stores(wildcards):
    """Nuclei stores of every slide that carries the labels a classifier learns from."""
    return expand(
        "results/nuclei/{stain}/{slide}.h5",
        stain=wildcards.stain,
        slide=slides_with(wildcards.weak_set),
    )


def get_teacher_train_params(wildcards):
    settings = {
        k: v for k, v in config["teacher"].items() if k not in ("archs", "labels")
    }
    return {**settings, "arch": wildcards.arch, "seed": int(wildcards.seed)}


def distilled_teacher_file(wildcards, name):
    """``name`` in the run folder of the teacher the student learns from: the first configured teacher
    architecture, of the student's seed."""
    arch = config["teacher"]["archs"][0]
    return f"results/teacher/{wildcards.stain}/{wildcards.weak_set}/{arch}/seed{wildcards.seed}/{name}"


def get_distilled_teacher(wildcards):
    """The distilled teacher's model."""
    return distilled_teacher_file(wildcards, "model.pt")


def get_distilled_teacher_logits(wildcards):
    """The distilled teacher's logits of every nucleus (evaluate_teacher): the student's targets."""
    return distilled_teacher_file(wildcards, "logits.h5")


def get_student_train_params(wildcards):
    settings = {k: v for k, v in config["student"].items() if k != "validate_against"}
    return {**settings, "seed": int(wildcards.seed)}


def get_expert_nuclei_stores(wildcards):
    """Nuclei stores of every slide with expert (EA) labels."""
    if not PHASES.finetune:
        raise ConfigError(
            "fine-tuning (Phase IV) needs expert labels: add an ea column to the sheet"
        )
    return expand(
        "results/nuclei/{stain}/{slide}.h5",
        stain=wildcards.stain,
        slide=slides_with("ea"),
    )


def get_finetune_params(wildcards):
    settings = {k: v for k, v in config["finetune"].items() if k != "counts"}
    # the seed of the student it starts from, which also draws the expert subsets
    return {**settings, "seed": int(wildcards.seed)}


def get_trained_predict_model(wildcards):
    """The first seed's fine-tuned student; its plain distilled student when the sheet has no expert labels."""
    if not PHASES.finetune:
        return f"results/student/{PREDICT['stain']}/{PREDICT['labels']}/seed{FIRST_SEED}/model.pt"
    return f"results/finetune/{PREDICT['stain']}/{PREDICT['labels']}/n{PREDICT_COUNT}/seed{FIRST_SEED}/model.pt"


def get_predict_model(wildcards):
    """The classifier of new slides: the bundle's with predict_model, else the trained one."""
    if PREDICT_MODEL:
        return bundle_weights("classifier")
    return get_trained_predict_model(wildcards)


def bundle_weights(component):
    """The predict_model bundle's weights file of ``component`` (model.json is read beside it)."""
    return str(Path(PREDICT_MODEL) / BUNDLE.manifest[component]["weights"])


def selected_segmentation_inputs(stain):
    """selected.json of ``stain`` and every model.pt it may name: each architecture's first seed."""
    return {
        "selected": f"results/segmentation/{stain}/selected.json",
        "models": expand(
            "results/segmentation/{stain}/{arch}/seed{seed}/model.pt",
            stain=stain,
            arch=config["segmentation"]["archs"],
            seed=FIRST_SEED,
        ),
    }


def get_bundle_stain_reference(wildcards):
    """The predict_model bundle's Macenko target, where it has one; nothing otherwise."""
    if PREDICT_MODEL and BUNDLE.manifest["stain"]["reference"]:
        return {
            "reference": str(
                Path(PREDICT_MODEL) / BUNDLE.manifest["stain"]["reference"]
            )
        }
    return {}


def get_segmentation_model_inputs(wildcards):
    """The segmentation model of segment_slide: the bundle's with predict_model, else the selected architecture."""
    if PREDICT_MODEL:
        return {"model": bundle_weights("segmentation")}
    return selected_segmentation_inputs(wildcards.stain)


# `snakemake export_model` writes the predicting models as a bundle (cellkd.bundle).
BUNDLE_NAME = (
    config["export"]["name"] or f"cellkd-{PREDICT['stain']}-{PREDICT['labels']}"
)


def get_export_inputs(wildcards):
    """The trained models behind `predict`, and what the bundle records about their training.

    The tables are the per-seed ones: the bundle records the rows of its own (first-seed) models.
    """
    stain = PREDICT["stain"]
    tables = {
        "table2": "results/tables/table2_per_seed.csv",
        "table5": "results/tables/table5_per_seed.csv",
    }
    if PHASES.finetune:
        tables["table6"] = "results/tables/table6_per_seed.csv"
    return {
        **selected_segmentation_inputs(stain),
        "classifier": get_trained_predict_model(wildcards),
        "fragments": expand(
            "results/fragments/{stain}/{slide}.h5", stain=stain, slide=SLIDES
        ),
        "nuclei": expand(
            "results/nuclei/{stain}/{slide}.h5", stain=stain, slide=SLIDES
        ),
        **tables,
    }


def get_export_settings(wildcards):
    return {
        "name": BUNDLE_NAME,
        "classes": config["classes"],
        "stain": PREDICT["stain"],
        "macenko": config["macenko"],
        "patch_size": config["patches"]["size"],
        "nuclei": config["nuclei"],
        "inference": config["segmentation"]["inference"],
        "count": PREDICT_COUNT if PHASES.finetune else None,
        "seed": FIRST_SEED,
        "annotation_sets": {s: sorted(e.annotations) for s, e in SLIDES.items()},
        "public_datasets": list(DATASETS),
        "mpp_fallback": config["mpp_fallback"],
    }


def get_training_histories(wildcards):
    """Every history.csv the run writes, named "<phase>|<model label>" for the curve plot (every seed)."""
    histories = {}
    for stain, seed in itertools.product(STAINS, SEEDS):
        for arch in config["segmentation"]["archs"]:
            histories[f"segmentation|{stain}/{arch}/seed{seed}"] = (
                f"results/segmentation/{stain}/{arch}/seed{seed}/history.csv"
            )
        for weak_set in config["teacher"]["labels"]:
            for arch in config["teacher"]["archs"]:
                histories[f"teacher|{stain}/{weak_set}/{arch}/seed{seed}"] = (
                    f"results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/history.csv"
                )
            histories[f"student|{stain}/{weak_set}/seed{seed}"] = (
                f"results/student/{stain}/{weak_set}/seed{seed}/history.csv"
            )
    return histories


def get_final_outputs(wildcards):
    return [
        *expand("results/patches/{stain}/{slide}.h5", stain=STAINS, slide=SLIDES),
        "results/tables/table2.csv",
        # Nucleus-by-nucleus scores need a truth set (the demo's slides have one, real sheets rarely).
        *(["results/tables/table2_instances.csv"] if slides_with("truth") else []),
        "results/tables/figure4.csv",
        "results/tables/table3.csv",
        "results/tables/table4.csv",
        "results/tables/table5.csv",
        *(["results/tables/table6.csv"] if PHASES.finetune else []),
        "results/report/training_curves.png",
        *expand("results/predict/{slide}.geojson", slide=PREDICT_SLIDES),
        *expand("results/report/overlays/{slide}.png", slide=PREDICT_SLIDES),
        *expand(
            "results/segmentation/{stain}/masks/{slide}.h5", stain=STAINS, slide=SLIDES
        ),
    ]


def mem_mb_by_attempt(base_mb):
    """Memory request that grows with each retry (--retries), for rules whose peak depends on the slide."""

    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb


def get_dataset_path(wildcards):
    return DATASETS[wildcards.dataset]["path"]


def get_dataset_kind(wildcards):
    return DATASETS[wildcards.dataset]["kind"]
