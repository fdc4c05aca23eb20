"""`replication` — do phase 5's and phase 6's findings hold on samples the analysis never saw?

Every cell of every task pair (phase 5: a layer's module or one head of it; phase 6: layer x
block x head) is scored again on the tasks' held-out stores: phase 1 on the
`tasks.<name>.n_heldout` samples after the analysed ones (`fisher --heldout`, disjoint by
id), with the same statistic, the same settings and the discovery run's metric (phase 6's
`1 / F`, phase 5's `fisher` similarity: from the analysed samples' Fisher, so the held-out
statistic is the same function of new data). Each cell is then tested one-sided in the
direction its discovery mean points. Null hypothesis, in plain words: *on new samples of the
two tasks, the cell's mean similarity (phase 6: signed Fisher-metric product) is zero or has
the other sign.* The held-out mean and its U-statistic standard error come from the phase's
own test (`pair_stats.pair_mean_test`); the one-sided p-value from the same Student t.

A discovered cell (labelled `conflict` or `synergy`) **replicates** when its held-out mean
has the same sign and the one-sided p < `alpha`. No correction is applied within the
discovered set: each discovered cell is its own claim, checked once.

What to expect. Even a true effect fails to replicate when the held-out test lacks power.
Each discovered cell's power is that of the one-sided t test at the held-out standard error
if the discovery mean were the true mean (noncentral t, scipy); their sum is the
*expected* number of replications. Cells selected for significance have discovery means
inflated by noise (the winner's curse), so a count somewhat below it is what real effects
give, and one far below it says the discoveries are mostly noise or much weaker than
found; a count above it says the held-out samples show the effects more strongly.

Per phase and task pair (`summary`): cells tested in both halves, discovered, replicated,
expected, sign agreement among discovered cells and among the others (about 50% when the
others carry no signal), and the Spearman rank correlation of discovery and held-out means
over every cell tested in both. Outputs: `cells.{parquet,csv}`, `summary.{parquet,csv}`,
`replication.png` (discovery vs held-out t statistic per pair, labelled cells marked) and
`caption.md`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ...errors import PhaseInputError
from ...store import FisherStore, check_same_model
from ..common import atomic_output_dir, percent, relocate, write_table
from . import ReplicationOptions
from .figures import replication_figure

log = logging.getLogger(__name__)

#: Identify a cell within a task pair, per phase.
KEYS = {"conflicts": ["layer", "module", "block", "head", "param"], "qkov": ["layer", "block", "head", "param"]}
#: The discovery table's mean / se / p / q columns, per phase.
STAT_COLUMNS = {"conflicts": ("mean", "se", "p", "q"), "qkov": ("signed_mean", "signed_se", "signed_p", "signed_q")}
#: Settings a phase's table records, which the held-out statistic must share.
RECORDED = {"conflicts": ("similarity",), "qkov": ("variant", "aggregate", "fisher_pool")}
CELL_COLUMNS = ["phase", "task_a", "task_b", "cell", "layer", "block", "head", "param", "label", "discovered",
                "discovery_mean", "discovery_se", "discovery_p", "discovery_q", "discovery_effect", "heldout_n_a",
                "heldout_n_b", "heldout_mean", "heldout_se", "heldout_df", "heldout_effect", "heldout_p_one_sided",
                "same_sign", "replicated", "power"]
SUMMARY_COLUMNS = ["phase", "task_a", "task_b", "n_cells", "discovered", "replicated", "expected_replicated",
                   "replication_rate", "sign_agreement_discovered", "sign_agreement_other", "spearman_all",
                   "spearman_p", "heldout_n_a", "heldout_n_b"]


def check_heldout_stores(discovery: Mapping[str, FisherStore], heldout: Mapping[str, FisherStore]) -> None:
    """Refuse held-out stores that are not the discovery stores' held-out halves.

    Raises:
        PhaseInputError: a task without a held-out store, a store that is not a held-out
            store, or held-out ids shared with the analysed ones.
        StoreMismatchError: another model, parameter set or per-sample selection.
    """
    missing = sorted(set(discovery) - set(heldout))
    if missing:
        raise PhaseInputError(f"no held-out store given for task(s) {missing}: run phase 1 with --heldout for them "
                              "and pass --heldout-stores TASK=PATH")
    check_same_model({**{f"{t} (analysed)": s for t, s in discovery.items()},
                      **{f"{t} (held-out)": heldout[t] for t in discovery}}, per_sample=True)
    for task, store in discovery.items():
        if heldout[task].attrs.get("sample_set") != "heldout":
            raise PhaseInputError(f"{heldout[task].path} is not a held-out store (sample_set "
                                  f"{heldout[task].attrs.get('sample_set')!r}): write it with "
                                  f"`python -m fisher_pipeline fisher --heldout --task {task} ...`")
        shared = sorted(set(store.sample_ids) & set(heldout[task].sample_ids))
        if shared:
            raise PhaseInputError(f"held-out samples of task {task!r} overlap its analysed ones ({shared[:3]}): the "
                                  "task's source, seed or n_samples changed between the two phase 1 runs; rerun both")


def heldout_table(phase: str, discovery: pd.DataFrame, heldout: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Join one pair's discovery and held-out tables of `phase` cell by cell; test and power.

    Args:
        phase: "conflicts" (phase 5 columns) or "qkov" (phase 6 columns).
        discovery, heldout: the phase's tables of one task pair, on the analysed and on the
            held-out samples (same cells).
        alpha: one-sided level.

    Returns:
        columns `CELL_COLUMNS`, one row per cell of `discovery`.
    """
    mean, se, p, q = STAT_COLUMNS[phase]
    keys = KEYS[phase]
    held = heldout[keys + ["n_a", "n_b", mean, se, "df", "effect_size", "status"]].rename(columns={
        "n_a": "heldout_n_a", "n_b": "heldout_n_b", mean: "heldout_mean", se: "heldout_se", "df": "heldout_df",
        "effect_size": "heldout_effect", "status": "heldout_status"})
    joined = discovery.merge(held, on=keys, how="left", validate="one_to_one")
    if joined["heldout_status"].isna().any():
        raise PhaseInputError(f"{phase}: the held-out stores lack cells of the discovery table: they hold other "
                              "per-sample parameters; rerun phase 1 --heldout with the discovery config")
    sign = np.sign(joined[mean].to_numpy(dtype=float))
    tested = ((joined["status"] == "ok") & (joined["heldout_status"] == "ok")).to_numpy()
    t = np.where(tested, joined["heldout_mean"] / joined["heldout_se"].where(tested, 1.0), 0.0)
    df = joined["heldout_df"].to_numpy(dtype=float)
    one_sided = np.where(tested & (sign != 0), stats.t.sf(sign * t, np.where(tested, df, 1.0)), 1.0)
    same = tested & (np.sign(joined["heldout_mean"].to_numpy(dtype=float)) == sign) & (sign != 0)
    discovered = joined["label"].isin(["conflict", "synergy"]).to_numpy()
    critical = stats.t.isf(alpha, np.where(tested, df, 1.0))
    shift = np.abs(joined[mean].to_numpy(dtype=float)) / joined["heldout_se"].where(tested, 1.0).to_numpy(float)
    power = np.where(tested, stats.nct.sf(critical, np.where(tested, df, 1.0), np.where(tested, shift, 0.0)), np.nan)
    out = pd.DataFrame({
        "phase": phase, "task_a": joined["task_a"], "task_b": joined["task_b"], "cell": _cell_names(phase, joined),
        "layer": joined["layer"].astype("Int64"), "block": joined["block"], "head": joined["head"].astype("Int64"),
        "param": joined["param"], "label": joined["label"], "discovered": discovered,
        "discovery_mean": joined[mean], "discovery_se": joined[se], "discovery_p": joined[p],
        "discovery_q": joined[q], "discovery_effect": joined["effect_size"],
        "heldout_n_a": joined["heldout_n_a"].astype(int), "heldout_n_b": joined["heldout_n_b"].astype(int),
        "heldout_mean": joined["heldout_mean"], "heldout_se": joined["heldout_se"], "heldout_df": df,
        "heldout_effect": joined["heldout_effect"], "heldout_p_one_sided": one_sided, "same_sign": same,
        "replicated": discovered & same & (one_sided < alpha), "power": power,
    })
    out["tested"] = tested
    return out


def summarise(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (phase, task pair) of `heldout_table` rows (with their `tested` column)."""
    rows = []
    for (phase, task_a, task_b), group in cells.groupby(["phase", "task_a", "task_b"], sort=False):
        tested = group[group["tested"]]
        found = tested[tested["discovered"]]
        other = tested[~tested["discovered"]]
        both = tested[["discovery_mean", "heldout_mean"]].to_numpy(dtype=float)
        if len(both) >= 3 and np.ptp(both[:, 0]) > 0 and np.ptp(both[:, 1]) > 0:
            rho, rho_p = stats.spearmanr(both[:, 0], both[:, 1])
        else:
            rho, rho_p = math.nan, math.nan
        rows.append({
            "phase": phase, "task_a": task_a, "task_b": task_b, "n_cells": len(tested), "discovered": len(found),
            "replicated": int(found["replicated"].sum()), "expected_replicated": float(found["power"].sum()),
            "replication_rate": float(found["replicated"].mean()) if len(found) else math.nan,
            "sign_agreement_discovered": float(found["same_sign"].mean()) if len(found) else math.nan,
            "sign_agreement_other": float(other["same_sign"].mean()) if len(other) else math.nan,
            "spearman_all": float(rho), "spearman_p": float(rho_p),
            "heldout_n_a": int(group["heldout_n_a"].max()), "heldout_n_b": int(group["heldout_n_b"].max()),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def replicate_pair_tables(phase: str, discovery: pd.DataFrame, stores: Mapping[str, FisherStore],
                          heldout: Mapping[str, FisherStore], options, alpha: float) -> pd.DataFrame:
    """The held-out rows (`heldout_table`) of every task pair in one phase's discovery table.

    Args:
        phase: "conflicts" or "qkov".
        discovery: the phase's whole output table (one or more pairs).
        stores, heldout: task -> analysed and held-out store.
        options: the phase's options (`ConflictsOptions` / `QkovOptions`) the discovery run used.
        alpha: one-sided level.
    """
    from ..conflicts.compute import conflict_groups, pair_conflicts
    from ..qkov.compute import pair_qkov

    for column in RECORDED[phase]:
        recorded = set(discovery[column].dropna().unique())
        wanted = getattr(options, column)
        if recorded and recorded != {wanted}:
            raise PhaseInputError(f"the {phase} tables were made with {column} {sorted(recorded)}, the config says "
                                  f"{phase}.{column}: {wanted!r}: rerun the phase (or pass the config it ran with)")
    tables = []
    for (task_a, task_b), pair in discovery.groupby(["task_a", "task_b"], sort=False):
        missing = [task for task in (task_a, task_b) if task not in stores]
        if missing:
            raise PhaseInputError(f"the {phase} table compares {task_a} and {task_b}, but no store of {missing} "
                                  "was given: pass every task's --stores and --heldout-stores")
        metric = (stores[task_a], stores[task_b])
        if phase == "conflicts":
            groups = conflict_groups(heldout[task_a])
            held, _ = pair_conflicts(heldout[task_a], heldout[task_b], dataclasses.replace(options, top_pairs=0),
                                     groups, task_a, task_b, metric_stores=metric)
        else:
            light = dataclasses.replace(options, n_bootstrap=0, top_k=0)
            held = pair_qkov(heldout[task_a], heldout[task_b], light, task_a=task_a, task_b=task_b,
                             metric_stores=metric)["cells"]
        tables.append(heldout_table(phase, pair.reset_index(drop=True), held, alpha))
        log.info("replication %s %s vs %s: %d of %d discovered cells replicate", phase, task_a, task_b,
                 int(tables[-1]["replicated"].sum()), int(tables[-1]["discovered"].sum()))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=CELL_COLUMNS + ["tested"])


def run_replication(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                    options: ReplicationOptions | None = None, heldout_stores: Mapping[str, str] | None = None,
                    conflicts: Sequence[str] | None = None, qkov: Sequence[str] | None = None,
                    pipeline=None) -> dict[str, Path]:
    """Replicate every cell of the given phase 5 and phase 6 outputs on held-out stores.

    Args:
        store_paths: task -> analysed store (phase 1; the discovery metric's Fisher).
        out_dir: directory to (re)create, atomically.
        options: replication settings.
        heldout_stores: task -> held-out store (`fisher --heldout`).
        conflicts: phase 5 output directories (or `conflicts.parquet` files).
        qkov: phase 6 output directories (or `cells.parquet` files).
        pipeline: a `PipelineConfig` with the `conflicts` and `qkov` sections the phases ran with.

    Returns:
        output key -> path: `cells_{parquet,csv}`, `summary_{parquet,csv}`, `figure`, `caption`.

    Raises:
        PhaseInputError: nothing to replicate, missing or wrong held-out stores, tables made
            with other settings.
    """
    from ...store import open_store

    options = options or ReplicationOptions()
    if pipeline is None:
        raise PhaseInputError("replication needs the conflicts and qkov sections of the config (pipeline=...)")
    if not conflicts and not qkov:
        raise PhaseInputError("nothing to replicate: pass phase 5 outputs (--conflicts) and/or phase 6 outputs "
                              "(--qkov)")
    stores = {task: open_store(path) for task, path in store_paths.items()}
    heldout = {task: open_store(path) for task, path in (heldout_stores or {}).items()}
    check_heldout_stores(stores, heldout)
    parts = []
    for phase, paths, stem, phase_options in (("conflicts", conflicts, "conflicts", pipeline.conflicts),
                                               ("qkov", qkov, "cells", pipeline.qkov)):
        if paths:
            table = pd.concat([_read_table(path, stem) for path in paths], ignore_index=True)
            parts.append(replicate_pair_tables(phase, table, stores, heldout, phase_options, options.alpha))
    cells = pd.concat(parts, ignore_index=True)
    summary = summarise(cells)
    cells = cells.drop(columns="tested")
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(cells, staging, "cells") | write_table(summary, staging, "summary")
        paths["figure"] = replication_figure(cells, summary, staging / "replication.png")
        paths["caption"] = staging / "caption.md"
        paths["caption"].write_text(caption(summary, options.alpha))
    return relocate(paths, staging, out_dir)


def caption(summary: pd.DataFrame, alpha: float) -> str:
    """Plain words: per phase, how many discovered cells replicate, against how many the power leads one to expect."""
    lines = []
    for phase, group in summary.groupby("phase", sort=False):
        name = {"conflicts": "Phase 5 (gradient conflicts)", "qkov": "Phase 6 (Q/K/V/O interference)"}[phase]
        found, replicated, expected = int(group["discovered"].sum()), int(group["replicated"].sum()), \
            float(group["expected_replicated"].sum())
        n_a, n_b = int(group["heldout_n_a"].max()), int(group["heldout_n_b"].max())
        lines.append(f"{name}: {replicated} of {found} labelled cells replicate on held-out samples (same sign, "
                     f"one-sided p < {alpha:g}; up to {n_a} x {n_b} held-out samples per pair); the held-out tests' "
                     f"power at the discovery effects leads one to expect {expected:.1f} (fewer where selection "
                     "inflated the discovery effects, the winner's curse).")
        for row in group.itertuples():
            lines.append(f"- {row.task_a} / {row.task_b}: {row.replicated} of {row.discovered} replicate "
                         f"(expected {row.expected_replicated:.1f}); sign agreement "
                         f"{percent(row.sign_agreement_discovered)} of labelled cells, "
                         f"{percent(row.sign_agreement_other)} of the others (about 50% without signal); Spearman "
                         f"rho of discovery vs held-out means over {row.n_cells} cells {row.spearman_all:+.2f}.")
    return "\n".join(lines) + "\n"


def _cell_names(phase: str, table: pd.DataFrame) -> list[str]:
    names = []
    for row in table.itertuples(index=False):
        layer = "" if pd.isna(row.layer) else f"layer {int(row.layer)} "
        what = row.module if phase == "conflicts" else row.block
        head = "" if pd.isna(row.head) else (f" {row.block} head {int(row.head)}" if phase == "conflicts"
                                              else f" head {int(row.head)}")
        names.append(f"{layer}{what}{head}".strip())
    return names


def _read_table(path: str | os.PathLike, stem: str) -> pd.DataFrame:
    path = Path(path)
    file = path / f"{stem}.parquet" if path.is_dir() else path
    if not file.exists():
        raise PhaseInputError(f"{file} does not exist: pass the output directory of the phase (it holds "
                              f"{stem}.parquet)")
    return pd.read_parquet(file)
