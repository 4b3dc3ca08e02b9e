rule train_segmentation:
    input:
        patches=get_segmentation_patch_stores,
        pixels=get_segmentation_pixel_stores,
    output:
        model="results/segmentation/{stain}/{arch}/seed{seed}/model.pt",
        history="results/segmentation/{stain}/{arch}/seed{seed}/history.csv",
    log:
        "logs/train_segmentation/{stain}/{arch}/seed{seed}.log",
    benchmark:
        "benchmarks/train_segmentation/{stain}/{arch}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    resources:
        mem_mb=mem_mb_by_attempt(8000),
        runtime=240,
        gpu=GPU_JOBS,
    params:
        train=get_segmentation_train_params,
    script:
        "../scripts/train_segmentation.py"


rule evaluate_segmentation:
    input:
        model="results/segmentation/{stain}/{arch}/seed{seed}/model.pt",
        patches=get_segmentation_patch_stores,
        pixels=get_segmentation_pixel_stores,
    output:
        "results/segmentation/{stain}/{arch}/seed{seed}/metrics.csv",
    log:
        "logs/evaluate_segmentation/{stain}/{arch}/seed{seed}.log",
    benchmark:
        "benchmarks/evaluate_segmentation/{stain}/{arch}/seed{seed}.tsv"
    conda:
        "../envs/cellkd.yaml"
    # 1 thread: a few seconds of start-up and one small pass; on a 2-core machine two such jobs then run side by
    # side (measured on the 3-seed demo: 2 threads gave 1.3-1.6x CPU per wall second). Raise with --set-threads.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        references=get_segmentation_references,
    script:
        "../scripts/evaluate_segmentation.py"


# The architecture with the best MEAN test Dice over the seeds; its FIRST seed's model (seeds[0]) then segments
# every slide (segment_slide), so nuclei, classifiers and predictions rest on one segmentation per slide: training
# seeds vary the classifiers, not the data they learn from.
rule select_segmentation:
    input:
        metrics=expand(
            "results/segmentation/{{stain}}/{arch}/seed{seed}/metrics.csv",
            arch=config["segmentation"]["archs"],
            seed=SEEDS,
        ),
    output:
        "results/segmentation/{stain}/selected.json",
    log:
        "logs/select_segmentation/{stain}.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        archs=config["segmentation"]["archs"],
        seeds=SEEDS,
        reference=config["segmentation"]["mask_set"],
    script:
        "../scripts/select_segmentation.py"


rule tabulate_segmentation:
    input:
        metrics=expand(
            "results/segmentation/{stain}/{arch}/seed{seed}/metrics.csv",
            stain=STAINS,
            arch=config["segmentation"]["archs"],
            seed=SEEDS,
        ),
    output:
        csv=report(
            "results/tables/table2.csv",
            caption="../report/table2.rst",
            category="Phase I: segmentation",
        ),
        per_seed="results/tables/table2_per_seed.csv",
        md="results/tables/table2.md",
    log:
        "logs/tabulate_segmentation.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        archs=config["segmentation"]["archs"],
        seeds=SEEDS,
    script:
        "../scripts/tabulate_segmentation.py"


rule tabulate_instances:
    input:
        nuclei=expand(
            "results/nuclei/{stain}/{slide}.h5",
            stain=STAINS,
            slide=slides_with("truth"),
        ),
        truth=[SLIDES[slide].annotations["truth"] for slide in slides_with("truth")],
        fragments=expand("results/fragments/raw/{slide}.h5", slide=slides_with("truth")),
    output:
        csv=report(
            "results/tables/table2_instances.csv",
            caption="../report/table2_instances.rst",
            category="Phase I: segmentation",
        ),
        md="results/tables/table2_instances.md",
    log:
        "logs/tabulate_instances.log",
    benchmark:
        "benchmarks/tabulate_instances.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        stains=STAINS,
        slides=slides_with("truth"),
        classes=config["classes"],
        annotations=config["annotations"],
        mpp_fallback=config["mpp_fallback"],
    script:
        "../scripts/tabulate_instances.py"


# Segments what segment_slide_per_arch does not: the predict-only slides; with predict_model, every slide.
rule segment_slide:
    input:
        # the selected architecture's first-seed model.pt, or the predict_model bundle's weights
        unpack(get_segmentation_model_inputs),
        fragments="results/fragments/{stain}/{slide}.h5",
    output:
        "results/segmentation/{stain}/masks/{slide}.h5",
    log:
        "logs/segment_slide/{stain}/{slide}.log",
    benchmark:
        "benchmarks/segment_slide/{stain}/{slide}.tsv"
    wildcard_constraints:
        slide=name_pattern(SEGMENTED_SLIDES),
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
        gpu=GPU_JOBS,
    params:
        inference=config["segmentation"]["inference"],
    script:
        "../scripts/segment_slide.py"


# Figure 4 compares every architecture with QuPath, not only the selected one (as the paper does for U-Net
# and U-Net++). Each architecture's first seed (as segment_slide): one segmentation per slide and arch, not one
# per seed. Which one is selected is known only once selected.json exists: copy_selected_masks then copies its
# masks for the nuclei and predict steps, so no slide is segmented twice with the same model.
rule segment_slide_per_arch:
    input:
        model=f"results/segmentation/{{stain}}/{{arch}}/seed{SEEDS[0]}/model.pt",
        fragments="results/fragments/{stain}/{slide}.h5",
    output:
        "results/segmentation/{stain}/{arch}/masks/{slide}.h5",
    log:
        "logs/segment_slide_per_arch/{stain}/{arch}/{slide}.log",
    benchmark:
        "benchmarks/segment_slide_per_arch/{stain}/{arch}/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
        gpu=GPU_JOBS,
    params:
        inference=config["segmentation"]["inference"],
    script:
        "../scripts/segment_slide.py"


# A file copy: run where Snakemake runs, not submitted to a cluster.
localrules:
    copy_selected_masks,


# The training slides' masks: the selected architecture's (first seed) Figure 4 masks, checked to be that model's.
rule copy_selected_masks:
    input:
        selected="results/segmentation/{stain}/selected.json",
        masks=expand(
            "results/segmentation/{{stain}}/{arch}/masks/{{slide}}.h5",
            arch=config["segmentation"]["archs"],
        ),
    output:
        "results/segmentation/{stain}/masks/{slide}.h5",
    log:
        "logs/copy_selected_masks/{stain}/{slide}.log",
    benchmark:
        "benchmarks/copy_selected_masks/{stain}/{slide}.tsv"
    wildcard_constraints:
        slide=name_pattern(COPIED_MASK_SLIDES),
    conda:
        "../envs/cellkd.yaml"
    params:
        archs=config["segmentation"]["archs"],
    script:
        "../scripts/copy_selected_masks.py"


rule compare_with_qupath:
    input:
        predicted=expand(
            "results/segmentation/{stain}/{arch}/masks/{slide}.h5",
            stain=STAINS,
            arch=config["segmentation"]["archs"],
            slide=SLIDES,
        ),
        masks=expand("results/masks/{slide}.h5", slide=SLIDES),
    output:
        csv="results/tables/figure4.csv",
        md="results/tables/figure4.md",
        png=report(
            "results/report/figure4.png",
            caption="../report/figure4.rst",
            category="Phase I: segmentation",
        ),
    log:
        "logs/compare_with_qupath.log",
    benchmark:
        "benchmarks/compare_with_qupath.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        stains=STAINS,
        archs=config["segmentation"]["archs"],
        slides=list(SLIDES),
        references=[config["segmentation"]["mask_set"], "truth"],
        level=config["segmentation"]["inference"]["level"],
    script:
        "../scripts/compare_with_qupath.py"
