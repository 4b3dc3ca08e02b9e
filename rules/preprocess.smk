rule extract_fragments:
    input:
        slide=get_slide_path,
    output:
        "results/fragments/raw/{slide}.h5",
    log:
        "logs/extract_fragments/{slide}.log",
    benchmark:
        "benchmarks/extract_fragments/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    # tiles are decoded by threads (OpenSlide and the codecs release the GIL)
    threads: JOB_THREADS
    resources:
        mem_mb=mem_mb_by_attempt(2000),
        runtime=120,
    params:
        tissue=config["tissue"],
        mpp=get_slide_mpp,
        mpp_fallback=config["mpp_fallback"],
        working_mpp=config["mpp"],
    script:
        "../scripts/extract_fragments.py"


rule normalize_stain:
    input:
        "results/fragments/raw/{slide}.h5",
        # with predict_model: the bundle's Macenko target (also in params), so a new bundle reruns this
        unpack(get_bundle_stain_reference),
    output:
        "results/fragments/macenko/{slide}.h5",
    log:
        "logs/normalize_stain/{slide}.log",
    benchmark:
        "benchmarks/normalize_stain/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=mem_mb_by_attempt(2000),
        runtime=120,
    params:
        macenko=config["macenko"],
        seed=config["seed"],
    script:
        "../scripts/normalize_stain.py"


rule rasterize_annotations:
    input:
        unpack(get_rasterize_inputs),
    output:
        "results/masks/{slide}.h5",
    log:
        "logs/rasterize_annotations/{slide}.log",
    benchmark:
        "benchmarks/rasterize_annotations/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=60,
    params:
        classes=config["classes"],
        annotations=config["annotations"],
        mpp_fallback=config["mpp_fallback"],
    script:
        "../scripts/rasterize_annotations.py"


rule cut_patches:
    input:
        fragments="results/fragments/{stain}/{slide}.h5",
        masks="results/masks/{slide}.h5",
    output:
        "results/patches/{stain}/{slide}.h5",
    log:
        "logs/cut_patches/{stain}/{slide}.log",
    benchmark:
        "benchmarks/cut_patches/{stain}/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=mem_mb_by_attempt(2000),
        runtime=60,
    params:
        patches=config["patches"],
        seed=config["seed"],
    script:
        "../scripts/cut_patches.py"


rule import_public_dataset:
    input:
        get_dataset_path,
    output:
        patches="results/patches/{stain}/{dataset}.h5",
        stores=directory("results/patches/{stain}/{dataset}.stores"),
    log:
        "logs/import_public_dataset/{stain}/{dataset}.log",
    benchmark:
        "benchmarks/import_public_dataset/{stain}/{dataset}.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=120,
    params:
        kind=get_dataset_kind,
        working_mpp=config["mpp"],
        mask_set=config["segmentation"]["mask_set"],
        patches=config["patches"],
        macenko=config["macenko"],
        seed=config["seed"],
    script:
        "../scripts/import_public_dataset.py"
