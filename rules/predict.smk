rule predict:
    input:
        expand("results/predict/{slide}.geojson", slide=PREDICT_SLIDES),


rule classify_slide:
    input:
        nuclei=f"results/nuclei/{PREDICT['stain']}/{{slide}}.h5",
        # the slide's mpp (fragment store attrs), for the nucleus areas in µm²
        fragments=f"results/fragments/{PREDICT['stain']}/{{slide}}.h5",
        model=get_predict_model,
    output:
        "results/predict/{slide}.geojson",
    log:
        "logs/classify_slide/{slide}.log",
    benchmark:
        "benchmarks/classify_slide/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: JOB_THREADS
    # Flat in the nuclei: crops stream through the classifier (~0.8 GB peak, the same at 4k and 20k rows) and the
    # GeoJSON is written 16k outlines at a time. Paper slide (449,861 nuclei, 1 thread, CPU): 0.9 GB job peak; the
    # export alone 0.39 GB (it was 3.2 GB while it held every outline: the 3,669 MB job peak of benchmarks/scale.py).
    # 2500 leaves room for a CUDA runtime's host memory (not measured) and 2 threads.
    resources:
        mem_mb=mem_mb_by_attempt(2500),
        runtime=30,
        gpu=GPU_JOBS,
    params:
        classes=config["classes"],
        include_background=PREDICT["include_background"],
        object_type=PREDICT["object_type"],
    script:
        "../scripts/classify_slide.py"
