rule export_model:
    input:
        unpack(get_export_inputs),
    output:
        directory(f"results/models/{BUNDLE_NAME}"),
    log:
        "logs/export_model.log",
    benchmark:
        "benchmarks/export_model.tsv"
    conda:
        "../envs/cellkd.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=get_export_settings,
    script:
        "../scripts/export_model.py"
