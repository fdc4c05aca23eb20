"""What the pair phases (5 and 6) share before any store is read: their common config keys
and the choice of task pairs. Imported when a config is read (and by the workflow), so it
imports nothing heavy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..errors import ConfigError, PhaseInputError


def pair_phase_schema(pairs_description: str, alignment_of: str) -> str:
    """YAML schema of the keys every pair phase has: `min_effect_size` (the labelling rule
    both share, `pair_stats.label`; `alignment_of` says what the alignment is a cosine of),
    `pairs`, `sample_block`, `compute_dtype`."""
    return f"""
  min_effect_size:
    type: number
    minimum: 0
    maximum: 1
    default: 0.1
    description: "smallest |alignment| labelled conflict or synergy: the cosine between {alignment_of}"
  pairs:
    type: [array, "null"]
    items:
      type: array
      items: {{type: string}}
      minItems: 2
      maxItems: 2
    default: null
    description: {pairs_description}
  sample_block:
    type: integer
    minimum: 1
    default: 256
    description: samples of task A read and multiplied at once (memory, not results)
  compute_dtype:
    enum: [float32, float64]
    default: float32
    description: dtype of the pair products (results are float64)
"""


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
