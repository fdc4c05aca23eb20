"""Phase 2 — Fisher importance per tensor, head, neuron and layer, with head heatmaps.

Everything is computed from the group arrays of a store (`group/`, `group_m2/`): the
groups of a parameter partition it, so a tensor's Fisher sum is the sum of its groups'
and the model total the sum of all groups. These arrays hold one number per head /
neuron, so this phase reads kilobytes, not the model-sized `fisher/` arrays.

Columns of every table:
    n_elements   parameter elements in the unit
    fisher_sum   Fisher summed over the unit's elements
    fisher_mean  fisher_sum / n_elements (Fisher per parameter)
    share        fisher_sum / model total (shares of a partition of the model sum to 1)
    rank         1 = most important by `rank_by` (ties share the lowest rank)
    se           standard error of fisher_sum, from Welford `group_m2` (NaN for N < 2)
    se_mean      se / n_elements
    snr          fisher_sum / se (inf when se = 0 < fisher_sum, NaN when both are 0)
    se_is_bound  True when the unit spans several stored groups (a tensor with heads, a
                 neuron across gate/up/down): the covariances between groups are not
                 stored, so `se` is then the sum of the groups' standard errors, an
                 upper bound (Minkowski), and `snr` a lower bound.

Criteria of pruning (phase 3), with the same units:
    saliency_sum     0.5 * sum over the unit's elements of F * w^2: the Optimal Brain Damage
                     estimate of the loss increase when the unit's weights are set to 0
    saliency_se      its standard error (Welford `group_saliency_m2`; summed over stored
                     groups when the unit spans several, an upper bound like `se`)
    gate_fisher      mean_i gate_i^2, the Fisher of a multiplicative gate on the unit, where
                     gate_i = sum over the unit's elements of g_i * w (phase 1's `gate/`): the
                     per-sample gates of the unit's groups are summed before squaring. In the
                     `neurons` table the gate is the neuron's output (its down-projection
                     column), the gate that removing the neuron closes; `0.5 * gate_fisher`
                     is the second-order loss increase of removing the unit
    gate_fisher_se   sd_i(gate_i^2) / sqrt(N)

Precision table (`precision`): per unit kind (head, neuron), the relative standard error of
the stored groups' Fisher (median, 90th percentile) and the samples a target relative
standard error (10%, 5%, 3%, 1%) would need (`precision.py`).

Head table (`heads`): one row per (layer, block, head) for blocks q, k, v, o. It is
GQA-aware: K and V rows are per KV head, as stored (`head_kind == "kv"`), and
`query_heads` lists the query heads that read each KV head. Its heatmap
(`heads_heatmap.png`) shows the gate Fisher per head, `heads_fisher_heatmap.png` the
Fisher (`rank_by`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import StoreContentError
from ...layout import HEAD_BLOCKS, KV_BLOCKS, AttentionGeometry
from ...store import FisherStore, open_store
from ..common import atomic_output_dir, read_finite, relocate, write_table
from . import ImportanceOptions
from .figures import head_heatmaps
from .precision import precision_table

TABLES = ("tensors", "groups", "heads", "neurons", "layers", "precision")


def group_table(store: FisherStore, task: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per (parameter, stored group) with the group's Fisher sum, saliency and standard errors.

    Returns:
        the table, and the per-sample gate gradients `[N, rows]` of its rows (column r: row r).

    Raises:
        StoreContentError: a group array holds NaN or inf (naming the store and tensor).
    """
    frames, gates = [], []
    for param in store.param_names:
        sums = read_finite(store, "group", param)
        m2 = read_finite(store, "group_m2", param)
        geometry = store.geometry[param]
        groups = geometry.groups
        frames.append(pd.DataFrame({
            "task": task,
            "param": param,
            "layer": pd.array([geometry.layer] * len(sums), dtype="Int64"),
            "role": geometry.role,
            "group": list(groups.names),
            "block": groups.blocks,
            "index": pd.array([None if block == "all" else index for block, index in groups.keys], dtype="Int64"),
            "n_elements": geometry.sizes,
            "fisher_sum": sums,
            "se": _standard_error(m2, store.n_samples),
            "saliency_sum": store.group_saliency(param),
            "saliency_se": store.group_saliency_se(param),
        }))
        gates.append(store.gate(param))
    gate = np.concatenate(gates, axis=1)
    if not np.isfinite(gate).all():
        raise StoreContentError(f"gate/ arrays of store {store.path} hold non-finite values: rerun phase 1")
    return pd.concat(frames, ignore_index=True), gate


def importance_tables(store: FisherStore, task: str, options: ImportanceOptions) -> dict[str, pd.DataFrame]:
    """Every phase 2 table of one task: tensors, groups, heads, neurons, layers, and the
    precision of its head and neuron Fisher (`precision.precision_table`).

    Raises:
        StoreContentError: the Fisher is zero for the whole model (shares undefined), or a
            store array is not finite.
    """
    groups, gates = group_table(store, task)
    total = float(groups["fisher_sum"].sum())
    if total <= 0:
        raise StoreContentError(
            f"the Fisher in store {store.path} is zero for every parameter: shares are undefined. "
            f"Check that phase 1 saw labelled tokens (label masks) for task {task!r}."
        )
    heads = groups[groups["block"].isin(HEAD_BLOCKS) & groups["index"].notna()].rename(columns={"index": "head"})
    neurons = groups[groups["block"] == "neuron"].rename(columns={"index": "neuron"})
    output_side = neurons["role"] == "mlp_out"  # the neuron's gate: its output column
    tables = {
        "tensors": summarize(groups, ["task", "param", "layer"], total, options, gates),
        "groups": summarize(groups, ["task", "param", "layer", "group", "block", "index"], total, options, gates),
        "heads": _with_gqa_columns(summarize(heads, ["task", "layer", "block", "head"], total, options, gates),
                                   store.geometry.attention),
        "neurons": summarize(neurons, ["task", "layer", "neuron"], total, options, gates, output_side),
        "layers": summarize(groups, ["task", "layer"], total, options),
    }
    n_tensors = groups.groupby("layer", dropna=False)["param"].nunique().rename("n_tensors").reset_index()
    tables["layers"] = tables["layers"].merge(n_tensors, on="layer", how="left")
    tables["precision"] = precision_table(groups, store.n_samples, task)
    return tables


def summarize(parts: pd.DataFrame, keys: list[str], total: float, options: ImportanceOptions,
              gates: np.ndarray | None = None, gate_rows: pd.Series | None = None) -> pd.DataFrame:
    """Aggregate group rows `parts` into units keyed by `keys`, with the derived columns.

    Args:
        parts: rows of `group_table` (columns n_elements, fisher_sum, se, saliency_sum,
            saliency_se and `keys`).
        keys: columns identifying a unit (e.g. ["task", "param", "layer"] for tensors).
        total: the model's Fisher sum, denominator of `share`.
        options: `rank_by` decides the ranking score.
        gates: per-sample gates `[N, rows of group_table]`: gate_fisher columns when given
            (a unit's gate is the sum of its rows' gates, per sample, before squaring).
        gate_rows: bool per row of `parts`: only these rows' gates make up a unit's gate
            (default: every row).
    """
    units = parts.assign(se_missing=parts["se"].isna()).groupby(keys, dropna=False, sort=True).agg(
        n_elements=("n_elements", "sum"), fisher_sum=("fisher_sum", "sum"), se=("se", "sum"),
        se_missing=("se_missing", "any"), n_parts=("fisher_sum", "size"), saliency_sum=("saliency_sum", "sum"),
        saliency_se=("saliency_se", "sum"),
    ).reset_index()
    units.loc[units.pop("se_missing"), ["se", "saliency_se"]] = np.nan  # pandas' sum skips NaN; N < 2 has no SE
    units["fisher_mean"] = units["fisher_sum"] / units["n_elements"]
    units["share"] = units["fisher_sum"] / total
    units["se_mean"] = units["se"] / units["n_elements"]
    with np.errstate(divide="ignore", invalid="ignore"):
        units["snr"] = units["fisher_sum"].to_numpy() / units["se"].to_numpy()
    units["se_is_bound"] = units.pop("n_parts") > 1
    units["rank"] = units[options.score_column].rank(ascending=False, method="min").astype(np.int64)
    order = ["n_elements", "fisher_sum", "fisher_mean", "share", "rank", "se", "se_mean", "snr", "se_is_bound",
             "saliency_sum", "saliency_se"]
    if gates is not None:
        units["gate_fisher"], units["gate_fisher_se"] = _gate_fisher(parts, keys, units, gates, gate_rows)
        order += ["gate_fisher", "gate_fisher_se"]
    return units[keys + order]


def _gate_fisher(parts: pd.DataFrame, keys: list[str], units: pd.DataFrame, gates: np.ndarray,
                 gate_rows: pd.Series | None) -> tuple[np.ndarray, np.ndarray]:
    """mean_i gate_i^2 of every unit and its standard error, the unit's gate summed over its rows."""
    unit_of = parts.groupby(keys, dropna=False, sort=True).ngroup().to_numpy()  # the order of `units`
    rows = np.ones(len(parts), dtype=bool) if gate_rows is None else gate_rows.to_numpy()
    per_unit = np.zeros((gates.shape[0], len(units)))
    np.add.at(per_unit.T, unit_of[rows], gates[:, parts.index.to_numpy()[rows]].T)  # [N, units], per sample
    squares = per_unit ** 2
    n = gates.shape[0]
    fisher = squares.mean(axis=0)
    se = squares.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(units), np.nan)
    has_gate = np.isin(np.arange(len(units)), unit_of[rows])  # a unit with no gate row has no gate
    fisher[~has_gate], se[~has_gate] = np.nan, np.nan
    return fisher, se


def run_importance(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                   options: ImportanceOptions | None = None, task: str | None = None) -> dict[str, Path]:
    """Phase 2 for one task: write its tables and head heatmaps into `out_dir` (atomically).

    Args:
        store_path: the task's phase 1 store.
        out_dir: directory to (re)create.
        options: phase settings (defaults if None).
        task: task name for the tables (default: the store's `task` attr).

    Returns:
        output key -> path: `<table>_parquet` / `<table>_csv` for tables tensors, groups,
        heads, neurons, layers, precision, `heads_heatmap` (PNG, gate Fisher) and `heads_fisher_heatmap`
        (PNG, Fisher).
    """
    options = options or ImportanceOptions()
    store = open_store(store_path)
    task = task or str(store.attrs.get("task", Path(store_path).stem))
    tables = importance_tables(store, task, options)
    with atomic_output_dir(out_dir) as staging:
        paths: dict[str, Path] = {}
        for name in TABLES:
            paths |= write_table(tables[name], staging, name)
        paths["heads_heatmap"] = head_heatmaps(
            tables["heads"], "gate_fisher", f"Gate Fisher mean_i gate_i^2 per head — task {task}",
            staging / "heads_heatmap.png", log_scale=options.log_color,
        )
        paths["heads_fisher_heatmap"] = head_heatmaps(
            tables["heads"], options.score_column, f"Fisher {options.rank_by} per head — task {task}",
            staging / "heads_fisher_heatmap.png", log_scale=options.log_color,
        )
    return relocate(paths, staging, out_dir)


def _standard_error(m2: np.ndarray, n_samples: int) -> np.ndarray:
    """Standard error of a Welford mean from its M2: `sqrt(M2 / (N - 1) / N)` (NaN for N < 2)."""
    if n_samples < 2:
        return np.full(m2.shape, np.nan)
    return np.sqrt(m2 / (n_samples - 1) / n_samples)


def _with_gqa_columns(heads: pd.DataFrame, attention: AttentionGeometry) -> pd.DataFrame:
    """Add `head_kind` (query / kv) and `query_heads` (the query heads reading each row's head).

    The query heads of each KV head come from the GQA map the adapter stored.
    """
    heads = heads.copy()
    heads["head_kind"] = np.where(heads["block"].isin(KV_BLOCKS), "kv", "query")
    readers = {kv: ",".join(map(str, attention.query_heads(kv))) for kv in range(attention.n_kv_heads)}
    is_kv = heads["head_kind"] == "kv"
    heads["query_heads"] = np.where(is_kv, heads["head"].map(readers).fillna(""), heads["head"].astype(str))
    return heads
