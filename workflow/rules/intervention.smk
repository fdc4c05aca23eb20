# Steps on the model that check phases 5, 6 and 7 on held-out samples.
FINAL_OUTPUTS.append("results/intervention")


rule intervention:
    """Step the model as phases 5, 6 and 7 predict; measure task A's held-out loss."""
    input:
        stores=list(fisher_stores().values()),
        heldout=list(heldout_stores().values()),
        replication=["results/replication"] if conflict_task_pairs() or qkov_task_pairs() else [],
        model=model_input(),
    output:
        tables=report(
            directory("results/intervention"),
            patterns=["{file,(cells|damping)[.]png}", "{file,summary[.]csv}"],
            caption="../report/intervention.rst",
            category="8. Held-out checks",
            subcategory="interventions",
            labels={"task": "all tasks", "file": "{file}"},
        ),
    params:
        config=phase_config("intervention", "model", "tasks", "qkov", "scaled"),
        stores=task_path_args(fisher_stores()),
        heldout=task_path_args(heldout_stores()),
        replication=lambda wildcards, input: f"--replication {shlex.quote(input.replication[0])}"
        if input.replication
        else "",
    log:
        "logs/intervention.log",
    benchmark:
        "logs/benchmarks/intervention.tsv"
    threads: 2
    resources:
        mem_mb=planned("intervention", "mem_mb"),
        disk_mb=planned("intervention", "disk_mb"),
        runtime=planned("intervention", "runtime"),
    shell:
        "$FISHER_PYTHON -m fisher_pipeline intervention --config-json {params.config:q} "
        "--stores {params.stores:q} --heldout-stores {params.heldout:q} {params.replication} "
        "--out {output.tables:q} > {log} 2>&1"
