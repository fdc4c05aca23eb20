"""Held-out check of phase 3: every task's masks scored on every task's held-out samples.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import PhaseCommand, register_phase


@config_section("mask_eval", """
description: held-out check of every mask of phase 3 (MaskEvalOptions)
properties:
  batch_size:
    type: integer
    minimum: 1
    default: 8
    description: >-
      Held-out samples per forward pass (memory, not results).
  n_samples:
    type: integer
    minimum: 0
    default: 0
    description: >-
      Score only the first `n` held-out samples of each task (`0`: all `tasks.<name>.n_heldout`). Every distinct
      mask costs a forward pass over the scored samples of every task (the default run: 22 masks; it uses `4`,
      which keeps `mask_eval` at ~4 min on 2 cores while the held-out checks use all 8).
  device:
    enum: [cpu, cuda, auto]
    default: cpu
    description: >-
      Where the model runs: `cpu`, `cuda` or `auto` (CUDA when available).
""")
class MaskEvalOptions:
    """Settings of mask_eval."""

    batch_size: int = 8  # held-out samples per forward pass (memory, not results)
    n_samples: int = 0  # first n held-out samples of each task scored (0: all)
    device: str = "cpu"  # "cpu", "cuda" or "auto"


register_phase(MaskEvalOptions, PhaseCommand(
    "mask-eval", f"{__name__}.compute:run_mask_eval",
    "every task's masks scored on every task's held-out samples, beside the dense model",
    per_task=False, input_flag="--masks", input_help="masks.safetensors written by phase 3",
    out_example="results/mask_eval", context=("model", "tasks")))
