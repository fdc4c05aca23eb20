FINAL_OUTPUTS.extend(mask_dirs().values())


rule masks:
    """Phase 3: pruning masks of one task per criterion and sparsity (the model's weights score them)."""
    input:
        store="results/fisher/{task}.zarr",
        model=model_input(),
    output:
        masks=report(
            directory("results/masks/{task}"),
            patterns=["{file,mask_summary[.]csv}"],
            caption="../report/masks.rst",
            category="3. Masks",
            subcategory="{task}",
            labels={"task": "{task}", "file": "{file}"},
        ),
    params:
        config=phase_config("masks", "model"),
    log:
        "logs/masks/{task}.log",
    benchmark:
        "logs/benchmarks/masks/{task}.tsv"
    threads: 1
    resources:
        mem_mb=planned("masks", "mem_mb"),
        disk_mb=planned("masks", "disk_mb"),
        runtime=planned("masks", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline masks --config-json {params.config:q} --store {input.store:q} "
        "--task {wildcards.task} --out {output.masks:q} > {log} 2>&1"
