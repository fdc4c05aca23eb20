FINAL_OUTPUTS.append("results/mask_eval")


rule mask_eval:
    """Every task's masks scored on every task's held-out samples, beside the dense model."""
    input:
        masks=list(mask_dirs().values()),
        model=model_input(),
    output:
        tables=report(
            directory("results/mask_eval"),
            patterns=["{file,mask_eval_(curves|cross)[.]png}", "{file,mask_eval[.]csv}"],
            caption="../report/mask_eval.rst",
            category="3. Masks",
            subcategory="held-out check",
            labels={"task": "all tasks", "file": "{file}"},
        ),
    params:
        config=phase_config("mask_eval", "model", "tasks"),
        masks=task_path_args({task: f"{path}/masks.safetensors" for task, path in mask_dirs().items()}),
    log:
        "logs/mask_eval.log",
    benchmark:
        "logs/benchmarks/mask_eval.tsv"
    threads: 2
    resources:
        mem_mb=planned("mask_eval", "mem_mb"),
        disk_mb=planned("mask_eval", "disk_mb"),
        runtime=planned("mask_eval", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline mask-eval --config-json {params.config:q} --masks {params.masks:q} "
        "--out {output.tables:q} > {log} 2>&1"
