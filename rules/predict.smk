rule predict:
    input:
        expand("results/predict/{slide}.geojson", slide=PREDICT_SLIDES),


rule classify_slide:
    input:
        nuclei=f"results/nuclei/{PREDICT['stain']}/{{slide}}.h5",
        model=get_predict_model,
    output:
        "results/predict/{slide}.geojson",
    log:
        "logs/classify_slide/{slide}.log",
    benchmark:
        "benchmarks/classify_slide/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        classes=config["classes"],
        include_background=PREDICT["include_background"],
    script:
        "../scripts/classify_slide.py"
