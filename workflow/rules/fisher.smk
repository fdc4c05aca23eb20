FINAL_OUTPUTS.extend(fisher_stores().values())


rule fisher:
    """Phase 1: per-sample gradients -> Welford Fisher statistics -> results/fisher/{task}.zarr."""
    input:
        model=model_input(),
    output:
        store=directory("results/fisher/{task}.zarr"),
    params:
        config=lambda wildcards: phase1_config(wildcards.task),
    log:
        "logs/fisher/{task}.log",
    benchmark:
        "logs/benchmarks/fisher/{task}.tsv"
    threads: 2
    resources:
        mem_mb=12000,
        runtime=60,
    shell:
        "$FISHER_PYTHON -m fisher_pipeline fisher --task {wildcards.task} --config-json {params.config:q} "
        "--out {output.store} --threads {threads} 2> {log}"
