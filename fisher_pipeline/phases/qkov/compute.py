"""Phase 6 — Q/K/V/O interference between two tasks, per layer, block and head.

For an ordered task pair (A, B), layer l, block X in {q, k, v, o} and head h, with S the
head's slice of X's parameter (K and V per KV head under GQA) and

    w_k = 1 / (max(F_k, eps) + lambda)         F from A (default), B, or pooled over both

every sample pair (i of A, j of B) has the score

    M[i, j] = agg_{k in S} a(g_A,i,k) * w_k * b(g_B,j,k)       agg: mean (default) or sum

`unsigned` (default): a = g^2, b = |g|; `signed`: a = b = g; `symmetric`: a = b = |g|.
One cell costs one batched matrix product over all pairs, the signed one
(`fisher_pipeline.sample_pairs`); the variant's score needs only its row and column sums
(`marginals`), and its full matrix only for `forensics: excess`.

What the averages show. With F from A and eps, lambda negligible, `mean_i g_A,i,k^2 / F_A,k
= 1` at every k, so the mean of the unsigned M over all pairs is `agg_k mean_j |g_B,j,k|`:
A cancels, and a heatmap of mean unsigned M shows where B's updates are large, not where
the tasks interfere. A's part lives in the per-pair structure, which `excess` forensics
read. The signed mean `agg_k gbar_A,k w_k gbar_B,k` is the first-order change of A's loss
under a Fisher-preconditioned step on B through that head (negative: conflict). It is the
quantity tested, cell by cell. Null hypothesis, in plain words: *through this head, A's
and B's gradients are orthogonal in the Fisher metric* (`E M_signed[i, j] = 0`), with the
two-sample U-statistic test of `fisher_pipeline.pair_stats` and Benjamini-Hochberg over
the cells of the run. A cell is a `conflict` (signed mean < 0) or `synergy` when q < `alpha`
and its alignment, `signed_mean / sqrt(within_a_mean x within_b_mean)` with the within-task
means of distinct sample pairs of one task (the cosine between the two tasks' mean
gradients in the head, in the Fisher metric), is at least `min_effect_size`: phase 5's
rule, which means the same for a head and for a whole module. The unsigned (or symmetric)
score is reported with a first-order bootstrap confidence interval over samples of A and
of B (`_score_interval`), not tested.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import PhaseInputError
from ...pair_stats import alignment, bh_labels, pair_mean_test
from ...sample_pairs import Group, LazyWeights, iter_param_pairs, pair_device
from ...store import FisherStore
from ..common import (
    warn_few_samples,
    write_table,
)
from ..pair_runner import run_pair_phase
from . import QkovOptions
from .figures import qkov_figure

log = logging.getLogger(__name__)

#: Variant -> (f applied to A's g, h applied to B's g).
VARIANTS = {"unsigned": ("square", "abs"), "signed": ("identity", "identity"), "symmetric": ("abs", "abs")}
CELL_COLUMNS = ["task_a", "task_b", "layer", "block", "head", "param", "n_a", "n_b", "slice_size", "variant",
                "aggregate", "fisher_pool", "signed_mean", "signed_se", "signed_p", "signed_q", "df", "se_floored",
                "within_a_mean", "within_b_mean", "effect_size", "label", "score_mean", "score_ci_low",
                "score_ci_high", "status"]
HEALTH_COLUMNS = ["layer", "block", "head", "param", "slice_size", "fisher_pool", "fisher_min", "fisher_median",
                  "fisher_max", "fraction_below_eps", "eps", "ridge_lambda"]
TOP_COLUMNS = ["task_a", "task_b", "layer", "block", "head", "variant", "rank", "sample_a", "sample_b", "score",
               "a_alone", "b_alone", "excess"]


# --- cells -------------------------------------------------------------------------------

def qkov_cells(store: FisherStore) -> list[Group]:
    """Every (param, block, head) of the stored per-sample parameters, in layer order.

    Raises:
        PhaseInputError: the store holds no per-sample gradient of an attention head.
    """
    geometry = store.geometry
    cells: list[Group] = []
    for param in store.per_sample_names:
        for block in geometry[param].head_blocks():
            cells.extend((param, block, head) for head in range(geometry[param].positions(block).shape[0]))
    if not cells:
        raise PhaseInputError(
            f"{store.path} stores no per-sample gradients of attention heads (per-sample parameters: "
            f"{store.per_sample_names[:4] or 'none'}), which phase 6 needs: set fisher.per_sample_params to "
            "attention and rerun phase 1."
        )
    layer = {param: geometry[param].layer for param in store.per_sample_names}
    order = {block: index for index, block in enumerate("qkvo")}
    return sorted(cells, key=lambda c: (math.inf if layer[c[0]] is None else layer[c[0]], order[c[1]], c[2]))


def pooled_fisher(store_a: FisherStore, store_b: FisherStore, param: str, pool: str) -> np.ndarray:
    """The Fisher of `pool` (`a`, `b`, or `pooled`: sample-weighted mean), float64, the parameter's shape."""
    if pool == "a":
        return store_a.fisher(param).astype(np.float64)
    if pool == "b":
        return store_b.fisher(param).astype(np.float64)
    n_a, n_b = store_a.n_samples, store_b.n_samples
    total = n_a * store_a.fisher(param).astype(np.float64) + n_b * store_b.fisher(param).astype(np.float64)
    return total / max(n_a + n_b, 1)


class _Metric(LazyWeights):
    """Parameter -> `w = 1 / Fhat` (float64, the parameter's shape), made when the pair engine
    asks for it: one parameter's metric at a time in memory, not the model's (0.6 GB of
    float64 for SmolLM2's 120 attention tensors, the largest part of a job at N = 32)."""

    def __init__(self, store_a: FisherStore, store_b: FisherStore, params: Sequence[str], options: QkovOptions):
        super().__init__(params, self._weight)
        self.stores, self.options = (store_a, store_b), options
        self._param: str | None = None
        self._fisher = self._hat = np.zeros(0)
        self._split: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, param: str) -> None:
        if param != self._param:
            self._fisher = pooled_fisher(*self.stores, param, self.options.fisher_pool)
            self._hat = np.maximum(self._fisher, self.options.eps) + self.options.ridge_lambda
            self._param, self._split = param, {}

    def _weight(self, param: str) -> np.ndarray:
        self._load(param)
        return 1.0 / self._hat

    def heads(self, param: str, block: str) -> tuple[np.ndarray, np.ndarray]:
        """`(F, Fhat)` of `param` split into `block`'s heads `[H, ...]` (the health table's)."""
        self._load(param)
        if block not in self._split:
            geometry = self.stores[0].geometry[param]
            self._split[block] = geometry.split_heads(self._fisher, block), geometry.split_heads(self._hat, block)
        return self._split[block]


# --- one ordered pair --------------------------------------------------------------------

def pair_qkov(store_a: FisherStore, store_b: FisherStore, options: QkovOptions | None = None,
              cells: Sequence[Group] | None = None, task_a: str | None = None, task_b: str | None = None,
              metric_stores: tuple[FisherStore, FisherStore] | None = None) -> dict[str, pd.DataFrame]:
    """Phase 6 for one ordered pair: `cells` (before BH: `signed_q`, `label` over these cells
    only), `health` and `top_conflicts` tables.

    Each per-sample array of both stores is read once (`pairs.iter_param_pairs`): the
    chosen variant and the signed score come from the same reads.

    Args:
        metric_stores: (A, B) stores whose Fisher defines the metric `w`; default the
            compared stores. The held-out replication scores held-out samples in the
            metric of the discovery run, so the statistic is the same function of the data.
    """
    options = options or QkovOptions()
    task_a = task_a or store_a.attrs.get("task", "A")
    task_b = task_b or store_b.attrs.get("task", "B")
    cells = list(cells) if cells is not None else qkov_cells(store_a)
    warn_few_samples(log, store_a, store_b, task_a, task_b, "the signed test")
    params = list(dict.fromkeys(cell[0] for cell in cells))
    metric_a, metric_b = metric_stores or (store_a, store_b)
    metric = _Metric(metric_a, metric_b, params, options)
    # One product per cell: the signed matrix, which the test needs whole. The unsigned or
    # symmetric score enters only through its mean and interval, which need its row and column
    # sums (`marginals`, O(N S)); its full matrix only for `excess` forensics.
    variant = {} if options.variant == "signed" else {"score": VARIANTS[options.variant]}
    products = variant if options.forensics == "excess" else {}
    geometry = store_a.geometry
    rng = np.random.default_rng(0)
    draws_a = rng.multinomial(store_a.n_samples, np.full(store_a.n_samples, 1 / max(store_a.n_samples, 1)),
                              size=options.n_bootstrap) if store_a.n_samples else None
    draws_b = rng.multinomial(store_b.n_samples, np.full(store_b.n_samples, 1 / max(store_b.n_samples, 1)),
                              size=options.n_bootstrap) if store_b.n_samples else None
    rows, health, candidates = [], [], []
    for param, matrices in iter_param_pairs(store_a, store_b, cells, "identity", "identity", metric, within=True,
                                            sample_block=options.sample_block, dtype=options.compute_dtype,
                                            products=products, marginals=variant,
                                            device=pair_device(options.device, "qkov.device")):
        for cell, signed in matrices.items():
            _, block, head = cell
            if variant:
                score_rows, score_cols = matrices.marginals["score"][cell]
            else:
                score_rows, score_cols = signed.sum(axis=1), signed.sum(axis=0)
            size = int(geometry[param].positions(block).shape[1] * np.prod(geometry[param].shape)
                       // geometry[param].shape[geometry[param].groups.dim])
            # within-task signed means (unbiased |E g|^2 in the same metric): the alignment's scale
            within_a, within_b = matrices.within_a[cell], matrices.within_b[cell]
            divisor = size if options.aggregate == "mean" else 1
            signed, score_rows, score_cols = signed / divisor, score_rows / divisor, score_cols / divisor
            within_a, within_b = within_a / divisor, within_b / divisor
            row = {"task_a": task_a, "task_b": task_b, "layer": geometry[param].layer, "block": block, "head": head,
                   "param": param, "n_a": signed.shape[0], "n_b": signed.shape[1], "slice_size": size,
                   "variant": options.variant, "aggregate": options.aggregate, "fisher_pool": options.fisher_pool}
            row |= _signed_test(signed) | _score_interval(score_rows, score_cols, draws_a, draws_b)
            row |= {"within_a_mean": within_a, "within_b_mean": within_b,
                    "effect_size": alignment(row["signed_mean"], within_a, within_b)
                    if row["status"] == "ok" else 0.0}
            rows.append(row)
            fisher, hat = (heads[head] for heads in metric.heads(param, block))
            health.append({"layer": geometry[param].layer, "block": block, "head": head, "param": param,
                           "slice_size": size, "fisher_pool": options.fisher_pool,
                           "fisher_min": float(hat.min()), "fisher_median": float(np.median(hat)),
                           "fisher_max": float(hat.max()),
                           "fraction_below_eps": float(np.mean(fisher <= options.eps)),
                           "eps": options.eps, "ridge_lambda": options.ridge_lambda})
            if min(signed.shape) >= 2:  # with one sample on a side, "more than B alone explains" means nothing
                excess = options.forensics == "excess"
                candidates.extend(_forensics(matrices.products["score"][cell] / divisor if excess else signed,
                                             options, row))
    table = pd.DataFrame(rows, columns=[c for c in CELL_COLUMNS if c not in ("signed_q", "label")])
    table = label_cells(table, options.alpha, options.min_effect_size)
    top = _top_conflicts(candidates, options, store_a.sample_ids, store_b.sample_ids)
    for status in ("too_few_samples", "zero_gradients"):
        count = int((table["status"] == status).sum())
        if count:
            first = table[table["status"] == status].iloc[0]
            log.warning("%s -> %s: %d cell(s) untested (%s), e.g. layer %s %s head %s", task_a, task_b, count,
                        status, first["layer"], first["block"], first["head"])
    return {"cells": table, "health": pd.DataFrame(health, columns=HEALTH_COLUMNS), "top_conflicts": top}


def _signed_test(signed: np.ndarray) -> dict:
    """U-statistic test of the signed alignment; finite placeholders where none is possible."""
    out = {"signed_mean": float(signed.mean()) if signed.size else 0.0, "signed_se": math.inf, "signed_p": 1.0,
           "df": 0.0, "se_floored": False}
    if signed.shape[0] < 2 or signed.shape[1] < 2:
        return out | {"status": "too_few_samples"}
    if not np.any(signed):
        return out | {"status": "zero_gradients"}
    test = pair_mean_test(signed)
    if not np.isfinite(test.p):
        return out | {"status": "constant"}
    return {"signed_mean": test.mean, "signed_se": test.se, "signed_p": test.p, "df": test.df,
            "se_floored": test.floored, "status": "ok"}


def _score_interval(row_sums: np.ndarray, col_sums: np.ndarray, draws_a: np.ndarray | None,
                    draws_b: np.ndarray | None) -> dict:
    """Mean of a score matrix `M` `[N_A, N_B]` from its row sums `[N_A]` and column sums `[N_B]`,
    and its 95% percentile interval under the first-order bootstrap over samples (not pairs).

    Resampling A's samples with counts `c` and B's with counts `d` moves the mean to
    `c^T M d / (N_A N_B)`. Its first-order (Hajek) part, `(c . rows + d . cols) / (N_A N_B) -
    mean`, needs only the sums: one matrix product per side for all draws. What it leaves out
    is the pair-level interaction of `M`, whose variance is O(1 / (N_A N_B)) against the
    O(1 / N) of what it keeps (docs/phases.md compares it with the full bootstrap).

    Args:
        draws_a, draws_b: `[R, N_A]`, `[R, N_B]` multinomial resample counts, or None.
    """
    n_a, n_b = row_sums.size, col_sums.size
    mean = float(row_sums.sum()) / (n_a * n_b) if n_a and n_b else 0.0
    if draws_a is None or draws_b is None or not len(draws_a) or not n_a or not n_b:
        return {"score_mean": mean, "score_ci_low": mean, "score_ci_high": mean}
    resampled = (draws_a @ row_sums + draws_b @ col_sums) / (n_a * n_b) - mean  # [R]
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"score_mean": mean, "score_ci_low": float(low), "score_ci_high": float(high)}


def _forensics(score: np.ndarray, options: QkovOptions, row: dict) -> list[tuple]:
    """Candidate sample pairs of one cell: `(key, i, j, score, a_alone, b_alone, excess, row)`.

    `score` is the signed matrix (`forensics: signed`) or the variant's (`excess`).
    signed: the most negative pairs (key = score). excess: the pairs whose unsigned or
    symmetric score most exceeds what each sample alone explains,

        excess = M[i, j] * mean(M) / (a_alone[i] * b_alone[j]),
        a_alone[i] = mean_j M[i, j],   b_alone[j] = mean_i M[i, j]

    (A's sample i against an average sample of B, and B's sample j against an average
    sample of A; with F from A, `b_alone[j] = agg_k |g_B,j,k|`). Where M is a product of a
    row and a column factor (a loud sample of A, a loud sample of B, nothing shared) every
    excess is 1; a large excess is a pair that meets exactly where both push (key = -excess,
    so smaller keys rank first). Normalising by B's side alone let a sample of A that is
    large everywhere outrank pairs that truly meet.
    """
    if not options.top_k or score.size == 0:
        return []
    a_alone, b_alone = score.mean(axis=1), score.mean(axis=0)  # [N_A], [N_B]
    if options.forensics == "signed":
        key = score
        excess = np.zeros_like(score)
    else:
        expected = np.outer(a_alone, b_alone) / score.mean() if score.mean() > 0 else np.zeros_like(score)
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where(expected > 0, score / np.where(expected > 0, expected, 1.0), 0.0)
        key = -excess
    flat = key.ravel()
    k = min(options.top_k, flat.size)
    best = np.argpartition(flat, k - 1)[:k]
    n_b = score.shape[1]
    return [(float(flat[index]), index // n_b, index % n_b, float(score.ravel()[index]),
             float(a_alone[index // n_b]), float(b_alone[index % n_b]), float(excess.ravel()[index]), row)
            for index in best]


def _top_conflicts(candidates: list[tuple], options: QkovOptions, ids_a: Sequence[str],
                   ids_b: Sequence[str]) -> pd.DataFrame:
    best = sorted(candidates, key=lambda c: c[0])[:options.top_k]
    ranked = "signed" if options.forensics == "signed" else options.variant  # the score the rows rank
    rows = [{"task_a": row["task_a"], "task_b": row["task_b"], "layer": row["layer"], "block": row["block"],
             "head": row["head"], "variant": ranked, "rank": rank, "sample_a": ids_a[i],
             "sample_b": ids_b[j], "score": score, "a_alone": a_alone, "b_alone": b_alone,
             "excess": excess if ranked != "signed" else float("nan")}  # no ratio for signed scores
            for rank, (_, i, j, score, a_alone, b_alone, excess, row) in enumerate(best, start=1)]
    top = pd.DataFrame(rows, columns=TOP_COLUMNS)
    top["layer"] = top["layer"].astype("Int64")
    return top


def label_cells(table: pd.DataFrame, alpha: float, min_effect_size: float = 0.1) -> pd.DataFrame:
    """BH q-values over the tested cells of `table` and labels `conflict` / `synergy` / `none`:
    q < alpha and |alignment| >= min_effect_size (`pair_stats.label`, phase 5's rule)."""
    q, labels = bh_labels(table["signed_mean"].to_numpy(dtype=float), table["signed_p"].to_numpy(dtype=float),
                          table["effect_size"].to_numpy(dtype=float), (table["status"] == "ok").to_numpy(), alpha,
                          min_effect_size)
    table = table.assign(signed_q=q, label=labels)
    table["layer"] = table["layer"].astype("Int64")
    return table[CELL_COLUMNS]


# --- all pairs ---------------------------------------------------------------------------

def run_qkov(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
             options: QkovOptions | None = None, pairs: Sequence[Sequence[str]] | None = None) -> dict[str, Path]:
    """Phase 6: write `cells`, `health`, `top_conflicts` (Parquet + CSV) and one figure per ordered pair.

    With exactly two stores given in order (A, B) the ordered pair A -> B is computed (the
    workflow's job per pair); with more, `pairs` or `options.pairs` (default: every ordered
    pair). BH q-values are taken over all cells written.

    Returns:
        output key -> path: `cells_parquet`, `cells_csv`, `health_parquet`, `health_csv`,
        `top_conflicts_parquet`, `top_conflicts_csv`, `figure_<A>__<B>` per pair.
    """
    options = options or QkovOptions()

    def compute(store_a: FisherStore, store_b: FisherStore, task_a: str, task_b: str):
        return pair_qkov(store_a, store_b, options, task_a=task_a, task_b=task_b)

    def write(chosen, results, staging: Path) -> dict[str, Path]:
        cells = label_cells(pd.concat([r["cells"] for r in results], ignore_index=True), options.alpha,
                            options.min_effect_size)
        health = pd.concat([r["health"].assign(task_a=a, task_b=b) for r, (a, b) in zip(results, chosen, strict=True)],
                           ignore_index=True)
        top = pd.concat([r["top_conflicts"] for r in results], ignore_index=True)
        paths = write_table(cells, staging, "cells") | write_table(health, staging, "health")
        paths |= write_table(top, staging, "top_conflicts")
        for task_a, task_b in chosen:
            key = f"figure_{task_a}__{task_b}"
            pair_cells = cells[(cells["task_a"] == task_a) & (cells["task_b"] == task_b)]
            paths[key] = qkov_figure(pair_cells, task_a, task_b, options, staging / f"{key}.png")
        return paths

    return run_pair_phase(store_paths, out_dir, section="qkov", ordered=True, listed=options.pairs, given=pairs,
                          compute=compute, write=write)
