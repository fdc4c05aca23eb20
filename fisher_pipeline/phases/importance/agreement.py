"""Phase 2, across tasks — do tasks rank tensors, heads, neurons and layers alike?

Spearman's rank correlation between two tasks' importance scores (`rank_by`) over the
units both stores hold, per level. Ties get average ranks (scipy's convention); a level
where either task's scores are constant has no defined correlation (NaN).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ... import plots
from ..common import atomic_output_dir, open_stores, relocate, write_table
from . import ImportanceOptions
from .compute import importance_tables

log = logging.getLogger(__name__)

#: Level -> columns identifying a unit in that level's phase 2 table.
LEVEL_KEYS = {
    "tensors": ["param"],
    "heads": ["layer", "block", "head"],
    "neurons": ["layer", "neuron"],
    "layers": ["layer"],
}
COLUMNS = ["level", "task_a", "task_b", "n_units", "spearman_rho", "p_value"]


def rank_agreement(tables: Mapping[str, Mapping[str, pd.DataFrame]], options: ImportanceOptions) -> pd.DataFrame:
    """Spearman correlation of importance between every pair of tasks, per level.

    Args:
        tables: task -> phase 2 tables (`importance_tables`), in task order.
        options: `rank_by` picks the score compared.

    Returns:
        one row per (level, task pair) with columns `COLUMNS`; empty for fewer than two tasks.
    """
    rows = []
    for (task_a, tables_a), (task_b, tables_b) in itertools.combinations(tables.items(), 2):
        for level, keys in LEVEL_KEYS.items():
            joined = tables_a[level].merge(tables_b[level], on=keys, suffixes=("_a", "_b"))
            score_a = joined[f"{options.score_column}_a"].to_numpy()
            score_b = joined[f"{options.score_column}_b"].to_numpy()
            rho, p_value = _spearman(score_a, score_b)
            rows.append({"level": level, "task_a": task_a, "task_b": task_b, "n_units": len(joined),
                         "spearman_rho": rho, "p_value": p_value})
    return pd.DataFrame(rows, columns=COLUMNS)


def agreement_matrices(agreement: pd.DataFrame, tasks: list[str]) -> dict[str, pd.DataFrame]:
    """Level -> symmetric task x task matrix of Spearman's rho (diagonal 1)."""
    matrices = {}
    for level in LEVEL_KEYS:
        matrix = pd.DataFrame(np.eye(len(tasks)), index=tasks, columns=tasks)
        for row in agreement[agreement["level"] == level].itertuples():
            matrix.loc[row.task_a, row.task_b] = matrix.loc[row.task_b, row.task_a] = row.spearman_rho
        matrices[level] = matrix
    return matrices


def run_rank_agreement(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                       options: ImportanceOptions | None = None) -> dict[str, Path]:
    """Phase 2 across tasks: write `rank_agreement.{parquet,csv}` and `rank_agreement.png`.

    A single task has no pair: a warning is logged and the table is written empty.

    Args:
        store_paths: task -> phase 1 store path.
        out_dir: directory to (re)create.
        options: phase 2 settings (defaults if None).

    Returns:
        output key -> path (`rank_agreement_parquet`, `rank_agreement_csv`, `rank_agreement_heatmap`).
    """
    options = options or ImportanceOptions()
    stores = open_stores(store_paths)
    if len(stores) < 2:
        log.warning("rank agreement needs two tasks, got only %s: writing an empty table", list(stores))
    tables = {task: importance_tables(store, task, options) for task, store in stores.items()}
    agreement = rank_agreement(tables, options)
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(agreement, staging, "rank_agreement")
        paths["rank_agreement_heatmap"] = plots.task_heatmaps(
            agreement_matrices(agreement, list(stores)), f"Rank agreement of Fisher {options.rank_by} between tasks",
            "Spearman rho", staging / "rank_agreement.png", vmin=-1.0, vmax=1.0, cmap="RdBu_r",
        )
    return relocate(paths, staging, out_dir)


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")  # constant or too few scores: correlation undefined
    result = stats.spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)
