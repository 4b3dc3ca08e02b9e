# Seed s fine-tunes the student of seed s and draws its expert subsets (train / validation / test) with seed s:
# the draw is a real source of variance, so Table 6's CI covers it.
# One job per student runs every count of finetune.counts, one after the other, into each count's own folder: the
# files are those of one job per count (cellkd.training.finetune.finetune_student_counts), without the interpreter
# and torch start-up of the other jobs (2-4.5 s each, as long as a demo count's fine-tuning). A job killed mid-way
# reruns whole; the grid point it was training resumes from its checkpoints.
rule finetune_student:
    input:
        student="results/student/{stain}/{weak_set}/seed{seed}/model.pt",
        nuclei=get_expert_nuclei_stores,
    output:
        models=expand(
            "results/finetune/{{stain}}/{{weak_set}}/n{per_class}/seed{{seed}}/model.pt",
            per_class=config["finetune"]["counts"],
        ),
        metrics=expand(
            "results/finetune/{{stain}}/{{weak_set}}/n{per_class}/seed{{seed}}/metrics.csv",
            per_class=config["finetune"]["counts"],
        ),
        grids=expand(
            "results/finetune/{{stain}}/{{weak_set}}/n{per_class}/seed{{seed}}/grid.csv",
            per_class=config["finetune"]["counts"],
        ),
    log:
        "logs/finetune_student/{stain}/{weak_set}/seed{seed}.log",
    benchmark:
        "benchmarks/finetune_student/{stain}/{weak_set}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    # 1 thread: a few seconds of start-up and small passes; on a 2-core machine two such jobs then run side by
    # side (measured on the 3-seed demo: 2 threads gave 1.3-1.6x CPU per wall second). Raise with --set-threads.
    threads: 1
    resources:
        mem_mb=mem_mb_by_attempt(4000),  # one count at a time
        runtime=120 * len(config["finetune"]["counts"]),  # what one job per count asked for, summed
        gpu=GPU_JOBS,
    params:
        finetune=get_finetune_params,
        counts=config["finetune"]["counts"],
    script:
        "../scripts/finetune_student.py"


rule tabulate_finetune:
    input:
        metrics=expand(
            "results/finetune/{stain}/{weak_set}/n{per_class}/seed{seed}/metrics.csv",
            stain=STAINS,
            weak_set=config["teacher"]["labels"],
            per_class=config["finetune"]["counts"],
            seed=SEEDS,
        ),
        # the chosen grid point's epochs (Table 6 reads each beside its metrics.csv)
        grids=expand(
            "results/finetune/{stain}/{weak_set}/n{per_class}/seed{seed}/grid.csv",
            stain=STAINS,
            weak_set=config["teacher"]["labels"],
            per_class=config["finetune"]["counts"],
            seed=SEEDS,
        ),
    output:
        csv=report(
            "results/tables/table6.csv",
            caption="../report/table6.rst",
            category="Phase IV: human in the loop",
        ),
        per_seed="results/tables/table6_per_seed.csv",
        md="results/tables/table6.md",
        png=report(
            "results/report/finetune_curve.png",
            caption="../report/finetune_curve.rst",
            category="Phase IV: human in the loop",
        ),
    log:
        "logs/tabulate_finetune.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        labels=config["teacher"]["labels"],
        counts=config["finetune"]["counts"],
        seeds=SEEDS,
    script:
        "../scripts/tabulate_finetune.py"
