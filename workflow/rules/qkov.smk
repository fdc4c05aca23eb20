QKOV_PAIRS = qkov_task_pairs()
FINAL_OUTPUTS.extend(f"results/qkov/{a}__{b}" for a, b in QKOV_PAIRS)


rule qkov:
    """Phase 6: Q/K/V/O interference of task A with task B (ordered) per layer, block and head."""
    input:
        store_a="results/fisher/{task_a}.zarr",
        store_b="results/fisher/{task_b}.zarr",
    output:
        tables=report(
            directory("results/qkov/{task_a}__{task_b}"),
            patterns=["{file,figure_.+[.]png}", "{file,cells[.]csv}", "{file,top_conflicts[.]csv}"],
            caption="../report/qkov.rst",
            category="6. Q/K/V/O interference",
            subcategory="{task_a} -> {task_b}",
            labels={"pair": "{task_a} -> {task_b}", "file": "{file}"},
        ),
    params:
        config=phase_config("qkov"),
    wildcard_constraints:
        task_a="|".join(TASKS),
        task_b="|".join(TASKS),
    log:
        "logs/qkov/{task_a}__{task_b}.log",
    benchmark:
        "logs/benchmarks/qkov/{task_a}__{task_b}.tsv"
    # the pair engine keeps about one core busy (reading float16 slices, then one product per
    # block): declaring one lets two pairs run at once on a 2-core machine
    threads: 1
    resources:
        mem_mb=planned("qkov", "mem_mb"),
        disk_mb=planned("qkov", "disk_mb"),
        runtime=planned("qkov", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline qkov --config-json {params.config:q} "
        "--stores {wildcards.task_a}={input.store_a:q} {wildcards.task_b}={input.store_b:q} "
        "--out {output.tables:q} > {log} 2>&1"
