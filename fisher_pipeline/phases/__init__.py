"""Analysis phases 2 to 7: pure functions of phase 1 stores (and phase 3 masks) to files.

Each phase is a subpackage: its `__init__.py` declares the options dataclass (its config
section) and its subcommands, and imports nothing heavy, so that reading a config never
imports torch; `compute.py` holds the computational cores that return numbers / tables
(for tests and notebooks) and a `run_*` function that writes the outputs atomically into
one directory and returns their paths. None of them imports Snakemake. Only phases 5 and 6
read per-sample arrays (through the pair engine, `fisher_pipeline.sample_pairs`); the others use
the aggregated Fisher, mean gradient and Welford group statistics only.

| phase | function | options |
|-------|----------|---------|
| 2 importance (per task) | `run_importance(store_path, out_dir, options)` | `ImportanceOptions` |
| 2 rank agreement (tasks) | `run_rank_agreement(store_paths, out_dir, options)` | `ImportanceOptions` |
| 3 masks (per task) | `run_masks(store_path, out_dir, options)` | `MaskOptions` |
| 3 mask_eval (tasks) | `run_mask_eval(mask_paths, out_dir, options, pipeline)` | `MaskEvalOptions` |
| 4 overlap (tasks) | `run_overlap(mask_paths, out_dir, options)` | `OverlapOptions` |
| 5 conflicts (task pairs) | `run_conflicts(store_paths, out_dir, options)` | `ConflictsOptions` |
| 6 qkov (ordered task pairs) | `run_qkov(store_paths, out_dir, options)` | `QkovOptions` |
| 7 scaled (per task) | `run_scaled_task(store_path, out_dir, options)` | `ScaledOptions` |
| 7 scaled (tasks) | `run_scaled_cross(store_paths, out_dir, options)` | `ScaledOptions` |
| 5, 6 replication (tasks) | `run_replication(store_paths, out_dir, options, ...)` | `ReplicationOptions` |
| 5-7 intervention (tasks) | `run_intervention(store_paths, out_dir, options, ...)` | `InterventionOptions` |

`from fisher_pipeline.phases import run_masks` works for every name above (and the cores
listed in `__all__`): each is imported from its phase on first use.
"""

import importlib

#: Public name -> the module of this package that defines it (imported on first use).
_PUBLIC = {
    "ImportanceOptions": "importance", "importance_tables": "importance.compute",
    "run_importance": "importance.compute",
    "rank_agreement": "importance.agreement", "run_rank_agreement": "importance.agreement",
    "MaskOptions": "masks", "compute_masks": "masks.compute", "mask_summary": "masks.compute",
    "run_masks": "masks.compute",
    "MaskEvalOptions": "mask_eval", "run_mask_eval": "mask_eval.compute",
    "OverlapOptions": "overlap", "overlap_metrics": "overlap.compute", "run_overlap": "overlap.compute",
    "ConflictsOptions": "conflicts", "group_conflict": "conflicts.compute", "pair_conflicts": "conflicts.compute",
    "run_conflicts": "conflicts.compute",
    "QkovOptions": "qkov", "pair_qkov": "qkov.compute", "run_qkov": "qkov.compute",
    "ScaledOptions": "scaled", "cross_task_tables": "scaled.compute", "natgrad_norms": "scaled.compute",
    "natural_gradient": "scaled.compute", "run_scaled_cross": "scaled.compute", "run_scaled_task": "scaled.compute",
    "ReplicationOptions": "replication", "run_replication": "replication.compute",
    "InterventionOptions": "intervention", "run_intervention": "intervention.compute",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
