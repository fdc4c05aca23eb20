"""What the pair phases (5 and 6) share before any store is read: their common config keys
and the choice of task pairs. Imported when a config is read (and by the workflow), so it
imports nothing heavy.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Sequence

from ..errors import ConfigError, PhaseInputError


def pair_phase_schema(pairs_description: str, alignment_of: str) -> str:
    """YAML schema of the keys every pair phase has: `min_effect_size` (the labelling rule
    both share, `pair_stats.label`; `alignment_of` says what the alignment is), `pairs`
    (`pairs_description`), `sample_block`, `compute_dtype`, `device`."""
    min_effect = _folded(
        f"A cell is labelled `conflict` / `synergy` only if also its alignment, {alignment_of}, is at least this in "
        "magnitude: a huge N cannot label a negligible mean, and a head and a whole module with the same "
        "per-coordinate signal get the same value (docs/phases.md).")
    return f"""
  min_effect_size:
    type: number
    minimum: 0
    maximum: 1
    default: 0.1
    description: {min_effect}
  pairs:
    type: [array, "null"]
    items:
      type: array
      items: {{type: string}}
      minItems: 2
      maxItems: 2
    default: null
    description: {_folded(pairs_description)}
  sample_block:
    type: integer
    minimum: 1
    default: 256
    description: >-
      Samples of each task read and multiplied at once: memory is about `sample_block x` the largest per-sample
      parameter x 4 bytes per operand copy, whatever the number of samples. With at most this many samples per
      task each per-sample array is read once; beyond, B's arrays are read once per block of A. Never changes
      results.
  compute_dtype:
    enum: [float32, float64, bfloat16]
    default: float32
    description: >-
      Dtype of the pair products: `float32` (error ~1e-6 relative, far below float16 storage rounding),
      `float64`, or `bfloat16` (the N x N products only, in bfloat16 with float32 accumulation; every O(N S)
      sum stays float32): about 3x faster products where the CPU has AVX512-BF16 or on a GPU. Each operand
      rounds by up to 2^-8 of itself, so a cosine moves by at most 3 x 2^-8 = 0.012 and a raw product by
      2^-7 of its sum of |terms| (docs/benchmarks.md measures what it changes in the tables). Results are
      float64.
  device:
    enum: [cpu, cuda, auto]
    default: cpu
    description: >-
      Where the pair products run: `cpu`, `cuda` (a GPU: set it where phase 1 ran on one), or `auto` (`cuda` when
      one is visible). Stores are read on the host either way; results are float64 on the host.
"""


def _folded(text: str) -> str:
    """`text` as a YAML folded scalar for a key's value at indent 4."""
    return ">-\n" + textwrap.indent(textwrap.fill(text, 100, break_on_hyphens=False), "      ")


def select_task_pairs(tasks: Sequence[str], pairs: Sequence[Sequence[str]] | None, section: str, ordered: bool,
                      stores: str = "has no store here") -> list[tuple[str, str]]:
    """`pairs` if given (each task checked), else every unordered (or ordered) pair of `tasks`.

    Raises:
        PhaseInputError: a listed task has no store (`stores` says so in the message).
    """
    if pairs is None:
        return list(itertools.permutations(tasks, 2) if ordered else itertools.combinations(tasks, 2))
    for pair in pairs:
        missing = [task for task in pair if task not in tasks]
        if missing:
            raise PhaseInputError(f"{section}.pairs lists {list(pair)}, but {missing} {stores} "
                                  f"(tasks: {list(tasks)}): list only configured tasks")
    return [tuple(pair) for pair in pairs]


def task_pair_list(pairs: Sequence[Sequence[str]] | None, section: str) -> tuple[tuple[str, str], ...] | None:
    """`section.pairs` as a tuple of 2-tuples (None stays None: every pair).

    Raises:
        ConfigError: a pair names one task twice.
    """
    if pairs is None:
        return None
    listed = tuple((str(a), str(b)) for a, b in pairs)
    for task_a, task_b in listed:
        if task_a == task_b:
            raise ConfigError(f"{section}.pairs: [{task_a}, {task_b}] pairs a task with itself; list two different "
                              "tasks (the within-task baselines come with every pair)")
    return listed
