"""Phase 7 — natural gradients and EWC costs.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ..registry import PhaseCommand, register_phase


@config_section("scaled", """
description: phase 7, natural gradients and EWC costs (ScaledOptions)
properties:
  damping:
    type: number
    minimum: 0
    default: 1.0e-8
    examples: [1.0e-5]
    description: lambda in g / (F + lambda), absolute, in Fisher units of the token-sum loss
  eta:
    type: number
    default: 1.0
    description: size of the natural-gradient step whose EWC cost is measured
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
