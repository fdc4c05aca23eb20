"""Analysis phases 2 to 7: pure functions of phase 1 stores (and phase 3 masks) to files.

Each phase has an options dataclass, computational cores that return numbers / tables
(for tests and notebooks), and a `run_*` function that writes its outputs atomically
into one directory and returns their paths. None of them imports Snakemake. Only phases 5
and 6 read per-sample arrays (through the pair engine, `fisher_pipeline.pairs`); the others use
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
"""

from .agreement import rank_agreement, run_rank_agreement
from .conflicts import ConflictsOptions, group_conflict, pair_conflicts, run_conflicts
from .importance import ImportanceOptions, importance_tables, run_importance
from .intervention import InterventionOptions, run_intervention
from .mask_eval import MaskEvalOptions, run_mask_eval
from .masks import MaskOptions, compute_masks, mask_summary, run_masks
from .overlap import OverlapOptions, overlap_metrics, run_overlap
from .qkov import QkovOptions, pair_qkov, run_qkov
from .replication import ReplicationOptions, run_replication
from .scaled import ScaledOptions, cross_task_tables, natgrad_norms, natural_gradient, run_scaled_cross, run_scaled_task

__all__ = [
    "ConflictsOptions", "ImportanceOptions", "MaskEvalOptions", "MaskOptions", "OverlapOptions", "ScaledOptions",
    "run_mask_eval",
    "group_conflict", "pair_conflicts", "run_conflicts", "QkovOptions", "pair_qkov", "run_qkov",
    "compute_masks", "cross_task_tables", "importance_tables", "mask_summary", "natgrad_norms", "natural_gradient",
    "overlap_metrics", "rank_agreement",
    "run_importance", "run_masks", "run_overlap", "run_rank_agreement", "run_scaled_cross", "run_scaled_task",
    "InterventionOptions", "ReplicationOptions", "run_intervention", "run_replication",
]
