"""Phase 5 — cross-task gradient conflicts per layer, module and head.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import PhaseCommand, register_phase
from ..pair_options import pair_phase_schema, task_pair_list


@config_section("conflicts", """
description: phase 5, cross-task gradient conflicts per layer, module and head (ConflictsOptions)
properties:
  similarity:
    enum: [cosine, fisher]
    default: cosine
    description: >-
      Similarity of two samples' gradients in a group: `cosine`, or `fisher` — the cosine after dividing each
      element by `sqrt(F_pool + lambda)` (F pooled over both tasks, sample-weighted). Both lie in [-1, 1].
  fisher_damping:
    type: number
    minimum: 0
    default: 0.01
    description: >-
      `lambda` of `fisher`, as a fraction of the parameter's mean pooled Fisher: elements whose Fisher is below
      about 1% of the mean stop dominating the whitened cosine.
  alpha:
    type: number
    exclusiveMinimum: 0
    exclusiveMaximum: 1
    default: 0.05
    description: >-
      False discovery rate of the Benjamini-Hochberg step over all groups of one task pair.
  top_pairs:
    type: integer
    minimum: 0
    default: 10
    description: >-
      Most conflicting sample pairs (most negative similarity) listed per conflicting group, by sample id.
""" + pair_phase_schema(
    "Task pairs to compare, e.g. `[[code, prose]]`; `null` compares every unordered pair of tasks. "
    "A listed task must be in `tasks`.",
    "`mean / sqrt(within_a_mean x within_b_mean)` (the cosine between the two tasks' mean gradient "
    "directions in the group, in [-1, 1])"))
class ConflictsOptions:
    """Settings of phase 5."""

    similarity: str = "cosine"  # cosine | fisher (cosine in the metric 1 / (F_pool + lambda))
    fisher_damping: float = 0.01  # lambda of `fisher`, relative to the parameter's mean pooled Fisher
    alpha: float = 0.05  # BH false discovery rate over one task pair's groups
    min_effect_size: float = 0.1  # smallest |alignment| (cosine of the mean directions) labelled
    top_pairs: int = 10  # most conflicting sample pairs listed per conflicting group
    pairs: tuple[tuple[str, str], ...] | None = None  # task pairs; None: every unordered pair
    sample_block: int = 256  # samples of A read at once (memory only)
    compute_dtype: str = "float32"  # float32 | float64 | bfloat16 products
    device: str = "cpu"  # cpu | cuda | auto: where the pair products run

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", task_pair_list(self.pairs, "conflicts"))


register_phase(ConflictsOptions, PhaseCommand(
    "conflicts", f"{__name__}.compute:run_conflicts",
    "phase 5: cross-task gradient conflicts per layer, module and head, with U-statistic tests and BH",
    per_task=False, input_help="phase 1 stores with per-sample gradients (two for one pair)",
    out_example="results/conflicts/code__prose"))
