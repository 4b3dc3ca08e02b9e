rule train_teacher:
    input:
        nuclei=get_nuclei_stores,
    output:
        model="results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/model.pt",
        history="results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/history.csv",
    log:
        "logs/train_teacher/{stain}/{weak_set}/{arch}/seed{seed}.log",
    benchmark:
        "benchmarks/train_teacher/{stain}/{weak_set}/{arch}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    resources:
        # Grows by the uint8 crops: +4.5 KB per nucleus (VGG-4, 2 threads, benchmarks/classifier_memory.py),
        # 1.35 GB at 40k nuclei, ~3.3 GB projected at the paper slide's 470k.
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
        gpu=GPU_JOBS,
    params:
        train=get_teacher_train_params,
        label_set=lambda wildcards: wildcards.weak_set,
    script:
        "../scripts/train_classifier.py"


rule evaluate_teacher:
    input:
        model="results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/model.pt",
        nuclei=get_nuclei_stores,
    output:
        metrics="results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/metrics.csv",
        confusion=report(
            "results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/confusion.png",
            caption="../report/confusion.rst",
            category="Phase II: labels and teachers",
            subcategory="{stain} / {weak_set} / {arch} / seed {seed}",
        ),
        # The teacher's logits of every nucleus, from the pass that scores it: the distilled teacher's are the
        # student's targets (train_student), so that no second job runs the teacher over the nuclei again.
        logits="results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/logits.h5",
    log:
        "logs/evaluate_teacher/{stain}/{weak_set}/{arch}/seed{seed}.log",
    benchmark:
        "benchmarks/evaluate_teacher/{stain}/{weak_set}/{arch}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    # 1 thread: a few seconds of start-up and one small pass; on a 2-core machine two such jobs then run side by
    # side (measured on the 3-seed demo: 2 threads gave 1.3-1.6x CPU per wall second). Raise with --set-threads.
    threads: 1
    resources:
        # Flat in the nuclei (crops streamed from disk, 16 B of logits each): 792 and 747 MiB at 5k and 40k with the
        # metrics and figure (benchmarks/classifier_memory.py, 1 thread); 4000 kept: a CUDA runtime adds host memory
        # that was not measured.
        mem_mb=4000,
        runtime=60,
        gpu=GPU_JOBS,
    script:
        "../scripts/evaluate_classifier.py"


rule tabulate_teachers:
    input:
        metrics=expand(
            "results/teacher/{stain}/{weak_set}/{arch}/seed{seed}/metrics.csv",
            stain=STAINS,
            weak_set=config["teacher"]["labels"],
            arch=config["teacher"]["archs"],
            seed=SEEDS,
        ),
    output:
        csv=report(
            "results/tables/table4.csv",
            caption="../report/table4.rst",
            category="Phase II: labels and teachers",
        ),
        per_seed="results/tables/table4_per_seed.csv",
        md="results/tables/table4.md",
    log:
        "logs/tabulate_teachers.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        labels=config["teacher"]["labels"],
        archs=config["teacher"]["archs"],
        seeds=SEEDS,
    script:
        "../scripts/tabulate_teachers.py"
