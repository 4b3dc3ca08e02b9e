rule train_student:
    input:
        logits=get_distilled_teacher_logits,  # written by that teacher's evaluate_teacher job
        nuclei=get_nuclei_stores,
    output:
        model="results/student/{stain}/{weak_set}/seed{seed}/model.pt",
        history="results/student/{stain}/{weak_set}/seed{seed}/history.csv",
    log:
        "logs/train_student/{stain}/{weak_set}/seed{seed}.log",
    benchmark:
        "benchmarks/train_student/{stain}/{weak_set}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    resources:
        # Grows by the uint8 crops: +5.0 KB per nucleus (RCCNet, 2 threads, benchmarks/classifier_memory.py),
        # 1.2 GB at 40k nuclei, ~3.3 GB projected at the paper slide's 470k.
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
        gpu=GPU_JOBS,
    params:
        train=get_student_train_params,
        label_set=config["student"]["validate_against"],  # validation labels; the targets are the teacher's
    script:
        "../scripts/train_classifier.py"


rule evaluate_student:
    input:
        model="results/student/{stain}/{weak_set}/seed{seed}/model.pt",
        teacher=get_distilled_teacher,
        nuclei=get_nuclei_stores,
    output:
        metrics="results/student/{stain}/{weak_set}/seed{seed}/metrics.csv",
        confusion=report(
            "results/student/{stain}/{weak_set}/seed{seed}/confusion.png",
            caption="../report/confusion.rst",
            category="Phase III: student",
            subcategory="{stain} / {weak_set} / seed {seed}",
        ),
    log:
        "logs/evaluate_student/{stain}/{weak_set}/seed{seed}.log",
    conda:
        "../envs/cellkd.yaml"
    # 1 thread: a few seconds of start-up and one small pass; on a 2-core machine two such jobs then run side by
    # side (measured on the 3-seed demo: 2 threads gave 1.3-1.6x CPU per wall second). Raise with --set-threads.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/evaluate_classifier.py"


rule tabulate_students:
    input:
        metrics=expand(
            "results/student/{stain}/{weak_set}/seed{seed}/metrics.csv",
            stain=STAINS,
            weak_set=config["teacher"]["labels"],
            seed=SEEDS,
        ),
    output:
        csv=report(
            "results/tables/table5.csv",
            caption="../report/table5.rst",
            category="Phase III: student",
        ),
        per_seed="results/tables/table5_per_seed.csv",
        md="results/tables/table5.md",
    log:
        "logs/tabulate_students.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        labels=config["teacher"]["labels"],
        seeds=SEEDS,
    script:
        "../scripts/tabulate_students.py"
