FINAL_OUTPUTS.extend(fisher_stores().values())


if not fisher_sharded():

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
            mem_mb=planned("fisher", "mem_mb"),
            disk_mb=planned("fisher", "disk_mb"),
            runtime=planned("fisher", "runtime"),
        shell:
            "$FISHER_PYTHON -m fisher_pipeline fisher --task {wildcards.task} --config-json {params.config:q} "
            "--run-settings-json \"$FISHER_RUN_SETTINGS\" "
            "--out {output.store} --threads {threads} 2> {log}"


else:
    # fisher.shards x fisher.param_shards jobs per task, each writing a partial store (temp:
    # removed once the merge has succeeded); a failed shard reruns alone, completed ones are kept.

    rule fisher_shard:
        """Phase 1, one shard: samples k of K, parameter share p of P -> a partial store."""
        input:
            model=model_input(),
        output:
            store=temp(directory("results/fisher/shards/{task}/s{k}of{K}-p{p}of{P}.zarr")),
        wildcard_constraints:
            k=r"\d+",
            K=r"\d+",
            p=r"\d+",
            P=r"\d+",
        params:
            config=lambda wildcards: phase1_config(wildcards.task),
        log:
            "logs/fisher/shards/{task}/s{k}of{K}-p{p}of{P}.log",
        benchmark:
            "logs/benchmarks/fisher/shards/{task}/s{k}of{K}-p{p}of{P}.tsv"
        threads: 2
        resources:
            mem_mb=planned("fisher_shard", "mem_mb"),
            disk_mb=planned("fisher_shard", "disk_mb"),
            runtime=planned("fisher_shard", "runtime"),
        shell:
            "$FISHER_PYTHON -m fisher_pipeline fisher --task {wildcards.task} --config-json {params.config:q} "
            "--run-settings-json \"$FISHER_RUN_SETTINGS\" "
            "--sample-shard {wildcards.k}/{wildcards.K} --param-shard {wildcards.p}/{wildcards.P} "
            "--out {output.store} --threads {threads} 2> {log}"

    rule fisher_merge:
        """Phase 1, merge: the partial stores of a task's shards -> results/fisher/{task}.zarr."""
        input:
            shards=lambda wildcards: fisher_shard_paths(wildcards.task),
        output:
            store=directory("results/fisher/{task}.zarr"),
        params:
            config=lambda wildcards: phase1_config(wildcards.task),
        log:
            "logs/fisher/{task}.merge.log",
        benchmark:
            "logs/benchmarks/fisher/{task}.merge.tsv"
        threads: 1
        resources:
            mem_mb=planned("fisher_merge", "mem_mb"),
            disk_mb=planned("fisher_merge", "disk_mb"),
            runtime=planned("fisher_merge", "runtime"),
        shell:
            "$FISHER_PYTHON -m fisher_pipeline fisher-merge --task {wildcards.task} --config-json {params.config:q} "
            "--shards {input.shards:q} --out {output.store} 2> {log}"


rule fisher_heldout:
    """Phase 1 on a task's held-out samples (the n_heldout after the analysed ones), for the held-out checks."""
    input:
        model=model_input(),
    output:
        store=directory("results/fisher_heldout/{task}.zarr"),
    params:
        config=lambda wildcards: phase1_config(wildcards.task, heldout=True),
    log:
        "logs/fisher_heldout/{task}.log",
    benchmark:
        "logs/benchmarks/fisher_heldout/{task}.tsv"
    threads: 2
    resources:
        mem_mb=planned("fisher_heldout", "mem_mb"),
        disk_mb=planned("fisher_heldout", "disk_mb"),
        runtime=planned("fisher_heldout", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline fisher --heldout --task {wildcards.task} --config-json {params.config:q} "
        "--run-settings-json \"$FISHER_RUN_SETTINGS\" "
        "--out {output.store} --threads {threads} 2> {log}"
