"""The steps every pair phase (5 and 6) runs over task pairs: open the stores, choose the
pairs, compute each, write the outputs atomically.

A pair phase gives `run_pair_phase` its two own steps: `compute(store_a, store_b, task_a,
task_b)` for one pair, and `write(pairs, results, staging)`, which turns the pairs' results
into files in the staging directory (tables, one figure per pair) and returns their paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PhaseInputError
from ..store import FisherStore
from .common import atomic_output_dir, open_stores, relocate
from .pair_options import select_task_pairs

log = logging.getLogger(__name__)

Pair = tuple[str, str]


def run_pair_phase(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike, *, section: str,
                   ordered: bool, listed: Sequence[Sequence[str]] | None, given: Sequence[Sequence[str]] | None,
                   compute: Callable[[FisherStore, FisherStore, str, str], Any],
                   write: Callable[[list[Pair], list[Any], Path], dict[str, Path]]) -> dict[str, Path]:
    """Run pair phase `section` over its task pairs; return {output key: path} of what was written.

    With exactly two stores and no `given` pairs the pair is the two tasks in the order
    given (the workflow's one job per pair); else `given`, or `listed` (the config's
    `<section>.pairs`), or every unordered (`ordered`: ordered) pair of the stores' tasks.

    Raises:
        PhaseInputError: fewer than two stores, or a pair names a task without a store.
        StoreMismatchError: the stores come from different models or per-sample settings.
    """
    stores = open_stores(store_paths, per_sample=True)
    tasks = list(stores)
    if len(tasks) < 2:
        raise PhaseInputError(f"{section} compares two tasks; got only {tasks}: pass two or more --stores")
    if len(tasks) == 2 and given is None:
        pairs: list[Pair] = [(tasks[0], tasks[1])]
    else:
        pairs = select_task_pairs(tasks, given or listed, section, ordered=ordered)
    results = []
    for task_a, task_b in pairs:
        log.info("%s: %s %s %s", section, task_a, "->" if ordered else "vs", task_b)
        results.append(compute(stores[task_a], stores[task_b], task_a, task_b))
    with atomic_output_dir(out_dir) as staging:
        paths = write(pairs, results, staging)
    return relocate(paths, staging, out_dir)
