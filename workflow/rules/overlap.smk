FINAL_OUTPUTS.append("results/overlap")


rule overlap:
    """Phase 4: overlap of the tasks' masks per sparsity, against random masks of the same density."""
    input:
        masks=list(mask_dirs().values()),
    output:
        tables=report(
            directory("results/overlap"),
            patterns=["{file,overlap_heatmaps[.]png}", "{file,overlap[.]csv}"],
            caption="../report/overlap.rst",
            category="4. Mask overlap",
            subcategory="all tasks",
            labels={"task": "all tasks", "file": "{file}"},
        ),
    params:
        config=phase_config("overlap"),
        masks=task_path_args({task: f"{path}/masks.safetensors" for task, path in mask_dirs().items()}),
    log:
        "logs/overlap.log",
    benchmark:
        "logs/benchmarks/overlap.tsv"
    threads: 1
    resources:
        mem_mb=planned("overlap", "mem_mb"),
        disk_mb=planned("overlap", "disk_mb"),
        runtime=planned("overlap", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline overlap --config-json {params.config:q} --masks {params.masks:q} "
        "--out {output.tables:q} > {log} 2>&1"
