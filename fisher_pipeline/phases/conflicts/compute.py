"""Phase 5 — where do two tasks' per-sample gradients point against each other?

For tasks A and B and a group G of parameters (one layer's module, or one attention
head's slice of it), every sample pair (i of A, j of B) has a similarity

    cosine:  s_ij = <g_i, g_j> / (|g_i| |g_j|)                         over the elements of G
    fisher:  s_ij = <g_i, g_j>_W / (|g_i|_W |g_j|_W),  W = 1 / (F_pool + lambda)

(`fisher` is the cosine after whitening each element by the pooled Fisher
`F_pool = (N_A F_A + N_B F_B) / (N_A + N_B)`, with `lambda = fisher_damping x` the mean of
`F_pool` over the parameter; both lie in [-1, 1]). The group's score is the mean over all
`N_A x N_B` pairs. Null hypothesis, in plain words: *in this group, a random sample of A
and a random sample of B have gradients that are, on average, orthogonal* (mean
similarity 0). It is tested with the two-sample U-statistic variance of
`fisher_pipeline.pair_stats` (every sample sits in many pairs, so pairs are not
independent), two-sided, and Benjamini-Hochberg q-values over all groups of the task pair.
A group is a `conflict` (mean < 0) or `synergy` (mean > 0) when q < `alpha` and its
alignment `mean / sqrt(within_a_mean x within_b_mean)` (the cosine between the two tasks'
mean gradient directions in the group, `fisher_pipeline.pair_stats`; the same measure as
phase 6's, and the same for a head as for a whole module) is at least `min_effect_size` in
magnitude.

Within-task baselines (mean similarity of distinct pairs i != j of A, and of B) sit
beside each cross-task mean: gradients of one task are usually aligned, so a cross-task
mean far below them is unusual even when it is positive.

Groups come from the stores' geometry: every per-sample parameter as a whole (layer x
module), and each attention head of it (Q and O per query head, K and V per KV head under
GQA). Samples whose gradient is exactly zero in a group have no direction there and are
left out of that group (`n_a`, `n_b` count the samples used).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import PhaseInputError
from ...layout import ROLES, ModelGeometry
from ...pair_stats import alignment, bh_labels, pair_mean_test
from ...sample_pairs import Group, LazyWeights, iter_param_pairs, pair_device
from ...store import FisherStore
from ..common import (
    warn_few_samples,
    write_table,
)
from ..pair_runner import run_pair_phase
from . import ConflictsOptions
from .figures import conflict_heatmaps

log = logging.getLogger(__name__)

COLUMNS = ["task_a", "task_b", "layer", "module", "block", "head", "param", "similarity", "n_a", "n_b", "n_pairs",
           "mean", "se", "effect_size", "p", "q", "label", "within_a_mean", "within_b_mean", "df", "se_floored",
           "status"]
TOP_COLUMNS = ["task_a", "task_b", "layer", "module", "block", "head", "rank", "sample_a", "sample_b", "similarity"]
#: Status of a group: `ok` (tested), or why it could not be tested (then p = q = 1, label `none`).
STATUSES = ("ok", "too_few_samples", "zero_gradients", "constant")


@dataclass
class GroupResult:
    """One group of one task pair: its table row and its most conflicting sample pairs."""

    row: dict
    top: list[tuple[int, int, float]]  # (row of A, row of B, similarity), most negative first


# --- groups ------------------------------------------------------------------------------

def conflict_groups(store: FisherStore) -> list[Group]:
    """Every per-sample parameter as a whole, then each of its attention heads, in layer order.

    Raises:
        PhaseInputError: the store holds no per-sample gradients.
    """
    geometry = store.geometry
    names = store.per_sample_names
    if not names:
        raise PhaseInputError(
            f"{store.path} stores no per-sample gradients, which phase 5 compares: set "
            "fisher.per_sample_params (e.g. attention) and rerun phase 1."
        )
    ordered = sorted(names, key=lambda name: (_layer_key(geometry[name].layer), ROLES.index(geometry[name].role),
                                              names.index(name)))
    groups: list[Group] = []
    for param in ordered:
        groups.append((param, None, None))
        for block in geometry[param].head_blocks():
            groups.extend((param, block, head) for head in range(geometry[param].positions(block).shape[0]))
    return groups


def _layer_key(layer: int | None) -> float:
    return math.inf if layer is None else layer


def module_name(param: str) -> str:
    """Display name of a parameter's module: the last name component before `weight`/`bias`."""
    parts = param.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]


# --- one task pair -----------------------------------------------------------------------

def fisher_weights(store_a: FisherStore, store_b: FisherStore, params: Sequence[str],
                   damping: float) -> Mapping[str, np.ndarray]:
    """`1 / (F_pool + lambda)` per parameter, `lambda = damping x mean(F_pool)` over the parameter.

    A parameter whose pooled Fisher is zero everywhere gets weight 1 (its gradients are zero:
    every similarity there is undefined anyway). Made when the pair engine asks for a
    parameter's, so one parameter's float64 weight is in memory at a time, not the model's.
    """
    n_a, n_b = store_a.n_samples, store_b.n_samples

    def weight(param: str) -> np.ndarray:
        pooled = (n_a * store_a.fisher(param).astype(np.float64)
                  + n_b * store_b.fisher(param).astype(np.float64)) / (n_a + n_b)
        scale = float(pooled.mean())
        return 1.0 / (pooled + damping * scale) if scale > 0 else np.ones_like(pooled)

    return LazyWeights(params, weight)


def group_statistics(cross: np.ndarray, within_a: float = math.nan, within_b: float = math.nan,
                     top_pairs: int = 0) -> GroupResult:
    """Test and baselines of one group's similarity matrices (before BH and labels).

    Rows of `cross` that are entirely NaN (a sample of A with a zero gradient in the group)
    and such columns (of B) are dropped. Where no test is possible the row says why in
    `status` and holds finite placeholders: `se = inf`, `p = 1`, `effect_size = 0`, means
    over the pairs available (0 without any). A tested group's `effect_size` is the
    alignment, NaN where a task shows no mean direction in it (within mean <= 0).

    Args:
        cross: `[N_A, N_B]` similarities of A's samples with B's.
        within_a, within_b: mean similarity of distinct sample pairs within A and within B
            (`PairMatrices.within_a`), NaN if undefined (then reported as 0, see status).
        top_pairs: how many of the most negative pairs to keep (row and column indices of
            `cross`).
    """
    rows_ok = ~np.isnan(cross).all(axis=1) if cross.shape[1] else np.zeros(cross.shape[0], bool)
    cols_ok = ~np.isnan(cross).all(axis=0) if cross.shape[0] else np.zeros(cross.shape[1], bool)
    used = cross[np.ix_(rows_ok, cols_ok)]
    n_a, n_b = int(rows_ok.sum()), int(cols_ok.sum())
    row = {"n_a": n_a, "n_b": n_b, "n_pairs": n_a * n_b,
           "within_a_mean": float(within_a) if np.isfinite(within_a) else 0.0,
           "within_b_mean": float(within_b) if np.isfinite(within_b) else 0.0,
           "mean": float(used.mean()) if used.size else 0.0, "se": math.inf, "effect_size": 0.0, "p": 1.0,
           "df": 0.0, "se_floored": False}
    if n_a == 0 or n_b == 0:
        row["status"] = "zero_gradients"
    elif n_a < 2 or n_b < 2:
        row["status"] = "too_few_samples"
    else:
        test = pair_mean_test(used)
        if not np.isfinite(test.p):
            row["status"] = "constant"
        else:
            row |= {"mean": test.mean, "se": test.se, "effect_size": float(alignment(test.mean, within_a, within_b)),
                    "p": test.p, "df": test.df, "se_floored": test.floored, "status": "ok"}
    top: list[tuple[int, int, float]] = []
    if top_pairs and used.size:
        flat = used.ravel()
        k = min(top_pairs, flat.size)
        best = np.argpartition(flat, k - 1)[:k]
        best = best[np.argsort(flat[best], kind="stable")]
        rows_index, cols_index = np.flatnonzero(rows_ok), np.flatnonzero(cols_ok)
        top = [(int(rows_index[i // n_b]), int(cols_index[i % n_b]), float(flat[i])) for i in best]
    return GroupResult(row, top)


def pair_conflicts(store_a: FisherStore, store_b: FisherStore, options: ConflictsOptions | None = None,
                   groups: Sequence[Group] | None = None, task_a: str | None = None,
                   task_b: str | None = None,
                   metric_stores: tuple[FisherStore, FisherStore] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phase 5 for one task pair: the group table (columns `COLUMNS`) and top pairs (`TOP_COLUMNS`).

    Each stored per-sample array of both stores is read once (`pairs.iter_param_pairs`);
    the similarity matrices of one parameter are reduced to statistics and dropped before
    the next is read.

    Args:
        store_a, store_b: the two tasks' stores (same model and per-sample selection).
        options: phase settings (defaults if None).
        groups: `(param, block, head)` groups; None: `conflict_groups(store_a)`.
        task_a, task_b: names in the outputs (default: the stores' `task` attributes).
        metric_stores: (A, B) stores whose pooled Fisher defines the `fisher` similarity's
            metric; default the compared stores (the held-out replication passes the
            discovery stores).

    Raises:
        PhaseInputError: a store holds no per-sample gradients.
        StoreMismatchError: the stores differ in model or per-sample selection.
    """
    options = options or ConflictsOptions()
    task_a = task_a or store_a.attrs.get("task", "A")
    task_b = task_b or store_b.attrs.get("task", "B")
    groups = list(groups) if groups is not None else conflict_groups(store_a)
    warn_few_samples(log, store_a, store_b, task_a, task_b, "a test")
    params = list(dict.fromkeys(group[0] for group in groups))
    weights = (fisher_weights(*(metric_stores or (store_a, store_b)), params, options.fisher_damping)
               if options.similarity == "fisher" else None)
    results: dict[Group, GroupResult] = {}
    for _, matrices in iter_param_pairs(store_a, store_b, groups, weights=weights, cosine=True, within=True,
                                        sample_block=options.sample_block, dtype=options.compute_dtype,
                                        device=pair_device(options.device, "conflicts.device")):
        for group, cross in matrices.items():
            results[group] = group_statistics(cross, matrices.within_a[group], matrices.within_b[group],
                                              options.top_pairs)
    table = conflict_table(store_a.geometry, {group: results[group].row for group in groups}, options, task_a, task_b)
    return table, _top_table(table, results, groups, store_a.sample_ids, store_b.sample_ids)


def conflict_table(geometry: ModelGeometry, rows: Mapping[Group, dict], options: ConflictsOptions,
                   task_a: str, task_b: str) -> pd.DataFrame:
    """Rows of `group_statistics` -> the pair's table: names, BH q-values over tested groups, labels."""
    records = []
    for (param, block, head), row in rows.items():
        records.append({"task_a": task_a, "task_b": task_b, "layer": geometry[param].layer,
                        "module": module_name(param), "block": block, "head": head, "param": param,
                        "similarity": options.similarity} | row)
    table = pd.DataFrame(records, columns=[c for c in COLUMNS if c not in ("q", "label")])
    table["q"], table["label"] = bh_labels(table["mean"].to_numpy(dtype=float), table["p"].to_numpy(dtype=float),
                                           table["effect_size"].to_numpy(dtype=float),
                                           (table["status"] == "ok").to_numpy(), options.alpha, options.min_effect_size)
    table["layer"] = table["layer"].astype("Int64")
    table["head"] = table["head"].astype("Int64")
    table = table[COLUMNS]
    for status in STATUSES[1:]:
        count = int((table["status"] == status).sum())
        if count:
            log.warning("%s vs %s: %d group(s) untested (%s), e.g. %s", task_a, task_b, count, status,
                        _group_text(table[table["status"] == status].iloc[0]))
    return table


def _top_table(table: pd.DataFrame, results: Mapping[Group, GroupResult], groups: Sequence[Group],
               ids_a: Sequence[str], ids_b: Sequence[str]) -> pd.DataFrame:
    rows = []
    for (_, info), group in zip(table.iterrows(), groups, strict=True):
        if info["label"] != "conflict":
            continue
        for rank, (i, j, value) in enumerate(results[group].top, start=1):
            rows.append({"task_a": info["task_a"], "task_b": info["task_b"], "layer": info["layer"],
                         "module": info["module"], "block": info["block"], "head": info["head"], "rank": rank,
                         "sample_a": ids_a[i], "sample_b": ids_b[j], "similarity": value})
    top = pd.DataFrame(rows, columns=TOP_COLUMNS)
    top["layer"] = top["layer"].astype("Int64")
    top["head"] = top["head"].astype("Int64")
    return top


def _group_text(row: pd.Series) -> str:
    where = f"layer {row['layer']} {row['module']}"
    return where if pd.isna(row["block"]) else f"{where} {row['block']} head {row['head']}"


def group_conflict(store_a: FisherStore, store_b: FisherStore, group: Group,
                   options: ConflictsOptions | None = None) -> tuple[dict, np.ndarray]:
    """Phase 5 for a single group: its table row (BH over this one group) and its `[N_A, N_B]` similarities.

    Args:
        group: `(param, None, None)` for a whole parameter or `(param, block, head)`.
    """
    options = options or ConflictsOptions()
    weights = (fisher_weights(store_a, store_b, [group[0]], options.fisher_damping)
               if options.similarity == "fisher" else None)
    (_, matrices), = iter_param_pairs(store_a, store_b, [group], weights=weights, cosine=True, within=True,
                                      sample_block=options.sample_block, dtype=options.compute_dtype,
                                      device=pair_device(options.device, "conflicts.device"))
    row = group_statistics(matrices[group], matrices.within_a[group], matrices.within_b[group]).row
    table = conflict_table(store_a.geometry, {group: row}, options, store_a.attrs.get("task", "A"),
                           store_b.attrs.get("task", "B"))
    return table.iloc[0].to_dict(), matrices[group]


# --- all pairs ---------------------------------------------------------------------------

def run_conflicts(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                  options: ConflictsOptions | None = None,
                  pairs: Sequence[Sequence[str]] | None = None) -> dict[str, Path]:
    """Phase 5 over task pairs: write `conflicts`, `top_pairs` (Parquet + CSV) and heatmaps.

    With exactly two stores the pair is compared (the workflow runs one job per pair); with
    more, `pairs` or `options.pairs` (default: every unordered pair, in the order given).
    BH q-values are taken per task pair.

    Args:
        store_paths: task -> phase 1 store with per-sample gradients.
        out_dir: directory to (re)create, atomically.
        options: phase settings (defaults if None).
        pairs: task pairs to compare instead of `options.pairs`.

    Returns:
        output key -> path: `conflicts_parquet`, `conflicts_csv`, `top_pairs_parquet`,
        `top_pairs_csv`, and `heatmap_<A>__<B>` per pair.
    """
    options = options or ConflictsOptions()

    def compute(store_a: FisherStore, store_b: FisherStore, task_a: str, task_b: str):
        return pair_conflicts(store_a, store_b, options, task_a=task_a, task_b=task_b)

    def write(chosen, results, staging: Path) -> dict[str, Path]:
        tables = [table for table, _ in results]
        table = pd.concat(tables, ignore_index=True)
        top = pd.concat([top for _, top in results], ignore_index=True)
        paths = write_table(table, staging, "conflicts") | write_table(top, staging, "top_pairs")
        for (task_a, task_b), pair_table in zip(chosen, tables, strict=True):
            key = f"heatmap_{task_a}__{task_b}"
            paths[key] = conflict_heatmaps(
                pair_table, f"Gradient {options.similarity} similarity, {task_a} vs {task_b}",
                f"mean {options.similarity} similarity", staging / f"{key}.png")
        return paths

    return run_pair_phase(store_paths, out_dir, section="conflicts", ordered=False, listed=options.pairs,
                          given=pairs, compute=compute, write=write)
