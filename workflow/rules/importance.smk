FINAL_OUTPUTS.extend([*expand("results/importance/{task}", task=TASKS), "results/importance/rank_agreement"])


rule importance:
    """Phase 2: Fisher per tensor / head / neuron / layer of one task, and layer x head heatmaps."""
    input:
        store="results/fisher/{task}.zarr",
    output:
        tables=report(
            directory("results/importance/{task}"),
            patterns=["{file,heads_heatmap[.]png}", "{file,(tensors|heads|layers)[.]csv}"],
            caption="../report/importance.rst",
            category="2. Importance",
            subcategory="{task}",
            labels={"task": "{task}", "file": "{file}"},
        ),
    params:
        config=phase_config("importance"),
    log:
        "logs/importance/{task}.log",
    benchmark:
        "logs/benchmarks/importance/{task}.tsv"
    threads: 1
    resources:
        mem_mb=planned("importance", "mem_mb"),
        disk_mb=planned("importance", "disk_mb"),
        runtime=planned("importance", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline importance --config-json {params.config:q} --store {input.store:q} "
        "--task {wildcards.task} --out {output.tables:q} > {log} 2>&1"


rule rank_agreement:
    """Phase 2 across tasks: Spearman rank agreement of Fisher importance between task pairs."""
    input:
        stores=list(fisher_stores().values()),
    output:
        tables=report(
            directory("results/importance/rank_agreement"),
            patterns=["{file,rank_agreement[.](png|csv)}"],
            caption="../report/rank_agreement.rst",
            category="2. Importance",
            subcategory="all tasks",
            labels={"task": "all tasks", "file": "{file}"},
        ),
    params:
        config=phase_config("importance"),
        stores=task_path_args(fisher_stores()),
    log:
        "logs/importance/rank_agreement.log",
    benchmark:
        "logs/benchmarks/importance/rank_agreement.tsv"
    threads: 1
    resources:
        mem_mb=planned("rank_agreement", "mem_mb"),
        disk_mb=planned("rank_agreement", "disk_mb"),
        runtime=planned("rank_agreement", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline rank-agreement --config-json {params.config:q} --stores {params.stores:q} "
        "--out {output.tables:q} > {log} 2>&1"
