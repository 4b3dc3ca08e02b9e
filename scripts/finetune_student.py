"""Snakemake adapter: fine-tune the student on N expert labels per class over the lr x dropout grid."""

from pathlib import Path

from cellkd.device import set_default_device
from cellkd.training.finetune import FinetuneParams, finetune_student
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
finetune_student(
    snakemake.input.student,
    snakemake.input.nuclei,
    int(snakemake.wildcards.per_class),
    Path(snakemake.output.model).parent,
    FinetuneParams.from_dict(snakemake.params.finetune),
)
