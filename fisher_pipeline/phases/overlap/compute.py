"""Phase 4 — how much do two tasks' pruning masks overlap, and is it more than chance?

For masks A and B over the same `N` elements with `k_a` and `k_b` kept elements and
`K = |A & B|`:

    jaccard = K / (k_a + k_b - K)      dice = 2K / (k_a + k_b)      overlap = K / min(k_a, k_b)

each undefined (NaN) when its denominator is 0 (e.g. both masks empty at sparsity 1).

Null model: two independent uniformly random masks over the same `N` elements with the
same counts `k_a`, `k_b`. Then `K ~ Hypergeom(N, k_a, k_b)`, `E[K] = k_a k_b / N`, and
`p_value = P(K >= observed)` (one-sided: more overlap than chance). Expected Dice and
overlap coefficient are linear in `K` and exact; the expected Jaccard is the exact
`E[K / (k_a + k_b - K)]`, summed over the hypergeometric pmf within 30 standard
deviations (+10) of the mean, where all but a negligible tail of the mass lies.

Levels: `tensor` (one parameter), `layer` (counts summed over the layer's masked
tensors; tensors outside layers form `outside_layers`) and `global` (all masked
tensors). At the layer and global levels the null draws random masks over the level's
elements, whatever scope the masks were made with.

The masks compared are those of phase 3's default criterion (`masks.criterion`, recorded
in each `masks.safetensors`); the baselines' masks are scored by `mask_eval` instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ... import plots
from ...errors import PhaseInputError
from ...pruning import MasksFile
from ..common import atomic_output_dir, relocate, write_table
from . import METRICS, OverlapOptions

log = logging.getLogger(__name__)

COUNT_COLUMNS = ["sparsity", "task_a", "task_b", "level", "name", "layer", "n_elements", "kept_a", "kept_b",
                 "intersection"]
COLUMNS = COUNT_COLUMNS + ["union", *METRICS, "expected_intersection", *(f"expected_{m}" for m in METRICS),
                           "p_value"]
#: Settings that must agree between the masks of different tasks for overlaps to mean anything.
_MATCHING_ATTRS = ("criterion", "sparsities", "scope", "granularity", "include", "weights_hash")


def overlap_metrics(n: int, k_a: int, k_b: int, intersection: int) -> dict[str, float]:
    """Observed metrics, their expectations under random masks, and the p-value (see module doc)."""
    union = k_a + k_b - intersection
    expected = k_a * k_b / n if n else math.nan
    return {
        "union": union,
        "jaccard": _ratio(intersection, union),
        "dice": _ratio(2 * intersection, k_a + k_b),
        "overlap_coefficient": _ratio(intersection, min(k_a, k_b)),
        "expected_intersection": expected,
        "expected_jaccard": expected_jaccard(n, k_a, k_b),
        "expected_dice": _ratio(2 * expected, k_a + k_b),
        "expected_overlap_coefficient": _ratio(expected, min(k_a, k_b)),
        "p_value": float(stats.hypergeom.sf(intersection - 1, n, k_a, k_b)) if n else math.nan,
    }


def expected_jaccard(n: int, k_a: int, k_b: int) -> float:
    """Exact `E[K / (k_a + k_b - K)]` for `K ~ Hypergeom(n, k_a, k_b)` (NaN when k_a = k_b = 0)."""
    if k_a + k_b == 0 or n == 0:
        return math.nan
    low, high = max(0, k_a + k_b - n), min(k_a, k_b)
    mean = k_a * k_b / n
    variance = k_a * k_b * (n - k_a) * (n - k_b) / (n * n * (n - 1)) if n > 1 else 0.0
    reach = 30 * math.sqrt(variance) + 10  # the pmf beyond this reach is negligible in float64
    support = np.arange(max(low, math.floor(mean - reach)), min(high, math.ceil(mean + reach)) + 1)
    pmf = stats.hypergeom.pmf(support, n, k_a, k_b)
    return float(np.sum(pmf * (support / (k_a + k_b - support))) / np.sum(pmf))


def open_masks(mask_paths: Mapping[str, str | os.PathLike]) -> dict[str, MasksFile]:
    """Open every task's `masks.safetensors` and check they were made alike (same settings and model).

    Raises:
        PhaseInputError: no masks given, a path is not a masks file, or settings differ.
    """
    if not mask_paths:
        raise PhaseInputError("no masks given: pass at least one task -> masks.safetensors path")
    files = {}
    for task, path in mask_paths.items():
        try:
            files[task] = MasksFile(path)
        except PhaseInputError as err:
            raise PhaseInputError(f"task {task!r}: {err}") from None
    (first_task, first), *others = files.items()
    for task, file in others:
        for key in _MATCHING_ATTRS:
            if file.metadata.get(key) != first.metadata.get(key):
                raise PhaseInputError(
                    f"masks of tasks {first_task!r} and {task!r} differ in {key} ({first.metadata.get(key)!r} vs "
                    f"{file.metadata.get(key)!r}): rerun phase 3 for every task with the same settings."
                )
    return files


def overlap_counts(masks: Mapping[str, MasksFile]) -> tuple[pd.DataFrame, dict[float, dict[str, int]]]:
    """Per (sparsity, tensor, task pair): elements, kept counts and intersection, for the default criterion.

    Each mask is read once, whatever the number of tasks.

    Returns:
        the counts (columns `COUNT_COLUMNS`, level "tensor"; empty for fewer than two
        tasks), and sparsity -> task -> elements kept in all masked tensors.
    """
    first = next(iter(masks.values()))
    criterion = first.metadata["criterion"]
    layers = first.metadata["layers"]
    rows = []
    kept_total: dict[float, dict[str, int]] = {}
    for key in first.sparsities:
        kept_total[float(key)] = dict.fromkeys(masks, 0)
        for param in sorted(first.params):
            arrays = {task: _read_mask(file, criterion, key, param, task) for task, file in masks.items()}
            kept = {task: int(np.count_nonzero(a)) for task, a in arrays.items()}
            for task, count in kept.items():
                kept_total[float(key)][task] += count
            for task_a, task_b in itertools.combinations(arrays, 2):
                rows.append({
                    "sparsity": float(key), "task_a": task_a, "task_b": task_b, "level": "tensor", "name": param,
                    "layer": layers[param], "n_elements": arrays[task_a].size, "kept_a": kept[task_a],
                    "kept_b": kept[task_b],
                    "intersection": int(np.count_nonzero(arrays[task_a] & arrays[task_b])),
                })
    return pd.DataFrame(rows, columns=COUNT_COLUMNS), kept_total


def overlap_table(counts: pd.DataFrame) -> pd.DataFrame:
    """Add layer and global levels to tensor `counts`, then every metric (columns `COLUMNS`)."""
    pair = ["sparsity", "task_a", "task_b"]
    summed = ["n_elements", "kept_a", "kept_b", "intersection"]
    layers = counts.groupby(pair + ["layer"], dropna=False, sort=False)[summed].sum().reset_index()
    layers["level"] = "layer"
    layers["name"] = [f"layer.{int(x)}" if pd.notna(x) else "outside_layers" for x in layers["layer"]]
    model = counts.groupby(pair, sort=False)[summed].sum().reset_index()
    model["level"], model["name"], model["layer"] = "global", "model", None
    table = pd.concat([counts, layers, model], ignore_index=True)[COUNT_COLUMNS]
    metrics = [overlap_metrics(*(int(v) for v in row)) for row in table[summed].itertuples(index=False)]
    table = pd.concat([table, pd.DataFrame(metrics, columns=COLUMNS[len(COUNT_COLUMNS):])], axis=1)
    table["layer"] = table["layer"].astype("Int64")
    return table[COLUMNS]


def global_matrices(table: pd.DataFrame, kept_total: Mapping[float, Mapping[str, int]],
                    metric: str) -> dict[str, pd.DataFrame]:
    """Sparsity label -> task x task matrix of the global `metric`.

    The diagonal compares a mask with itself: 1, or NaN where the mask keeps nothing.
    """
    panels = {}
    for s, kept in kept_total.items():
        tasks = list(kept)
        matrix = pd.DataFrame(np.nan, index=tasks, columns=tasks)
        for task in tasks:
            matrix.loc[task, task] = 1.0 if kept[task] else math.nan
        rows = table[(table["level"] == "global") & (table["sparsity"] == s)]
        for row in rows.itertuples():
            matrix.loc[row.task_a, row.task_b] = matrix.loc[row.task_b, row.task_a] = getattr(row, metric)
        panels[f"sparsity {s:g}"] = matrix
    return panels


def run_overlap(mask_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                options: OverlapOptions | None = None) -> dict[str, Path]:
    """Phase 4 over all tasks: write `overlap.{parquet,csv}` and `overlap_heatmaps.png`.

    With a single task there is no pair: a warning is logged, the table is written empty
    (with its columns) and the heatmap shows the task against itself.

    Args:
        mask_paths: task -> the `masks.safetensors` phase 3 wrote for it.
        out_dir: directory to (re)create, atomically.
        options: phase settings (defaults if None).

    Returns:
        output key -> path: `overlap_parquet`, `overlap_csv`, `overlap_heatmap`.
    """
    options = options or OverlapOptions()
    masks = open_masks(mask_paths)
    if len(masks) < 2:
        log.warning("mask overlap needs two tasks, got only %s: writing an empty overlap table", list(masks))
    counts, kept_total = overlap_counts(masks)
    table = overlap_table(counts)
    panels = global_matrices(table, kept_total, options.heatmap_metric)
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(table, staging, "overlap")
        paths["overlap_heatmap"] = plots.task_heatmaps(
            panels, f"Mask overlap between tasks (global {options.heatmap_metric.replace('_', ' ')})",
            options.heatmap_metric.replace("_", " "), staging / "overlap_heatmaps.png", vmin=0.0, vmax=1.0,
        )
    return relocate(paths, staging, out_dir)


def _read_mask(file: MasksFile, criterion: str, key: str, param: str, task: str) -> np.ndarray:
    if param not in file.params:
        raise PhaseInputError(f"masks of task {task!r} have no {param}: rerun phase 3 for every task with one config")
    return np.asarray(file.read(criterion, key, param), dtype=bool)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
