"""Steps on the model that check phases 5, 6 and 7 on held-out samples.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import ExtraInput, PhaseCommand, register_phase


@config_section("intervention", """
description: steps on the model that check phases 5, 6 and 7 on held-out samples (InterventionOptions)
properties:
  top_cells:
    type: integer
    minimum: 0
    default: 2
    description: >-
      Cells stepped per pair and phase, most significant first (labelled cells by discovery p, then unlabelled
      ones).
  random_cells:
    type: integer
    minimum: 0
    default: 2
    description: >-
      Cells drawn at random among the other tested cells of each pair and phase: the baseline a finding must beat.
  gains:
    type: array
    items: {type: number, exclusiveMinimum: 0}
    minItems: 1
    default: [0.001, 0.01]
    title: "promised drops, as fractions of the stepped task's held-out loss"
    description: >-
      Every step on a task T is scaled so that it promises T a drop of this fraction of T's mean held-out loss, to
      first order: a cell step `-eta d` along B's held-out mean gradient restricted to the cell (phase 6: times
      its metric `1 / Fhat`) on B's held-out gradient, a phase 7 step on T's analysed one. Steps of every kind
      then compare at the same promise. Cells and cross-task steps are taken at each gain (where first order holds
      within 10% is counted per gain); each task's damping curve at the first.
  dampings:
    type: array
    items: {type: number, minimum: 0}
    default: [1.0e-7, 1.0e-6, 1.0e-5, 1.0e-4, 1.0e-3]
    description: >-
      Lambdas of the damping curve: each task's own natural gradient `g / (F + lambda)` at each (and at
      `scaled.damping`, and the plain gradient), its held-out change against its promise (docs/phases.md,
      "Choosing the damping").
  batch_size:
    type: integer
    minimum: 1
    default: 8
    description: >-
      Held-out samples per forward pass (memory, not results).
  device:
    enum: [cpu, cuda, auto]
    default: cpu
    description: >-
      Where the model runs: `cpu`, `cuda` or `auto`.
  seed:
    type: integer
    minimum: 0
    default: 0
    description: >-
      Seed of the random cells.
""")
class InterventionOptions:
    """Settings of the intervention checks."""

    top_cells: int = 2  # most significant cells stepped per pair and phase
    random_cells: int = 2  # random cells per pair and phase (the baseline)
    gains: tuple[float, ...] = (0.001, 0.01)  # promised drop of the stepped task / its loss
    dampings: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)  # damping curve of phase 7
    batch_size: int = 8  # held-out samples per forward pass
    device: str = "cpu"  # cpu | cuda | auto
    seed: int = 0  # seed of the random cells

    def __post_init__(self) -> None:
        object.__setattr__(self, "gains", tuple(float(g) for g in self.gains))
        object.__setattr__(self, "dampings", tuple(float(d) for d in self.dampings))


register_phase(InterventionOptions, PhaseCommand(
    "intervention", f"{__name__}.compute:run_intervention",
    "steps on the model as phases 5, 6 and 7 predict, measured on held-out samples",
    per_task=False, input_help="phase 1 store of the analysed samples", out_example="results/intervention",
    context=("model", "tasks", "qkov", "scaled"), extra_inputs=(
        ExtraInput("--heldout-stores", "phase 1 store of the held-out samples (fisher --heldout)"),
        ExtraInput("--replication", "the replication output directory (cells to step)", keyed=False,
                   required=False))))
