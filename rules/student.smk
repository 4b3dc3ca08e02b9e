rule cache_teacher_logits:
    input:
        model=get_distilled_teacher,
        nuclei=get_nuclei_stores,
    output:
        "results/student/{stain}/{labels}/teacher_logits.h5",
    log:
        "logs/cache_teacher_logits/{stain}/{labels}.log",
    benchmark:
        "benchmarks/cache_teacher_logits/{stain}/{labels}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    script:
        "../scripts/cache_teacher_logits.py"


rule train_student:
    input:
        logits="results/student/{stain}/{labels}/teacher_logits.h5",
        nuclei=get_nuclei_stores,
    output:
        model="results/student/{stain}/{labels}/model.pt",
        history="results/student/{stain}/{labels}/history.csv",
    log:
        "logs/train_student/{stain}/{labels}.log",
    benchmark:
        "benchmarks/train_student/{stain}/{labels}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
        gpu=1,
    params:
        train=get_student_train_params,
        validate_against=config["student"]["validate_against"],
    script:
        "../scripts/train_student.py"


rule evaluate_student:
    input:
        model="results/student/{stain}/{labels}/model.pt",
        teacher=get_distilled_teacher,
        nuclei=get_nuclei_stores,
    output:
        metrics="results/student/{stain}/{labels}/metrics.csv",
        confusion=report(
            "results/student/{stain}/{labels}/confusion.png",
            caption="../report/confusion.rst",
            category="Phase III: student",
            subcategory="{stain} / {labels}",
        ),
    log:
        "logs/evaluate_student/{stain}/{labels}.log",
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/evaluate_student.py"


rule tabulate_students:
    input:
        metrics=expand(
            "results/student/{stain}/{labels}/metrics.csv",
            stain=STAINS,
            labels=config["teacher"]["labels"],
        ),
    output:
        csv=report(
            "results/tables/table5.csv",
            caption="../report/table5.rst",
            category="Phase III: student",
        ),
        md="results/tables/table5.md",
    log:
        "logs/tabulate_students.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        labels=config["teacher"]["labels"],
    script:
        "../scripts/tabulate_students.py"
