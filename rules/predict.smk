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
    # Holds every exported outline while it writes the GeoJSON: 3,669 MB peak at the paper's slide (449,861 nuclei,
    # benchmarks/scale.py at scale 1).
    resources:
        mem_mb=mem_mb_by_attempt(5000),
        runtime=30,
        gpu=GPU_JOBS,
    params:
        classes=config["classes"],
        include_background=PREDICT["include_background"],
        object_type=PREDICT["object_type"],
    script:
        "../scripts/classify_slide.py"
