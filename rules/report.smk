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
