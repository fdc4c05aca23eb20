"""Phase 2 — Fisher importance per tensor, head, neuron and layer, and its rank agreement between tasks.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics:
`compute.py` (per task), `agreement.py` (across tasks).
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import PhaseCommand, register_phase


@config_section("importance", """
description: phase 2, Fisher importance per tensor / head / neuron / layer (ImportanceOptions)
properties:
  rank_by:
    enum: [mean, sum]
    default: mean
    description: >-
      Score that ranks units and colours the heatmaps: `mean` = Fisher per parameter element of the unit (compares
      units of different sizes fairly), `sum` = total Fisher of the unit (favours big units). Rank agreement
      compares this score too.
  log_color:
    type: boolean
    default: true
    description: >-
      Heatmap colours on a log scale (Fisher spans orders of magnitude); zero cells are grey.
""")
class ImportanceOptions:
    """Settings of phase 2."""

    rank_by: str = "mean"  # rank (and colour heatmaps) by Fisher per element ("mean") or per unit ("sum")
    log_color: bool = True  # heatmap colours on a log scale: Fisher spans orders of magnitude

    @property
    def score_column(self) -> str:
        return f"fisher_{self.rank_by}"


register_phase(ImportanceOptions, PhaseCommand(
    "importance", f"{__name__}.compute:run_importance",
    "phase 2: Fisher importance tables and layer x head heatmaps of one task",
    out_example="results/importance/{task}"))

register_phase(ImportanceOptions, PhaseCommand(
    "rank-agreement", f"{__name__}.agreement:run_rank_agreement",
    "phase 2 across tasks: Spearman rank agreement of importance between tasks",
    per_task=False, out_example="results/importance/rank_agreement",
    reserves="rank_agreement"))
