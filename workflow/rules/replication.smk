# Held-out replication of phases 5 and 6: every cell scored again on the held-out stores.
REPLICATED_CONFLICTS = [f"results/conflicts/{a}__{b}" for a, b in conflict_task_pairs()]
REPLICATED_QKOV = [f"results/qkov/{a}__{b}" for a, b in qkov_task_pairs()]

if REPLICATED_CONFLICTS or REPLICATED_QKOV:
    FINAL_OUTPUTS.append("results/replication")

    rule replication:
        """Phases 5 and 6 on held-out samples: does every labelled cell replicate?"""
        input:
            stores=list(fisher_stores().values()),
            heldout=list(heldout_stores().values()),
            conflicts=REPLICATED_CONFLICTS,
            qkov=REPLICATED_QKOV,
        output:
            tables=report(
                directory("results/replication"),
                patterns=["{file,replication[.]png}", "{file,summary[.]csv}"],
                caption="../report/replication.rst",
                category="8. Held-out checks",
                subcategory="replication of phases 5 and 6",
                labels={"task": "all tasks", "file": "{file}"},
            ),
        params:
            config=phase_config("replication", "conflicts", "qkov"),
            stores=task_path_args(fisher_stores()),
            heldout=task_path_args(heldout_stores()),
            tables=" ".join(
                f"{flag} {' '.join(shlex.quote(path) for path in paths)}"
                for flag, paths in (("--conflicts", REPLICATED_CONFLICTS), ("--qkov", REPLICATED_QKOV))
                if paths
            ),
        log:
            "logs/replication.log",
        benchmark:
            "logs/benchmarks/replication.tsv"
        threads: 1
        resources:
            mem_mb=planned("replication", "mem_mb"),
            disk_mb=planned("replication", "disk_mb"),
            runtime=planned("replication", "runtime"),
        shell:
            "$FISHER_PYTHON -m fisher_pipeline replication --config-json {params.config:q} "
            "--stores {params.stores:q} --heldout-stores {params.heldout:q} {params.tables} "
            "--out {output.tables:q} > {log} 2>&1"
