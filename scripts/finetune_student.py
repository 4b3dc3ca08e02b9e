"""Snakemake adapter: fine-tune the student on N expert labels per class over the lr x dropout grid, for every
count of ``finetune.counts`` in this one job (each count into the folder of its ``output.models`` file)."""

from pathlib import Path

from cellkd.device import set_default_device
from cellkd.training.finetune import FinetuneParams, finetune_student_counts
from cellkd.workflow import limit_threads, log_to

log_to(snakemake.log[0])
limit_threads(snakemake.threads)
set_default_device(snakemake.config["device"])
# expand() in the rule lists the outputs in params.counts order
out_dirs = {
    int(count): Path(model).parent
    for count, model in zip(snakemake.params.counts, snakemake.output.models, strict=True)
}
finetune_student_counts(
    snakemake.input.student,
    snakemake.input.nuclei,
    out_dirs,
    FinetuneParams.from_dict(snakemake.params.finetune),
)
