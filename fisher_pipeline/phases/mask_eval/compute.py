"""`mask_eval` — every mask of phase 3 scored on held-out samples, beside the dense model.

Each task's held-out samples are the `tasks.<name>.n_heldout` usable samples right after
its analysed ones in the same seeded order (disjoint by id; phase 1 never sees them), or
the first `mask_eval.n_samples` of them (every mask costs a forward pass over them). For
every criterion x sparsity x mask task, the mask is applied to the model in place, every
task's held-out samples are scored, and the dense weights are put back bit for bit.
Masks equal across tasks (magnitude and random do not depend on the task) are scored once.

Per (criterion, sparsity, mask task, eval task):

    loss     = sum_i l_i / sum_i n_i                  (token-sum loss per labelled token)
    delta    = sum_i (l'_i - l_i) / sum_i n_i         (pruned minus dense, the same samples)
    delta_se = sqrt(sum_i (d_i - delta n_i)^2 / (N (N - 1))) / mean_i n_i,  d_i = l'_i - l_i

(the standard error of a ratio of means by the delta method, over held-out samples;
pairing removes the spread of the samples' own difficulty). Outputs: `mask_eval.{parquet,
csv}`, `heldout_samples.csv` (ids, tokens, dense losses), `mask_eval_curves.png` (delta
against sparsity per criterion, a panel per task, each task pruned by its own masks),
`mask_eval_cross.png` (task A's mask on task B's samples, per criterion at the highest
sparsity) and `caption.md` (which criterion keeps each task best).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ...errors import PhaseInputError
from ...pruning import MasksFile
from ..common import atomic_output_dir, relocate, write_table
from . import MaskEvalOptions
from .figures import cross_figure, curves_figure

log = logging.getLogger(__name__)

COLUMNS = ["criterion", "granularity", "sparsity", "mask_task", "eval_task", "own", "n_heldout", "n_tokens",
           "dense_loss", "pruned_loss", "delta", "delta_se", "kept_fraction"]
#: Settings every task's masks must share to be compared.
_MATCHING = ("weights_hash", "criteria", "sparsities", "granularity", "scope", "include")


def loss_change(dense: np.ndarray, pruned: np.ndarray, n_tokens: np.ndarray) -> tuple[float, float, float, float]:
    """(dense loss, pruned loss, delta, delta_se) per labelled token from per-sample token-sum losses `[N]`."""
    total = float(n_tokens.sum())
    diff = pruned - dense
    delta = float(diff.sum()) / total
    n = len(diff)
    if n < 2:
        se = float("nan")
    else:
        residual = diff - delta * n_tokens
        se = float(np.sqrt(np.sum(residual ** 2) / (n * (n - 1))) / n_tokens.mean())
    return float(dense.sum()) / total, float(pruned.sum()) / total, delta, se


def run_mask_eval(mask_paths: dict[str, str | os.PathLike], out_dir: str | os.PathLike,
                  options: MaskEvalOptions | None = None, pipeline=None) -> dict[str, Path]:
    """Score every task's masks on every task's held-out samples (see the module docstring).

    Args:
        mask_paths: task -> phase 3 output (`masks.safetensors` or its folder).
        out_dir: directory to (re)create, atomically.
        options: phase settings.
        pipeline: the `PipelineConfig` with the `model` and `tasks` sections.

    Raises:
        PhaseInputError: no masks, masks made differently, a task without held-out samples,
            or held-out ids that overlap the analysed ones.
    """
    import torch

    from ...data.tasks import load_heldout
    from ...evaluation import heldout_losses
    from ...fisher import resolve_device
    from ...models.loading import load_model
    from ...pruning import apply_masks
    from ...store import open_store

    options = options or MaskEvalOptions()
    if pipeline is None:
        raise PhaseInputError("mask_eval needs the model and tasks sections of the config (pipeline=...)")
    files = _open_all(mask_paths)
    loaded = load_model(pipeline.model, resolve_device(options.device))
    first = next(iter(files.values()))
    if first.metadata.get("weights_hash") not in (None, loaded.weights_hash):
        raise PhaseInputError(f"the masks were made for weights {first.metadata['weights_hash']}, model.path "
                              f"{pipeline.model.path} holds {loaded.weights_hash}: rerun phases 1 and 3")
    heldout = {}
    for task in files:
        if task not in pipeline.tasks:
            raise PhaseInputError(f"masks of task {task!r} given, but the config has no such task")
        heldout[task] = load_heldout(pipeline.tasks[task], loaded.tokenizer)
        if options.n_samples:
            heldout[task] = heldout[task][:options.n_samples]
        if not heldout[task]:
            raise PhaseInputError(f"task {task!r} has no held-out sample: set tasks.{task}.n_heldout >= 2")
        source = Path(str(files[task].metadata.get("source_store", "")))
        if source.exists():
            analysed = set(open_store(source).sample_ids)
            shared = sorted(analysed & {s.id for s in heldout[task]})
            if shared:
                raise PhaseInputError(f"held-out samples of task {task!r} overlap its analysed ones ({shared[:3]}): "
                                      "the task's source, seed or n_samples changed since phase 1; rerun it")
    samples = [s for task in files for s in heldout[task]]
    owner = np.array([task for task in files for _ in heldout[task]])
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    dense, n_tokens = (x.numpy() for x in heldout_losses(model, samples, pad, options.batch_size))
    rows = []
    combos = [(c, s, t) for c in first.criteria for s in first.sparsities for t in files]
    bar = tqdm(combos, unit="mask", file=sys.stderr, mininterval=2.0, ascii=True, dynamic_ncols=False)
    scored: dict[bytes, np.ndarray] = {}  # masks digest -> pruned losses
    for criterion, sparsity, mask_task in bar:
        masks = files[mask_task].masks(criterion, sparsity)
        kept = sum(int(np.count_nonzero(m)) for m in masks.values()) / sum(m.size for m in masks.values())
        digest = _digest(masks)
        if digest not in scored:  # masks that do not depend on the task (magnitude, random) are scored once
            with torch.no_grad(), apply_masks(model, masks):
                scored[digest] = heldout_losses(model, samples, pad, options.batch_size)[0].numpy()
        pruned = scored[digest]
        for eval_task in files:
            rows_of = owner == eval_task
            stats = loss_change(dense[rows_of], pruned[rows_of], n_tokens[rows_of])
            rows.append([criterion, first.metadata["granularity"], float(sparsity), mask_task, eval_task,
                         mask_task == eval_task, int(rows_of.sum()), int(n_tokens[rows_of].sum()), *stats, kept])
    bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    samples_table = pd.DataFrame({"task": owner, "id": [s.id for s in samples], "n_tokens": n_tokens,
                                  "dense_loss": dense})
    with atomic_output_dir(out_dir) as staging:
        paths = write_table(table, staging, "mask_eval")
        samples_table.to_csv(staging / "heldout_samples.csv", index=False)
        paths["heldout_samples"] = staging / "heldout_samples.csv"
        paths["curves"] = curves_figure(table, staging / "mask_eval_curves.png")
        paths["cross"] = cross_figure(table, staging / "mask_eval_cross.png")
        paths["caption"] = staging / "caption.md"
        paths["caption"].write_text(caption(table, first.metadata["criterion"]))
    return relocate(paths, staging, out_dir)


def best_criteria(table: pd.DataFrame) -> pd.DataFrame:
    """Per sparsity and task, own masks: the criterion with the smallest held-out loss increase."""
    own = table[table["own"]]
    best = own.loc[own.groupby(["sparsity", "eval_task"])["delta"].idxmin()]
    return best[["sparsity", "eval_task", "criterion", "delta", "delta_se"]].reset_index(drop=True)


def caption(table: pd.DataFrame, default: str) -> str:
    """Plain words: which criterion keeps each task best, and how the default criterion did."""
    granularity = table["granularity"].iloc[0]
    lines = [f"Held-out loss increase (nats per labelled token) when each task is pruned by its own {granularity} "
             "masks; lower keeps the task better."]
    own = table[table["own"]]
    for sparsity, group in own.groupby("sparsity"):
        ranking = group.groupby("criterion")["delta"].mean().sort_values()
        ranked = ", ".join(f"{c} {d:+.3f}" for c, d in ranking.items())
        lines.append(f"- sparsity {sparsity:g}: mean over tasks {ranked}; best: {ranking.index[0]}.")
    wins = best_criteria(table)["criterion"].value_counts()
    lines.append(f"Best criterion per (task, sparsity): {', '.join(f'{c} {n}' for c, n in wins.items())} "
                 f"(of {int(wins.sum())}); the default criterion is {default}.")
    cross = table[(table["criterion"] == default) & ~table["own"]]
    if not cross.empty:
        top = cross["sparsity"].max()
        own_delta = own[(own["criterion"] == default) & (own["sparsity"] == top)]["delta"].mean()
        lines.append(f"At sparsity {top:g}, {default} masks cost their own task {own_delta:+.3f} on average and the "
                     f"other tasks {cross[cross['sparsity'] == top]['delta'].mean():+.3f}: the masks are task specific "
                     "where the second number is larger.")
    return "\n".join(lines) + "\n"


def _digest(masks: dict[str, np.ndarray]) -> bytes:
    """Identity of a set of masks: equal digests, equal masks (and equal held-out losses)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(masks):
        digest.update(name.encode() + b"\0" + str(masks[name].shape).encode())
        digest.update(np.ascontiguousarray(masks[name]).view(np.uint8).data)
    return digest.digest()


def _open_all(mask_paths: dict[str, str | os.PathLike]) -> dict[str, MasksFile]:
    if not mask_paths:
        raise PhaseInputError("no masks given: pass at least one task -> masks path")
    files = {task: MasksFile(path) for task, path in mask_paths.items()}
    (first_task, first), *others = files.items()
    for task, file in others:
        for key in _MATCHING:
            if file.metadata.get(key) != first.metadata.get(key):
                raise PhaseInputError(f"masks of tasks {first_task!r} and {task!r} differ in {key} "
                                      f"({first.metadata.get(key)!r} vs {file.metadata.get(key)!r}): rerun phase 3 "
                                      "for every task with one config")
    return files
