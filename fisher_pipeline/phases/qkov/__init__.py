"""Phase 6 — Q/K/V/O interference per layer, block and head.

The phase's declaration: its config section (options and schema) and its subcommands,
imported whenever a config is read, so it imports nothing heavy. The numerics: `compute.py`.
"""

from __future__ import annotations

from ...config_schema import config_section
from ...errors import ConfigError
from ...phase_registry import PhaseCommand, register_phase
from ..pair_options import pair_phase_schema, task_pair_list


@config_section("qkov", """
description: phase 6, Q/K/V/O interference per layer, block and head (QkovOptions)
properties:
  variant:
    enum: [unsigned, signed, symmetric]
    default: unsigned
    description: >-
      Per-pair score over a head's slice: `unsigned` `g_A^2 |g_B| / Fhat` (the seed metric), `signed` `g_A g_B /
      Fhat`, `symmetric` `|g_A| |g_B| / Fhat`. The signed alignment is always computed and tested beside it.
  aggregate:
    enum: [mean, sum]
    default: mean
    description: >-
      `mean` or `sum` of the score over the slice's elements.
  fisher_pool:
    enum: [a, b, pooled]
    default: a
    description: >-
      Whose Fisher normalises: `a` (A's), `b` (B's) or `pooled` (sample-weighted mean of both). With `a`, the mean
      unsigned score equals the mean `|g_B|` (A cancels; docs/phases.md).
  eps:
    type: number
    minimum: 0
    default: 1.0e-10
    description: >-
      Floor on the Fisher before `ridge_lambda` is added (Fisher units of the token-sum loss). `health` reports
      the fraction of each slice below it.
  ridge_lambda:
    type: number
    minimum: 0
    default: 0.0
    description: >-
      Added to the floored Fisher: `Fhat = max(F, eps) + lambda`.
  alpha:
    type: number
    exclusiveMinimum: 0
    exclusiveMaximum: 1
    default: 0.05
    description: >-
      Benjamini-Hochberg false discovery rate over all cells of the run (one job: one ordered pair).
  top_k:
    type: integer
    minimum: 0
    default: 20
    description: >-
      Sample pairs listed in `top_conflicts` per ordered pair.
  n_bootstrap:
    type: integer
    minimum: 0
    default: 200
    description: >-
      Resamples of the samples of A and of B for the score's 95% percentile interval (first-order: through the
      score's row and column means, docs/phases.md); `0` skips it.
  forensics:
    enum: [signed, excess]
    default: signed
    description: >-
      How `top_conflicts` ranks sample pairs: `signed`, the most negative signed scores (the pairs whose
      gradients most oppose through a head); `excess`, the pairs whose unsigned / symmetric score most exceeds
      what each sample alone explains. `excess` forms the variant's full pair matrix: a second product per cell,
      about twice the time at large N. Not with variant `signed`.
""" + pair_phase_schema(
    "Ordered pairs `[A, B]` to compute, e.g. `[[code, prose]]`; `null` computes every ordered pair.",
    "`signed_mean / sqrt(within_a_mean x within_b_mean)` (the cosine between the two tasks' mean gradients "
    "through the head, in the Fisher metric: phase 5's rule)"))
class QkovOptions:
    """Settings of phase 6."""

    variant: str = "unsigned"  # unsigned | signed | symmetric per-pair score
    aggregate: str = "mean"  # mean | sum over the head's slice
    fisher_pool: str = "a"  # a | b | pooled: whose Fisher normalises
    eps: float = 1e-10  # floor on F before lambda, Fisher units
    ridge_lambda: float = 0.0  # lambda added to the floored F, Fisher units
    alpha: float = 0.05  # BH false discovery rate over the cells of the run
    min_effect_size: float = 0.1  # smallest |alignment| (cosine of the mean gradients) labelled
    top_k: int = 20  # sample pairs in top_conflicts per task pair
    n_bootstrap: int = 200  # resamples of samples for the score's 95% interval
    forensics: str = "signed"  # signed | excess: how top_conflicts ranks sample pairs
    pairs: tuple[tuple[str, str], ...] | None = None  # ordered pairs; None: every ordered pair
    sample_block: int = 256  # samples of A read at once (memory only)
    compute_dtype: str = "float32"  # float32 | float64 | bfloat16 products
    device: str = "cpu"  # cpu | cuda | auto: where the pair products run

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", task_pair_list(self.pairs, "qkov"))
        if self.forensics == "excess" and self.variant == "signed":
            raise ConfigError("qkov.forensics = excess ranks the unsigned or symmetric score, but qkov.variant is "
                              "signed: set forensics: signed (the most negative signed pairs) or another variant")


register_phase(QkovOptions, PhaseCommand(
    "qkov", f"{__name__}.compute:run_qkov",
    "phase 6: Q/K/V/O interference per layer, block and head, signed alignment tested with BH",
    per_task=False, input_help="phase 1 stores with per-sample gradients, A then B for one ordered pair",
    out_example="results/qkov/code__prose"))
