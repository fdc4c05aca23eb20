"""Phase 7 — Fisher-scaled (natural) gradients and cross-task EWC costs.

Per task, elementwise: the mean gradient `g = mean_i g_i` and the damped natural
gradient `n = g / (F + lambda)` (diagonal Fisher `F`, `lambda` = `damping`). Where
`F + lambda = 0`, `n = 0`: `F = 0` means every `g_i` was 0 there, so `g = 0` too.

Across tasks A, B (A's Fisher measures a step along B's natural gradient):

    cosine(A, B)  = <n_A, n_B> / (|n_A| |n_B|)            per group, tensor, layer, model
    ewc(A, B)     = 0.5 * sum F_A * (eta * n_B)^2           per tensor, layer, model

`ewc(A, B)` is the EWC penalty (quadratic Fisher cost) task A charges for a
natural-gradient step of size `eta` on task B; the diagonal `ewc(A, A)` is the cost of
a task's own step. Cosines with a zero vector are undefined (NaN).

Levels: `group` (a stored head / neuron group; whole tensors are their single group
`all`), `tensor`, `layer` (`outside_layers` for tensors outside layers) and `global`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ... import plots
from ...layout import ParamGeometry
from ...store import FisherStore, open_store
from ..common import atomic_output_dir, open_stores, read_finite, relocate, write_table
from . import ScaledOptions

log = logging.getLogger(__name__)

def natural_gradient(grad_mean: np.ndarray, fisher: np.ndarray, damping: float) -> np.ndarray:
    """`grad_mean / (fisher + damping)` elementwise, 0 where the denominator is 0 (float64)."""
    denominator = np.asarray(fisher, dtype=np.float64) + damping
    out = np.zeros(np.shape(grad_mean), dtype=np.float64)
    np.divide(grad_mean, denominator, out=out, where=denominator > 0)
    return out


def natgrad_norms(store: FisherStore, task: str, options: ScaledOptions) -> pd.DataFrame:
    """L2 norms of the mean and natural gradient of one task at every level.

    Returns:
        columns task, level, name, param, layer, group, n_elements, grad_norm, natgrad_norm.
    """
    rows = []
    for param in store.param_names:
        fisher = read_finite(store, "fisher", param)
        grad = read_finite(store, "grad_mean", param)
        layout = store.geometry[param]
        rows.append(_group_frame(layout, {
            "task": task, "n_elements": layout.sizes,
            "grad_sq": layout.reduce_sum(grad ** 2),
            "natgrad_sq": layout.reduce_sum(natural_gradient(grad, fisher, options.damping) ** 2),
        }))
    table = roll_up(pd.concat(rows, ignore_index=True), ["task"], ["n_elements", "grad_sq", "natgrad_sq"])
    table["grad_norm"] = np.sqrt(table.pop("grad_sq"))
    table["natgrad_norm"] = np.sqrt(table.pop("natgrad_sq"))
    return table


def cross_task_tables(stores: Mapping[str, FisherStore], options: ScaledOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cosines of natural gradients between task pairs, and the EWC cost matrix.

    Args:
        stores: task -> store, all of one model (see `common.open_stores`).
        options: damping and eta.

    Returns:
        (cosine table: task_a, task_b, level, name, param, layer, group, dot, natgrad_norm_a,
        natgrad_norm_b, cosine — empty for one task;
        EWC table: task_a (Fisher), task_b (step), level, name, param, layer, cost — every
        ordered pair including A = B, levels tensor, layer and global).
    """
    cosine_rows, ewc_rows = [], []
    first = next(iter(stores.values()))
    for param in first.param_names:
        fishers = {task: read_finite(store, "fisher", param) for task, store in stores.items()}
        natgrads = {task: natural_gradient(read_finite(store, "grad_mean", param), fishers[task], options.damping)
                    for task, store in stores.items()}
        layout = first.geometry[param]
        for task_a, task_b in itertools.combinations(stores, 2):
            cosine_rows.append(_group_frame(layout, {
                "task_a": task_a, "task_b": task_b,
                "dot": layout.reduce_sum(natgrads[task_a] * natgrads[task_b]),
                "sq_a": layout.reduce_sum(natgrads[task_a] ** 2), "sq_b": layout.reduce_sum(natgrads[task_b] ** 2),
            }))
        ewc_rows += [
            {"task_a": a, "task_b": b, "param": param, "layer": layout.layer,
             "cost": ewc_cost(fishers[a], natgrads[b], options.eta)}
            for a in stores for b in stores
        ]
    return _cosine_table(cosine_rows), _ewc_table(ewc_rows)


def ewc_cost(fisher_a: np.ndarray, natgrad_b: np.ndarray, eta: float) -> float:
    """`0.5 * sum F_A * (eta * natgrad_B)^2` over the elements given."""
    return float(0.5 * np.sum(fisher_a * np.square(eta * natgrad_b)))


def roll_up(groups: pd.DataFrame, keys: list[str], sums: list[str], with_groups: bool = True) -> pd.DataFrame:
    """Sum group rows into tensor, layer and global rows; returns all levels stacked.

    Args:
        groups: rows with columns `keys`, param, layer, group and `sums`.
        keys: columns that identify one table (task, or task pair); never summed over.
        sums: additive columns.
        with_groups: keep the group rows themselves (level "group").
    """
    levels = []
    if with_groups:
        levels.append(groups.assign(level="group", name=groups["param"] + ":" + groups["group"]))
    tensors = groups.groupby(keys + ["param", "layer"], dropna=False, sort=False)[sums].sum().reset_index()
    levels.append(tensors.assign(level="tensor", name=tensors["param"]))
    layers = groups.groupby(keys + ["layer"], dropna=False, sort=False)[sums].sum().reset_index()
    names = ["outside_layers" if pd.isna(x) else f"layer.{int(x)}" for x in layers["layer"]]
    levels.append(layers.assign(level="layer", name=names))
    model = groups.groupby(keys, sort=False)[sums].sum().reset_index()
    levels.append(model.assign(level="global", name="model"))
    table = pd.concat(levels, ignore_index=True)
    for column in ("param", "group"):
        if column not in table:
            table[column] = None
    table["layer"] = table["layer"].astype("Int64")
    return table[keys + ["level", "name", "param", "layer", "group"] + sums]


def run_scaled_task(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                    options: ScaledOptions | None = None, task: str | None = None) -> dict[str, Path]:
    """Phase 7 for one task: write `natgrad_norms.{parquet,csv}` into `out_dir` (atomically).

    Returns:
        output key -> path: `natgrad_norms_parquet`, `natgrad_norms_csv`.
    """
    options = options or ScaledOptions()
    store = open_store(store_path)
    task = task or str(store.attrs.get("task", Path(store_path).stem))
    table = natgrad_norms(store, task, options)
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(table, staging, "natgrad_norms")
    return relocate(paths, staging, out_dir)


def run_scaled_cross(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                     options: ScaledOptions | None = None) -> dict[str, Path]:
    """Phase 7 across tasks: natural-gradient cosines, EWC costs, and their global heatmaps.

    A single task has no pair: a warning is logged and the cosine table is written empty;
    the EWC table then holds the task's own cost.

    Returns:
        output key -> path: `natgrad_cosine_{parquet,csv}`, `ewc_cost_{parquet,csv}`,
        `natgrad_cosine_heatmap`, `ewc_cost_heatmap` (PNG).
    """
    options = options or ScaledOptions()
    stores = open_stores(store_paths)
    if len(stores) < 2:
        log.warning("natural-gradient cosines need two tasks, got only %s: writing an empty table", list(stores))
    cosine, ewc = cross_task_tables(stores, options)
    tasks = list(stores)
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(cosine, staging, "natgrad_cosine") | write_table(ewc, staging, "ewc_cost")
        paths["natgrad_cosine_heatmap"] = plots.task_heatmaps(
            {"whole model": _global_matrix(cosine, tasks, "cosine", symmetric=True, diagonal=1.0)},
            "Cosine of natural gradients between tasks", "cosine", staging / "natgrad_cosine.png",
            vmin=-1.0, vmax=1.0, cmap="RdBu_r",
        )
        paths["ewc_cost_heatmap"] = plots.task_heatmaps(
            {"whole model": _global_matrix(ewc, tasks, "cost", symmetric=False)},
            f"EWC cost of a natural-gradient step (eta = {options.eta:g})", "0.5 * sum F_A (eta n_B)^2",
            staging / "ewc_cost.png", row_label="A: Fisher of task", column_label="B: step on task",
        )
    return relocate(paths, staging, out_dir)


def _group_frame(layout: ParamGeometry, columns: dict) -> pd.DataFrame:
    """One row per group of `layout`, with the parameter, layer, group name and `columns`."""
    frame = pd.DataFrame({"param": layout.param, "layer": layout.layer, "group": list(layout.groups.names)})
    for key, value in columns.items():
        frame[key] = value
    return frame


def _cosine_table(rows: list[pd.DataFrame]) -> pd.DataFrame:
    columns = ["task_a", "task_b", "level", "name", "param", "layer", "group", "dot", "natgrad_norm_a",
               "natgrad_norm_b", "cosine"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = roll_up(pd.concat(rows, ignore_index=True), ["task_a", "task_b"], ["dot", "sq_a", "sq_b"])
    table["natgrad_norm_a"] = np.sqrt(table.pop("sq_a"))
    table["natgrad_norm_b"] = np.sqrt(table.pop("sq_b"))
    norms = table["natgrad_norm_a"] * table["natgrad_norm_b"]
    table["cosine"] = np.where(norms > 0, table["dot"] / norms.where(norms > 0, 1.0), np.nan)
    return table[columns]


def _ewc_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).assign(group="all")
    table = roll_up(frame, ["task_a", "task_b"], ["cost"], with_groups=False)
    return table.drop(columns="group")


def _global_matrix(table: pd.DataFrame, tasks: list[str], column: str, symmetric: bool,
                   diagonal: float | None = None) -> pd.DataFrame:
    values = np.full((len(tasks), len(tasks)), np.nan)
    if diagonal is not None:
        np.fill_diagonal(values, diagonal)
    matrix = pd.DataFrame(values, index=tasks, columns=tasks)
    for row in table[table["level"] == "global"].itertuples():
        matrix.loc[row.task_a, row.task_b] = getattr(row, column)
        if symmetric:
            matrix.loc[row.task_b, row.task_a] = getattr(row, column)
    return matrix
