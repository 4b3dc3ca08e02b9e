import re
from pathlib import Path

from cellkd.config import ANNOTATION_SETS, demo_sheet, load_sheet, validate_config

SCHEMAS = Path(workflow.basedir) / "schemas"

validate_config(
    config,
    SCHEMAS / "config.schema.yaml",
    source="workflow config (workflow_config.yaml / --config)",
)

if config["sheet"]:
    SLIDES = load_sheet(config["sheet"], SCHEMAS / "sheet.schema.yaml")
else:
    SLIDES = demo_sheet(config["demo"]["slides"])

STAINS = config["stains"]


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES),
    stain="raw|macenko",


def get_slide_path(wildcards):
    return SLIDES[wildcards.slide].path


def get_slide_mpp(wildcards):
    return SLIDES[wildcards.slide].mpp


def get_rasterize_inputs(wildcards):
    """The raw fragment store plus one named input per annotation set the slide has."""
    return {
        "fragments": f"results/fragments/raw/{wildcards.slide}.h5",
        **SLIDES[wildcards.slide].annotations,
    }


def get_final_outputs(wildcards):
    return expand("results/patches/{stain}/{slide}.h5", stain=STAINS, slide=SLIDES)


def mem_mb_by_attempt(base_mb):
    """Memory request that grows with each retry (--retries), for rules whose peak depends on the slide."""

    def mem_mb(wildcards, attempt):
        return base_mb * attempt

    return mem_mb
