"""Held-out replication of phases 5 and 6, cell by cell.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import ExtraInput, PhaseCommand, register_phase


@config_section("replication", """
description: held-out replication of phases 5 and 6, cell by cell (ReplicationOptions)
properties:
  alpha:
    type: number
    exclusiveMinimum: 0
    exclusiveMaximum: 1
    default: 0.05
    description: >-
      Level of each labelled cell's one-sided held-out test. No correction within the labelled set: each labelled
      cell is one claim, checked once.
""")
class ReplicationOptions:
    """Settings of the held-out replication."""

    alpha: float = 0.05  # one-sided level of each discovered cell's held-out test


register_phase(ReplicationOptions, PhaseCommand(
    "replication", f"{__name__}.compute:run_replication",
    "phases 5 and 6 on held-out samples: does every labelled cell replicate?",
    per_task=False, input_help="phase 1 store of the analysed samples", out_example="results/replication",
    context=("conflicts", "qkov"), extra_inputs=(
        ExtraInput("--heldout-stores", "phase 1 store of the held-out samples (fisher --heldout)"),
        ExtraInput("--conflicts", "phase 5 output directories", keyed=False, required=False),
        ExtraInput("--qkov", "phase 6 output directories", keyed=False, required=False))))
