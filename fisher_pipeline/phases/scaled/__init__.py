"""Phase 7 — natural gradients and EWC costs.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import PhaseCommand, register_phase


@config_section("scaled", """
description: phase 7, natural gradients and EWC costs (ScaledOptions)
properties:
  damping:
    type: number
    minimum: 0
    default: 1.0e-8
    examples: [1.0e-5]
    description: >-
      `lambda` in the natural gradient `g / (F + lambda)`, absolute, in Fisher units of the token-sum loss (the
      token-sum Fisher grows with the labelled tokens per sample, so a good value depends on the model and tasks).
      Must be >= 0. The default barely damps: elements with `F` near 0 (embedding rows of rare tokens) then
      dominate natural-gradient norms and cosines. The default run uses `1.0e-1`, chosen by held-out loss: from
      1e-7 to 1e-1 each larger damping made a task's own natural-gradient step realise more of the loss drop its
      analysed samples promise on held-out samples (mean over tasks 55% to 65%; the plain gradient 93%;
      docs/phases.md, "Choosing the damping"). For other models, run that curve (`intervention.dampings`) on your
      stores; below about the mean Fisher of your stores (phase 2 `tensors` table: `fisher_sum` total /
      `n_elements` total) low-Fisher coordinates decide the direction. Must be finite. (`1e-5`, which YAML reads
      as text, is read as the number.)
  eta:
    type: number
    default: 1.0
    description: >-
      Size of the natural-gradient step on task B whose EWC cost `0.5 * sum F_A (eta n_B)^2` task A's Fisher
      measures. The cost scales with `eta^2`.
""")
class ScaledOptions:
    """Settings of phase 7."""

    damping: float = 1e-8  # lambda in g / (F + lambda), in Fisher units (token-sum loss); >= 0
    eta: float = 1.0  # size of the natural-gradient step whose EWC cost is measured


register_phase(ScaledOptions, PhaseCommand(
    "scaled", f"{__name__}.compute:run_scaled_task", "phase 7: mean and natural-gradient norms of one task",
    out_example="results/scaled/{task}"), PhaseCommand(
    "scaled-cross", f"{__name__}.compute:run_scaled_cross",
    "phase 7 across tasks: natural-gradient cosines and EWC costs",
    per_task=False, out_example="results/scaled/cross_task",
    reserves="cross_task"))
