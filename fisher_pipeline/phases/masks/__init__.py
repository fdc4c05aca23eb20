"""Phase 3 — pruning masks that keep the units whose removal costs a task least.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

import re

from ...config_schema import config_section
from ...errors import ConfigError
from ...phase_registry import PhaseCommand, register_phase
from ...roles import NAMED_SELECTIONS


@config_section("masks", """
description: phase 3, pruning masks keeping the units whose removal costs the task least (MaskOptions)
properties:
  sparsities:
    type: array
    minItems: 1
    uniqueItems: true
    items:
      type: number
      minimum: 0
      maximum: 1
    default: [0.25, 0.5]
    title: fractions of units removed
    description: >-
      Fractions of units removed, each in [0, 1], no duplicates. Two that print alike to 6 digits count as
      duplicates. A group of `n` competing units keeps `floor((1 - s) n + 1/2)` of them.
  criterion:
    enum: [saliency, fisher, magnitude, wanda, random]
    default: saliency
    description: >-
      The score that ranks units (the highest kept); its masks are the ones `overlap` compares. `saliency`: the
      loss increase of removing the unit to second order, with the Fisher as curvature: `0.5 F w^2` per element
      (Optimal Brain Damage), `0.5 mean_i gate_i^2` per head or neuron, where `gate_i = sum over the unit's output
      weights (o columns, down column) of g_i w` is the gradient of a multiplicative gate on the unit (its Fisher:
      Kwon et al. 2022; Michel et al. 2019 use its mean absolute value). `fisher`: the Fisher alone (the mean over
      a head / neuron), which ignores the weight's size: on SmolLM2 its masks cost held-out loss far beyond
      magnitude pruning (docs/phases.md, "Masks on held-out samples"). `magnitude`: `|w|` (mean over a unit).
      `wanda`: `|w_ij| ||X_j||` with `||X_j||^2` the mean square of input feature j over the task's labelled
      tokens (Sun et al. 2024); a bias counts as a weight on the constant input 1. `random`: uniform, seeded.
  baselines:
    type: array
    uniqueItems: true
    items:
      enum: [saliency, fisher, magnitude, wanda, random]
    default: [fisher, magnitude, wanda, random]
    description: >-
      Further criteria whose masks are computed beside `criterion`'s, so that `mask_eval` scores them side by
      side. `[]`: only `criterion`.
  scope:
    enum: [global, per_layer, per_tensor]
    default: global
    description: >-
      Where units compete: `global` (whole model), `per_layer` (tensors outside layers form one extra scope) or
      `per_tensor` (elements only: a head or neuron spans several tensors).
  granularity:
    enum: [element, head, neuron]
    default: element
    description: >-
      What a unit is: `element` (one parameter element); `head`: one query head of one layer, its q rows and o
      columns (and their biases) in every selected tensor holding them, fused Q|K|V included; a KV head (its k and
      v rows) goes exactly when every query head reading it is gone (GQA); `neuron`: one MLP neuron, its gate/up
      rows and down column. Selected tensors with no such groups are left unmasked.
  include:
    type: [string, "null"]
    default: blocks
    description: >-
      Which parameters are masked: a named selection, resolved by the architecture adapter for every family
      (`blocks`: the attention and MLP projections of every layer, weights and biases; `attention`; `mlp`; `all`),
      or a regex searched in parameter names; `null`: every parameter. `wanda` scores only Linear / Conv1D weights
      and their biases: with it, select no norm or embedding.
  wanda_compare:
    enum: [row, scope]
    default: row
    description: >-
      Where `wanda`'s elements compete: `row` (within each output row of a weight, with that row's bias element,
      as the Wanda paper) or `scope` (within the scope, like the other criteria).
  seed:
    type: integer
    default: 0
    description: >-
      Seed of the `random` criterion (per parameter, so the same in every task).
""")
class MaskOptions:
    """Settings of phase 3."""

    sparsities: tuple[float, ...] = (0.25, 0.5)  # fractions of units removed, each in [0, 1]
    criterion: str = "saliency"  # score ranking units: saliency, fisher, magnitude, wanda, random
    baselines: tuple[str, ...] = ("fisher", "magnitude", "wanda", "random")  # more criteria computed beside it
    scope: str = "global"  # where units compete: "global", "per_layer" or "per_tensor"
    granularity: str = "element"  # what a unit is: "element", "head" or "neuron"
    include: str | None = "blocks"  # named selection or regex of the parameters masked (None: all)
    wanda_compare: str = "row"  # wanda's elements compete per output row ("row") or within the scope
    seed: int = 0  # seed of the random criterion

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if len({f"{s:g}" for s in self.sparsities}) != len(self.sparsities):  # names as stored
            raise ConfigError(f"masks.sparsities = {list(self.sparsities)}: holds the same fraction twice "
                              f"(as stored, to 6 significant digits)")
        if self.include is not None and self.include not in NAMED_SELECTIONS:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ConfigError(f"masks.include = {self.include!r} is not a valid regex ({err})") from None
        if self.granularity != "element" and self.scope == "per_tensor":
            raise ConfigError(
                f"masks.scope = 'per_tensor' with granularity {self.granularity!r}: a {self.granularity} spans "
                "several tensors (a head: its q rows and o columns; a neuron: its up/gate rows and down column); "
                "use scope global or per_layer"
            )

    @property
    def criteria(self) -> tuple[str, ...]:
        """Every criterion computed: `criterion` first, then the baselines not equal to it."""
        return (self.criterion, *(c for c in self.baselines if c != self.criterion))


CRITERIA = tuple(MaskOptions.__config_schema__["properties"]["criterion"]["enum"])  # what ranks mask units

register_phase(MaskOptions, PhaseCommand(
    "masks", f"{__name__}.compute:run_masks",
    "phase 3: pruning masks of one task for every configured criterion and sparsity",
    out_example="results/masks/{task}", context=("model",)))
