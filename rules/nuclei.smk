rule extract_nuclei:
    input:
        unpack(get_nuclei_inputs),
    output:
        "results/nuclei/{stain}/{slide}.h5",
    log:
        "logs/extract_nuclei/{stain}/{slide}.log",
    benchmark:
        "benchmarks/extract_nuclei/{stain}/{slide}.tsv"
    conda:
        "../envs/cellkd.yaml"
    # Tiled: 0.43-0.47 GiB measured at 8k^2 and 16k^2 px fragments (README, Nuclei). The annotation sets' polygons
    # take ~1.5 KB each (benchmarks/scale.py): ~2.1 GB for three sets of a 470k-nuclei slide.
    resources:
        mem_mb=mem_mb_by_attempt(4000),
        runtime=60,
    params:
        nuclei=config["nuclei"],
        classes=config["classes"],
        seed=config["seed"],
        annotations=config["annotations"],
        mpp_fallback=config["mpp_fallback"],
        patches=config["patches"],
    script:
        "../scripts/extract_nuclei.py"


rule tabulate_label_agreement:
    input:
        nuclei=expand("results/nuclei/{stain}/{slide}.h5", stain=STAINS, slide=SLIDES),
    output:
        csv=report(
            "results/tables/table3.csv",
            caption="../report/table3.rst",
            category="Phase II: labels and teachers",
        ),
        md="results/tables/table3.md",
    log:
        "logs/tabulate_label_agreement.log",
    conda:
        "../envs/cellkd.yaml"
    params:
        stains=STAINS,
        slides=list(SLIDES),
    script:
        "../scripts/tabulate_label_agreement.py"
