"""`intervention` — change the model as a finding says, and measure whether the loss moves as predicted.

Phases 5 and 6 say, cell by cell, how a step on task B through a head would move task A's
loss; phase 7 says what a natural-gradient step on B costs A (EWC) and gains B. This module
takes those steps on the real model and measures A's loss on A's held-out samples
(`tasks.<name>.n_heldout`, which no phase saw), against the predictions:

Cells (phases 5 and 6). For each task pair, the `top_cells` labelled cells with the smallest
discovery p (after them, the most significant unlabelled ones) and `random_cells` cells drawn
at random among the others (seeded): the step changes only the cell's coordinates,

    plain  (phase 5):  d = gbar_B                 restricted to the cell
    fisher (phase 6):  d = w * gbar_B,  w = 1 / (max(F, eps) + lambda)   (phase 6's metric)
    step  = -eta d,   eta gbar_B . d = gain x L_B

with `gbar_B` B's held-out mean gradient (the held-out store) and `L_B` B's mean held-out
loss per sample: every step promises B the same drop, to first order. The first-order predictions
of the change of A's mean token-sum loss per held-out sample are

    predicted_heldout   = gbar_A(held-out) . step     (Taylor on the very samples measured)
    predicted_discovery = gbar_A(analysed) . step     (what the phase's own samples claim)

and the measured change is `mean_i l_i(theta + step) - l_i(theta)` over A's held-out
samples. `predicted_heldout` checks the step is small enough for first order (it must hold
within 10% at small steps); `predicted_discovery` is the finding under test: its sign and
rank should agree with the measurement for the top cells (and carry little for random ones).

Phase 7. A step on task T along a direction d is `-eta d`, with eta such that T's analysed
samples promise a drop of `gain` x T's mean held-out loss (`eta gbar_T . d = gain L_T`), so
directions compare at the same promised drop. Per task A and damping lambda (`dampings`,
phase 7's own `scaled.damping`, and the plain gradient as lambda -> inf), A's own natural
gradient `n_A = gbar_A / (F_A + lambda)` is stepped at the first gain: the held-out change
against the promise (`realised = measured / predicted_discovery`) says how much of what the
analysed samples promise carries over to new samples; the damping that realises most is
the one to use. Per ordered pair (A, B), at phase 7's damping and every gain, a step
`-eta n_B` is measured on A's held-out loss against `predicted_heldout + ewc`, with the EWC
cost `0.5 sum F_A step^2` phase 7 reports as the second-order term.

After every step the parameters are put back from a saved copy, bit for bit.

A change counts as measured (`resolved`) where its first-order prediction exceeds
`RESOLUTION` times the rounding of the float32 forward pass (`HeldoutProbe.rounding`);
agreement with first order is counted over those.

Outputs: `cells.{parquet,csv}`, `natgrad.{parquet,csv}`, `summary.{parquet,csv}`,
`cells.png` (predicted vs measured), `damping.png` (held-out change and realised fraction
against lambda), `caption.md`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from ...errors import PhaseInputError
from ...layout import ParamGeometry
from ...store import FisherStore
from ..common import atomic_output_dir, percent, read_finite, relocate, write_table
from . import InterventionOptions
from .figures import cells_figure, damping_figure
from .probe import HeldoutProbe

log = logging.getLogger(__name__)

CELL_COLUMNS = ["phase", "task_a", "task_b", "cell", "param", "block", "head", "choice", "label", "discovery_p",
                "kind", "gain", "eta", "step_norm", "step_size", "predicted_heldout", "predicted_discovery",
                "measured", "heldout_error", "resolved", "n_heldout"]
NATGRAD_COLUMNS = ["kind", "task_a", "task_b", "damping", "direction", "gain", "eta", "step_norm",
                   "predicted_heldout", "predicted_discovery", "ewc", "measured", "realised", "heldout_error",
                   "resolved", "n_heldout"]
SUMMARY_COLUMNS = ["what", "choice", "gain", "n", "n_resolved", "sign_agreement_discovery",
                   "spearman_discovery", "sign_agreement_heldout", "within_10pct_heldout"]


# --- choosing and stepping cells -----------------------------------------------------------

def choose_cells(cells: pd.DataFrame, top: int, random: int, seed: int = 0) -> pd.DataFrame:
    """Per (phase, task pair) of a replication cells table: `top` most significant tested cells
    (labelled first, then by discovery p) and `random` others drawn uniformly; column `choice`."""
    rng = np.random.default_rng(seed)
    chosen = []
    tested = cells[np.isfinite(cells["heldout_mean"]) & (cells["discovery_p"] < 1.0)]
    for _, group in tested.groupby(["phase", "task_a", "task_b"], sort=False):
        ranked = group.assign(_unlabelled=~group["discovered"]).sort_values(["_unlabelled", "discovery_p"],
                                                                             kind="stable")
        best = ranked.head(top)
        rest = group.drop(index=best.index)
        picks = rng.choice(len(rest), size=min(random, len(rest)), replace=False) if len(rest) else []
        chosen += [best.assign(choice="top"), rest.iloc[np.sort(picks)].assign(choice="random")]
    if not chosen:
        return cells.head(0).assign(choice=pd.Series(dtype=str))
    return pd.concat(chosen).drop(columns="_unlabelled", errors="ignore").reset_index(drop=True)


def cell_mask(geometry: ParamGeometry, block: str | None, head: int | None) -> np.ndarray:
    """Boolean `[*shape]` of a cell's coordinates: the whole parameter, or one head's slice."""
    if block is None or head is None or pd.isna(head):
        return np.ones(geometry.shape, dtype=bool)
    index = [slice(None)] * len(geometry.shape)
    index[geometry.groups.dim] = geometry.positions(block)[int(head)]
    mask = np.zeros(geometry.shape, dtype=bool)
    mask[tuple(index)] = True
    return mask


@dataclass
class _TaskArrays:
    """One task's Fisher and mean gradients (analysed and held-out): float32 tensors per parameter."""

    fisher: dict[str, np.ndarray]
    grad: dict[str, np.ndarray]
    grad_heldout: dict[str, np.ndarray]


def _load_arrays(store: FisherStore, heldout: FisherStore, params: Sequence[str]) -> _TaskArrays:
    import torch

    def read(source: FisherStore, kind: str) -> dict:
        return {p: torch.from_numpy(read_finite(source, kind, p, np.float32)) for p in params}

    return _TaskArrays(read(store, "fisher"), read(store, "grad_mean"), read(heldout, "grad_mean"))


def cell_steps(probe: HeldoutProbe, chosen: pd.DataFrame, stores: Mapping[str, FisherStore],
               heldout: Mapping[str, FisherStore], options: InterventionOptions, qkov_options) -> pd.DataFrame:
    """Measured and predicted changes of A's held-out loss for every chosen cell and gain: the step
    on B through the cell is scaled so that it lowers B's held-out loss by `gain x L_B` to first order."""
    from ..qkov.compute import pooled_fisher

    rows = []
    bar = tqdm(list(chosen.itertuples(index=False)), unit="cell", file=sys.stderr, mininterval=2.0, ascii=True)
    for cell in bar:
        a, b, param = cell.task_a, cell.task_b, cell.param
        geometry = stores[a].geometry[param]
        block = None if pd.isna(cell.block) else cell.block
        mask = cell_mask(geometry, block, cell.head)
        direction = read_finite(heldout[b], "grad_mean", param)
        kind = "plain"
        if cell.phase == "qkov":
            fisher = pooled_fisher(stores[a], stores[b], param, qkov_options.fisher_pool)
            direction = direction / (np.maximum(fisher, qkov_options.eps) + qkov_options.ridge_lambda)
            kind = "fisher"
        direction = np.where(mask, direction, 0.0)
        theta = probe.params[param].detach().cpu().double().numpy()
        theta_norm = float(np.linalg.norm(theta[mask]))
        grad_b = read_finite(heldout[b], "grad_mean", param)
        promise = float(np.sum(grad_b * direction))  # > 0: |gbar_B|^2 on the cell, in the metric for fisher
        grad_a_heldout = read_finite(heldout[a], "grad_mean", param)
        grad_a = read_finite(stores[a], "grad_mean", param)
        for gain in options.gains:
            if promise <= 0:
                continue
            eta = gain * float(np.mean(probe.dense[b])) / promise
            step = -eta * direction
            measured = probe.measure(a, {param: step})
            predicted_heldout = float(np.sum(grad_a_heldout * step))
            step_norm = eta * float(np.linalg.norm(direction))
            rows.append({
                "phase": cell.phase, "task_a": a, "task_b": b, "cell": cell.cell, "param": param, "block": block,
                "head": cell.head, "choice": cell.choice, "label": cell.label, "discovery_p": cell.discovery_p,
                "kind": kind, "gain": gain, "eta": eta, "step_norm": step_norm,
                "step_size": step_norm / theta_norm if theta_norm else math.inf,
                "predicted_heldout": predicted_heldout, "predicted_discovery": float(np.sum(grad_a * step)),
                "measured": measured, "heldout_error": _relative_error(measured, predicted_heldout),
                "resolved": probe.resolved(a, predicted_heldout), "n_heldout": len(probe.samples[a])})
    bar.close()
    table = pd.DataFrame(rows, columns=CELL_COLUMNS)
    table["head"] = table["head"].astype("Int64")
    return table


# --- phase 7: natural-gradient steps -----------------------------------------------------------

def natgrad_steps(probe: HeldoutProbe, stores: Mapping[str, FisherStore], heldout: Mapping[str, FisherStore],
                  options: InterventionOptions, damping: float) -> pd.DataFrame:
    """Phase 7 checked: own natural-gradient steps along the damping curve, and cross-task EWC steps.

    Every step is scaled by the gain its own task's analysed samples predict: a step on task T
    along direction d is `-eta d` with `eta gbar_T . d = gain x L_T` (L_T: T's dense mean
    held-out loss per sample), so directions compare at the same promised drop.
    """
    import torch

    tasks = list(stores)
    params = list(next(iter(stores.values())).param_names)
    arrays = {task: _load_arrays(stores[task], heldout[task], params) for task in tasks}
    dense = {task: float(np.mean(probe.dense[task])) for task in tasks}
    rows = []
    first = options.gains[0]
    steps = [(a, "own", a, lam, first) for a in tasks for lam in (*sorted({*options.dampings, damping}), math.inf)]
    steps += [(a, "cross", b, damping, gain) for a in tasks for b in tasks if a != b for gain in options.gains]
    bar = tqdm(steps, unit="step", file=sys.stderr, mininterval=2.0, ascii=True)
    with torch.no_grad():
        for task_a, kind, task_b, lam, gain in bar:
            source, target = arrays[task_b], arrays[task_a]
            direction = {p: _natural(source.grad[p], source.fisher[p], lam) for p in params}
            promise = _dot(source.grad, direction)  # gbar_B . n_B > 0 unless the gradient is 0
            if promise <= 0:
                continue
            eta = gain * dense[task_b] / promise
            step = {p: -eta * d for p, d in direction.items()}
            measured = probe.measure(task_a, step)
            predicted_heldout = _dot(target.grad_heldout, step)
            ewc = _quadratic(target.fisher, step)
            expected = predicted_heldout + (ewc if kind == "cross" else 0.0)
            predicted_discovery = _dot(target.grad, step)
            rows.append({
                "kind": kind, "task_a": task_a, "task_b": task_b, "damping": lam,
                "direction": "plain" if math.isinf(lam) else "natural", "gain": gain, "eta": eta,
                "step_norm": math.sqrt(_dot(step, step)), "predicted_heldout": predicted_heldout,
                "predicted_discovery": predicted_discovery, "ewc": ewc, "measured": measured,
                "realised": measured / predicted_discovery if predicted_discovery else math.nan,
                "heldout_error": _relative_error(measured, expected), "resolved": probe.resolved(task_a, expected),
                "n_heldout": len(probe.samples[task_a])})
    bar.close()
    return pd.DataFrame(rows, columns=NATGRAD_COLUMNS)


def _natural(grad, fisher, damping: float):
    """`grad / (fisher + damping)` (0 where the denominator is 0); the plain gradient for damping inf."""
    import torch

    if math.isinf(damping):
        return grad
    denominator = fisher + damping
    return torch.where(denominator > 0, grad / torch.where(denominator > 0, denominator, 1.0), 0.0)


def _dot(left: Mapping, right: Mapping) -> float:
    """`sum_p <left[p], right[p]>` over the parameters of `right` (float32 tensors, float64 total)."""
    import torch

    return float(sum(float(torch.dot(left[p].reshape(-1), right[p].reshape(-1))) for p in right))


def _quadratic(fisher: Mapping, step: Mapping) -> float:
    """`0.5 sum F step^2`."""
    import torch

    return 0.5 * float(sum(float(torch.dot(fisher[p].reshape(-1), step[p].reshape(-1).square())) for p in step))


def _relative_error(measured: float, predicted: float) -> float:
    return abs(measured - predicted) / abs(predicted) if predicted else math.inf


# --- summary, figures, caption -------------------------------------------------------------------

def summarise(cells: pd.DataFrame, natgrad: pd.DataFrame) -> pd.DataFrame:
    """Agreement of predictions and measurements per (phase, choice, gain) of the cell steps and per
    gain of phase 7's cross-task steps."""
    rows = []
    for (phase, choice, gain), group in cells.groupby(["phase", "choice", "gain"], sort=False):
        rows.append(_agreement(f"{phase} cells", choice, gain, group))
    cross = natgrad[natgrad["kind"] == "cross"]
    for gain, group in cross.groupby("gain", sort=False):
        rows.append(_agreement("phase 7 cross-task steps", "all", gain, group))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _agreement(what: str, choice: str, size: float, group: pd.DataFrame) -> dict:
    measured = group["measured"].to_numpy(float)
    discovery = group["predicted_discovery"].to_numpy(float)
    rho = stats.spearmanr(discovery, measured)[0] if len(group) >= 3 and np.ptp(discovery) and np.ptp(measured) \
        else math.nan
    resolved = group[group["resolved"].astype(bool)]
    return {"what": what, "choice": choice, "gain": size, "n": len(group), "n_resolved": len(resolved),
            "sign_agreement_discovery": float(np.mean(np.sign(measured) == np.sign(discovery))),
            "spearman_discovery": float(rho),
            "sign_agreement_heldout": float(np.mean(np.sign(resolved["measured"])
                                                    == np.sign(resolved["predicted_heldout"])))
            if len(resolved) else math.nan,
            "within_10pct_heldout": float(np.mean(resolved["heldout_error"] <= 0.1)) if len(resolved) else math.nan}


def caption(cells: pd.DataFrame, natgrad: pd.DataFrame, summary: pd.DataFrame, damping: float) -> str:
    """Plain words: do steps move A's held-out loss as the phases predict?"""
    lines = []
    if len(cells):
        lines.append("Steps on task B through single cells, task A's held-out loss measured (mean token-sum loss "
                     "per sample):")
        for row in summary[summary["what"].str.endswith("cells")].itertuples():
            lines.append(f"- {row.what}, {row.choice} cells, steps promising B {row.gain:g} of its loss: sign of the "
                         f"discovery prediction right in {percent(row.sign_agreement_discovery)} of {row.n} "
                         f"(Spearman {row.spearman_discovery:+.2f}); first order on the held-out gradient within "
                         f"10% in {percent(row.within_10pct_heldout)} of the {row.n_resolved} steps whose "
                         "predicted change stands above float rounding.")
    own = natgrad[natgrad["kind"] == "own"]
    if len(own):
        curve = own.groupby("damping")[["measured", "realised"]].mean()
        natural = curve[np.isfinite(curve.index)]
        best = natural["measured"].idxmin()
        gain = float(own["gain"].iloc[0])
        line = (f"Phase 7, each task's own step scaled so its analysed samples promise a drop of {gain:g} of its "
                f"loss: the held-out change per sample, mean over tasks, is lowest at damping {best:g} "
                f"({natural.loc[best, 'measured']:+.4g}, realising {percent(natural.loc[best, 'realised'])} of the "
                f"promise)")
        if damping in curve.index:
            line += (f"; at the configured {damping:g}: {curve.loc[damping, 'measured']:+.4g} "
                     f"({percent(curve.loc[damping, 'realised'])})")
        if math.inf in curve.index:
            plain = curve.loc[math.inf]
            line += f"; the plain gradient: {plain['measured']:+.4g} ({percent(plain['realised'])})"
        lines.append(line + ".")
    cross = natgrad[natgrad["kind"] == "cross"]
    for gain, group in cross.groupby("gain", sort=False):
        resolved = group[group["resolved"].astype(bool)]
        lines.append(f"Phase 7 cross-task steps on B (damping {damping:g}) promising B a drop of {gain:g} of its "
                     f"loss: first order + EWC within 10% of A's measured change in "
                     f"{percent(float(np.mean(resolved['heldout_error'] <= 0.1)) if len(resolved) else math.nan)} "
                     f"of {len(resolved)} pairs; EWC term median {group['ewc'].median():.3g}, first-order term median "
                     f"|{group['predicted_heldout'].abs().median():.3g}|, measured change median "
                     f"|{group['measured'].abs().median():.3g}|.")
    return "\n".join(lines) + "\n"


def run_intervention(store_paths: Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                     options: InterventionOptions | None = None, heldout_stores: Mapping[str, str] | None = None,
                     replication: Sequence[str] | None = None, pipeline=None) -> dict[str, Path]:
    """Step the model as phases 5, 6 and 7 predict and measure A's held-out loss (module docstring).

    Args:
        store_paths: task -> analysed store (phase 1).
        out_dir: directory to (re)create, atomically.
        options: intervention settings.
        heldout_stores: task -> held-out store (`fisher --heldout`).
        replication: the replication output directory (its `cells.parquet` lists the cells
            and their discovery p-values); None or empty: phase 7 only.
        pipeline: `PipelineConfig` with the `model`, `tasks`, `qkov` and `scaled` sections.

    Raises:
        PhaseInputError: missing pipeline sections, held-out stores that do not match, a model
            other than the stores'.
    """
    from ...data.tasks import load_heldout
    from ...fisher import resolve_device
    from ...models.loading import load_model
    from ...store import open_store
    from ..replication.compute import check_heldout_stores

    options = options or InterventionOptions()
    if pipeline is None:
        raise PhaseInputError("intervention needs the model, tasks, qkov and scaled sections of the config "
                              "(pipeline=...)")
    stores = {task: open_store(path) for task, path in store_paths.items()}
    heldout = {task: open_store(path) for task, path in (heldout_stores or {}).items()}
    check_heldout_stores(stores, heldout)
    kind = next(iter(stores.values())).attrs.get("fisher_kind")
    if kind != "empirical":
        raise PhaseInputError(f"the stores hold a {kind!r} Fisher, whose mean gradient is not the gradient of the "
                              "data's loss that the predictions need: run phase 1 with fisher.labels: empirical")
    loaded = load_model(pipeline.model, resolve_device(options.device))
    first = next(iter(stores.values()))
    if first.attrs.get("weights_hash") != loaded.weights_hash:
        raise PhaseInputError(f"the stores were made for weights {first.attrs.get('weights_hash')}, model.path "
                              f"{pipeline.model.path} holds {loaded.weights_hash}: rerun phase 1")
    samples = {}
    for task, store in heldout.items():
        if task not in pipeline.tasks:
            raise PhaseInputError(f"held-out store of task {task!r} given, but the config has no such task")
        loaded_samples = load_heldout(pipeline.tasks[task], loaded.tokenizer)
        if [s.id for s in loaded_samples] != list(store.sample_ids):
            raise PhaseInputError(f"the held-out samples of task {task!r} ({len(loaded_samples)}) differ from those "
                                  f"in {store.path} ({store.n_samples}): tasks.{task} changed since; rerun phase 1 "
                                  "--heldout")
        samples[task] = loaded_samples
    probe = HeldoutProbe(loaded.model, samples, loaded.tokenizer.pad_token_id, options.batch_size)
    chosen = pd.DataFrame()
    if replication:
        table = pd.concat([pd.read_parquet(Path(path) / "cells.parquet" if Path(path).is_dir() else path)
                           for path in replication], ignore_index=True)
        chosen = choose_cells(table, options.top_cells, options.random_cells, options.seed)
    cells = cell_steps(probe, chosen, stores, heldout, options, pipeline.qkov) if len(chosen) else \
        pd.DataFrame(columns=CELL_COLUMNS)
    natgrad = natgrad_steps(probe, stores, heldout, options, pipeline.scaled.damping)
    summary = summarise(cells, natgrad)
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(cells, staging, "cells") | write_table(natgrad, staging, "natgrad")
        paths |= write_table(summary, staging, "summary")
        paths["cells_figure"] = cells_figure(cells, staging / "cells.png")
        paths["damping_figure"] = damping_figure(natgrad, pipeline.scaled.damping, staging / "damping.png")
        paths["caption"] = staging / "caption.md"
        paths["caption"].write_text(caption(cells, natgrad, summary, pipeline.scaled.damping))
    return relocate(paths, staging, out_dir)
