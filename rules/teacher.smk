rule train_teacher:
    input:
        nuclei=get_nuclei_stores,
    output:
        model="results/teacher/{stain}/{weak_set}/{arch}/model.pt",
        history="results/teacher/{stain}/{weak_set}/{arch}/history.csv",
    log:
        "logs/train_teacher/{stain}/{weak_set}/{arch}.log",
    benchmark:
        "benchmarks/train_teacher/{stain}/{weak_set}/{arch}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
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
        model="results/teacher/{stain}/{weak_set}/{arch}/model.pt",
        nuclei=get_nuclei_stores,
    output:
        metrics="results/teacher/{stain}/{weak_set}/{arch}/metrics.csv",
        confusion=report(
            "results/teacher/{stain}/{weak_set}/{arch}/confusion.png",
            caption="../report/confusion.rst",
            category="Phase II: labels and teachers",
            subcategory="{stain} / {weak_set} / {arch}",
        ),
    log:
        "logs/evaluate_teacher/{stain}/{weak_set}/{arch}.log",
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/evaluate_classifier.py"


rule tabulate_teachers:
    input:
        metrics=expand(
            "results/teacher/{stain}/{weak_set}/{arch}/metrics.csv",
            stain=STAINS,
            weak_set=config["teacher"]["labels"],
            arch=config["teacher"]["archs"],
        ),
    output:
        csv=report(
            "results/tables/table4.csv",
            caption="../report/table4.rst",
            category="Phase II: labels and teachers",
        ),
        md="results/tables/table4.md",
    log:
        "logs/tabulate_teachers.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        labels=config["teacher"]["labels"],
        archs=config["teacher"]["archs"],
    script:
        "../scripts/tabulate_teachers.py"
