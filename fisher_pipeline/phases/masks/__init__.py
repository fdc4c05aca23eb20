"""Phase 3 — pruning masks that keep the units whose removal costs a task least.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

import re

from ...config_schema import config_section
from ...errors import ConfigError
from ...roles import NAMED_SELECTIONS
from ..registry import PhaseCommand, register_phase


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
    description: fractions of units removed
  criterion:
    enum: [saliency, fisher, magnitude, wanda, random]
    default: saliency
    description: >
      the score that ranks units (higher = kept); its masks are the ones phase 4 compares. saliency:
      the second-order loss increase of removing the unit (elements 0.5*F*w^2, Optimal Brain Damage;
      heads and neurons 0.5*mean_i gate_i^2, the Fisher of a gate on the unit); fisher: F alone (mean
      Fisher of the unit); magnitude: |w| (mean over the unit); wanda: |w_ij|*||X_j||; random: seeded
  baselines:
    type: array
    uniqueItems: true
    items:
      enum: [saliency, fisher, magnitude, wanda, random]
    default: [fisher, magnitude, wanda, random]
    description: further criteria whose masks are computed beside `criterion`'s (for mask_eval)
  scope:
    enum: [global, per_layer, per_tensor]
    default: global
  granularity:
    enum: [element, head, neuron]
    default: element
  include:
    type: [string, "null"]
    default: blocks
    description: >
      parameters masked: a named selection (blocks = attention and MLP projections, attention, mlp,
      all) or a regex searched in parameter names (null = all)
  wanda_compare:
    enum: [row, scope]
    default: row
    description: >
      where wanda's element scores compete: within each output row (as the Wanda paper) or within
      the scope, like the other criteria
  seed:
    type: integer
    default: 0
    description: seed of the random criterion
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
