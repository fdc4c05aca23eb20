"""Phase 3 — pruning masks that keep the highest-Fisher units of one task.

A *unit* is what is kept or removed as a whole:

* granularity `element`: one parameter element, scored by its Fisher;
* granularity `head` / `neuron`: one stored group of that kind (`q.h3`, `neuron.17`),
  scored by its Fisher mean (group sum / group size). A parameter whose groups are not
  all of that kind (norms, embeddings, and in `neuron` mode the attention projections;
  in `head` mode the MLP) is one whole-tensor unit, scored by its Fisher mean. Restrict
  `include` (e.g. to `mlp` in neuron mode) to leave such tensors out.

Units compete within a *scope*: the whole model (`global`), one layer (`per_layer`;
tensors outside layers form one extra scope) or one tensor (`per_tensor`). For sparsity
`s` (the fraction removed) a scope of `n` units keeps `floor((1 - s) * n + 1/2)` units
(round half up): exactly that many, ties included. Ties are broken deterministically
by unit order — parameters by name, then elements in C order / groups in stored order:
the result equals a stable sort by descending score.

Output `masks.zarr/{sparsity}/{param}`: boolean arrays of the parameter's full shape,
True = kept. Only parameters matching `include` are stored.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ..config import MaskOptions
from ..errors import ConfigError
from ..layout import HEAD_BLOCKS, ParamGeometry, examples
from ..store import FisherStore, open_store
from .common import atomic_output_dir, read_finite, relocate, sparsity_key, write_table

MASKS_FORMAT = "fisher_pipeline.masks/2"  # 2: attrs `layers` (parameter -> layer)
SUMMARY_COLUMNS = ["sparsity", "level", "name", "layer", "n_elements", "kept_elements", "kept_fraction",
                   "n_units", "kept_units"]


@dataclass
class ParamUnits:
    """The units of one parameter, their scores and how they map onto its elements.

    Attributes:
        param: parameter name.
        shape: the parameter's shape.
        scores: `[n_units]` score of each unit, in unit order.
        layout: group layout when units are groups, else None.
        whole: True when the whole tensor is one unit.
    """

    param: str
    shape: tuple[int, ...]
    scores: np.ndarray
    layout: ParamGeometry | None = None
    whole: bool = False

    def to_mask(self, keep: np.ndarray) -> np.ndarray:
        """Full-shape boolean mask from one keep flag per unit."""
        if self.whole:
            return np.full(self.shape, bool(keep[0]))
        if self.layout is not None:
            return np.array(self.layout.expand(keep))
        return keep.reshape(self.shape)


@dataclass
class MaskSet:
    """Masks of one task for every sparsity.

    Attributes:
        masks: sparsity -> parameter -> full-shape boolean mask (True = kept).
        kept_units: sparsity -> parameter -> units kept.
        n_units: parameter -> units.
        layers: parameter -> layer index (None outside layers).
    """

    masks: dict[float, dict[str, np.ndarray]] = field(default_factory=dict)
    kept_units: dict[float, dict[str, int]] = field(default_factory=dict)
    n_units: dict[str, int] = field(default_factory=dict)
    layers: dict[str, int | None] = field(default_factory=dict)


def keep_count(sparsity: float, n_units: int) -> int:
    """Units kept out of `n_units` at `sparsity`: `floor((1 - s) * n + 1/2)` (round half up)."""
    # Round to 9 decimals first so that e.g. (1 - 0.7) * 10 = 3.0000000000000004 counts as 3.
    return int(math.floor(round((1.0 - sparsity) * n_units, 9) + 0.5))


def select_top(scores: np.ndarray, keep: int) -> np.ndarray:
    """Flags of the `keep` highest `scores` `[n]`; among equal scores the lower index wins.

    Equals a stable sort by descending score, in O(n) (one partition) instead of O(n log n).
    """
    n = len(scores)
    if keep <= 0:
        return np.zeros(n, dtype=bool)
    if keep >= n:
        return np.ones(n, dtype=bool)
    threshold = np.partition(scores, n - keep)[n - keep]  # the keep-th largest score
    chosen = scores > threshold
    tied = np.flatnonzero(scores == threshold)[: keep - int(np.count_nonzero(chosen))]
    chosen[tied] = True
    return chosen


def param_units(store: FisherStore, param: str, granularity: str) -> ParamUnits:
    """The units of `param` for `granularity`, scored from the store (see module docstring)."""
    if granularity == "element":
        fisher = read_finite(store, "fisher", param, dtype=np.float32)
        return ParamUnits(param, fisher.shape, fisher.ravel())
    sums = read_finite(store, "group", param)
    sizes = store.group_sizes(param)
    shape = tuple(store.array("fisher", param).shape)
    layout = store.geometry[param]
    kinds = {_unit_kind(block) for block in layout.groups.blocks}
    if kinds != {granularity}:
        return ParamUnits(param, shape, np.array([sums.sum() / sizes.sum()]), whole=True)
    return ParamUnits(param, shape, sums / sizes, layout)


def compute_masks(store: FisherStore, options: MaskOptions) -> MaskSet:
    """Masks of every sparsity in `options` for the parameters `options.include` selects.

    Raises:
        StoreContentError: a store array holds NaN/inf.
        ConfigError: `include` matches no parameter.
    """
    params = _selected_params(store, options.include)
    result = MaskSet(layers={p: store.geometry[p].layer for p in params})
    for s in options.sparsities:
        result.masks[s], result.kept_units[s] = {}, {}
    for scope_params in _scopes(params, options.scope, result.layers):
        units = [param_units(store, p, options.granularity) for p in scope_params]
        scores = np.concatenate([u.scores for u in units])
        bounds = np.cumsum([0] + [len(u.scores) for u in units])
        for u in units:
            result.n_units[u.param] = len(u.scores)
        for s in options.sparsities:
            keep = select_top(scores, keep_count(s, len(scores)))
            for u, start, stop in zip(units, bounds[:-1], bounds[1:], strict=True):
                result.masks[s][u.param] = u.to_mask(keep[start:stop])
                result.kept_units[s][u.param] = int(np.count_nonzero(keep[start:stop]))
    return result


def mask_summary(mask_set: MaskSet) -> pd.DataFrame:
    """Kept elements and units per tensor, per layer and for the whole masked model.

    Returns:
        columns `SUMMARY_COLUMNS`; level is "tensor", "layer" (name `layer.<l>`, or
        `outside_layers`) or "global" (name `model`).
    """
    rows = []
    for s, masks in mask_set.masks.items():
        per_tensor = [
            {"sparsity": s, "level": "tensor", "name": p, "layer": mask_set.layers[p], "n_elements": m.size,
             "kept_elements": int(np.count_nonzero(m)), "n_units": mask_set.n_units[p],
             "kept_units": mask_set.kept_units[s][p]}
            for p, m in masks.items()
        ]
        by_layer: dict[int | None, list[dict]] = defaultdict(list)
        for row in per_tensor:
            by_layer[row["layer"]].append(row)
        rows += per_tensor
        rows += [_total(s, "layer", _layer_name(layer), layer, members) for layer, members in by_layer.items()]
        rows.append(_total(s, "global", "model", None, per_tensor))
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    table["kept_fraction"] = table["kept_elements"] / table["n_elements"]
    return table


def run_masks(store_path: str | os.PathLike, out_dir: str | os.PathLike,
              options: MaskOptions | None = None, task: str | None = None) -> dict[str, Path]:
    """Phase 3 for one task: write `masks.zarr` and `mask_summary.{parquet,csv}` into `out_dir`.

    Args:
        store_path: the task's phase 1 store.
        out_dir: directory to (re)create, atomically.
        options: phase settings (defaults if None).
        task: task name recorded in the masks' attrs (default: the store's `task` attr).

    Returns:
        output key -> path: `masks`, `mask_summary_parquet`, `mask_summary_csv`.
    """
    options = options or MaskOptions()
    store = open_store(store_path)
    task = task or str(store.attrs.get("task", Path(store_path).stem))
    mask_set = compute_masks(store, options)
    with atomic_output_dir(out_dir) as staging:
        attrs = _masks_attrs(store, task, options) | {"layers": mask_set.layers}
        paths = {"masks": write_masks(mask_set, staging / "masks.zarr", attrs)}
        paths |= write_table(mask_summary(mask_set), staging, "mask_summary")
    return relocate(paths, staging, out_dir)


def write_masks(mask_set: MaskSet, path: Path, attrs: dict) -> Path:
    """Write `path/{sparsity}/{param}` boolean arrays with consolidated metadata."""
    root = zarr.open_group(path, mode="w")
    for s, masks in mask_set.masks.items():
        for param, mask in masks.items():
            root.create_array(f"{sparsity_key(s)}/{param}", data=mask)
    root.attrs.update(attrs)
    zarr.consolidate_metadata(path)
    return path


def _masks_attrs(store: FisherStore, task: str, options: MaskOptions) -> dict:
    return {
        "format": MASKS_FORMAT,
        "task": task,
        "source_store": str(store.path),
        "model_id": store.attrs.get("model_id"),
        "weights_hash": store.attrs.get("weights_hash"),
        "sparsities": [sparsity_key(s) for s in options.sparsities],
        "scope": options.scope,
        "granularity": options.granularity,
        "include": options.include,
        "meaning": "True = kept; sparsity = fraction of units removed",
    }


def _selected_params(store: FisherStore, include: str | None) -> list[str]:
    params = [p for p in store.param_names if include is None or re.search(include, p)]
    if not params:
        raise ConfigError(
            f"masks.include = {include!r} matches no parameter of store {store.path}; it is a regex searched in "
            f"parameter names such as {examples(store.param_names)} (null masks every parameter)"
        )
    return params


def _scopes(params: list[str], scope: str, layers: dict[str, int | None]) -> list[list[str]]:
    """Parameters grouped by the scope their units compete in, each in name order."""
    if scope == "global":
        return [params]
    key = layers.get if scope == "per_layer" else (lambda p: p)
    grouped: dict[object, list[str]] = defaultdict(list)
    for p in params:
        grouped[key(p)].append(p)
    return list(grouped.values())


def _unit_kind(block: str) -> str:
    """The mask granularity a group of `block` is a unit of (`head`, `neuron`; `all`: none)."""
    return "head" if block in HEAD_BLOCKS else block


def _layer_name(layer: int | None) -> str:
    return "outside_layers" if layer is None else f"layer.{layer}"


def _total(sparsity: float, level: str, name: str, layer: int | None, members: list[dict]) -> dict:
    sums = {k: sum(m[k] for m in members) for k in ("n_elements", "kept_elements", "n_units", "kept_units")}
    return {"sparsity": sparsity, "level": level, "name": name, "layer": layer, **sums}


from .registry import PhaseCommand, register_phase  # noqa: E402

register_phase(MaskOptions, PhaseCommand(
    "masks", run_masks, "phase 3: pruning masks of one task for every configured sparsity",
    out_example="results/masks/{task}"))
