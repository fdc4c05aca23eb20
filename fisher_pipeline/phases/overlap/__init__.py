"""Phase 4 — overlap of the tasks' masks, against the hypergeometric expectation.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import PhaseCommand, register_phase


@config_section("overlap", """
description: phase 4, mask overlap between tasks (OverlapOptions)
properties:
  heatmap_metric:
    enum: [jaccard, dice, overlap_coefficient]
    default: jaccard
    description: >-
      Global metric drawn in the task x task heatmaps: `jaccard`, `dice` or `overlap_coefficient`. The table
      always holds all three, their expectations under random masks of the same densities, and the hypergeometric
      p-value.
""")
class OverlapOptions:
    """Settings of phase 4."""

    heatmap_metric: str = "jaccard"  # global metric of the task x task heatmaps: jaccard, dice, overlap_coefficient


METRICS = tuple(OverlapOptions.__config_schema__["properties"]["heatmap_metric"]["enum"])  # mask overlap metrics

register_phase(OverlapOptions, PhaseCommand(
    "overlap", f"{__name__}.compute:run_overlap",
    "phase 4: overlap of the tasks' masks, with hypergeometric expectations and p-values",
    per_task=False, input_flag="--masks", input_help="masks.safetensors written by phase 3",
    out_example="results/overlap"))
