rule plot_training_curves:
    input:
        unpack(get_training_histories),
    output:
        report(
            "results/report/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training curves",
        ),
    log:
        "logs/plot_training_curves.log",
    conda:
        "../envs/cellkd.yaml"
    script:
        "../scripts/plot_training_curves.py"


rule plot_prediction_overlay:
    input:
        fragments=f"results/fragments/{PREDICT['stain']}/{{slide}}.h5",
        predictions="results/predict/{slide}.geojson",
    output:
        report(
            "results/report/overlays/{slide}.png",
            caption="../report/overlay.rst",
            category="Phase IV: human in the loop",
            subcategory="predictions",
            labels={"slide": "{slide}"},
        ),
    log:
        "logs/plot_prediction_overlay/{slide}.log",
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=2000,
    params:
        classes=config["classes"],
        include_background=PREDICT["include_background"],
    script:
        "../scripts/plot_prediction_overlay.py"
