# cellkd: nucleus segmentation and knowledge-distilled nucleus classification in H&E whole-slide images.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow_config.yaml"


# common.smk validates the config and the slide sheet against schemas/ before any job.
include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/preprocess.smk"
include: "rules/segmentation.smk"
include: "rules/nuclei.smk"
include: "rules/teacher.smk"
include: "rules/student.smk"
include: "rules/finetune.smk"
include: "rules/predict.smk"
include: "rules/export.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs,
