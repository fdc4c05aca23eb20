FINAL_OUTPUTS.extend([*expand("results/scaled/{task}", task=TASKS), "results/scaled/cross_task"])


rule scaled:
    """Phase 7: mean and natural-gradient norms of one task per group, tensor, layer and model."""
    input:
        store="results/fisher/{task}.zarr",
    output:
        tables=directory("results/scaled/{task}"),
    params:
        config=phase_config("scaled"),
    log:
        "logs/scaled/{task}.log",
    benchmark:
        "logs/benchmarks/scaled/{task}.tsv"
    threads: 1
    resources:
        mem_mb=planned("scaled", "mem_mb"),
        disk_mb=planned("scaled", "disk_mb"),
        runtime=planned("scaled", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline scaled --config-json {params.config:q} --store {input.store:q} "
        "--task {wildcards.task} --out {output.tables:q} > {log} 2>&1"


rule scaled_cross:
    """Phase 7 across tasks: cosines of natural gradients and EWC costs between task pairs."""
    input:
        stores=list(fisher_stores().values()),
    output:
        tables=report(
            directory("results/scaled/cross_task"),
            patterns=["{file,(natgrad_cosine|ewc_cost)[.]png}", "{file,ewc_cost[.]csv}"],
            caption="../report/scaled_cross.rst",
            category="7. Natural gradients",
            subcategory="all tasks",
            labels={"task": "all tasks", "file": "{file}"},
        ),
    params:
        config=phase_config("scaled"),
        stores=task_path_args(fisher_stores()),
    log:
        "logs/scaled/cross_task.log",
    benchmark:
        "logs/benchmarks/scaled/cross_task.tsv"
    threads: 1
    resources:
        mem_mb=planned("scaled_cross", "mem_mb"),
        disk_mb=planned("scaled_cross", "disk_mb"),
        runtime=planned("scaled_cross", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline scaled-cross --config-json {params.config:q} --stores {params.stores:q} "
        "--out {output.tables:q} > {log} 2>&1"
