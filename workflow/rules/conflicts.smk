CONFLICT_PAIRS = conflict_task_pairs()
FINAL_OUTPUTS.extend(f"results/conflicts/{a}__{b}" for a, b in CONFLICT_PAIRS)


rule conflicts:
    """Phase 5: gradient conflicts between two tasks per layer, module and head."""
    input:
        store_a="results/fisher/{task_a}.zarr",
        store_b="results/fisher/{task_b}.zarr",
    output:
        tables=report(
            directory("results/conflicts/{task_a}__{task_b}"),
            patterns=["{file,heatmap_.+[.]png}", "{file,conflicts[.]csv}"],
            caption="../report/conflicts.rst",
            category="5. Gradient conflicts",
            subcategory="{task_a} vs {task_b}",
            labels={"pair": "{task_a} vs {task_b}", "file": "{file}"},
        ),
    params:
        config=phase_config("conflicts"),
    wildcard_constraints:
        task_a="|".join(TASKS),
        task_b="|".join(TASKS),
    log:
        "logs/conflicts/{task_a}__{task_b}.log",
    benchmark:
        "logs/benchmarks/conflicts/{task_a}__{task_b}.tsv"
    # the pair engine keeps about one core busy (reading float16 slices, then one product per
    # block): declaring one lets two pairs run at once on a 2-core machine
    threads: 1
    resources:
        mem_mb=planned("conflicts", "mem_mb"),
        disk_mb=planned("conflicts", "disk_mb"),
        runtime=planned("conflicts", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline conflicts --config-json {params.config:q} "
        "--stores {wildcards.task_a}={input.store_a:q} {wildcards.task_b}={input.store_b:q} "
        "--out {output.tables:q} > {log} 2>&1"
