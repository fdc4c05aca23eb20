"""Phase 3 — pruning masks that keep the units whose removal costs a task least.

Removing a unit moves its weights from w to 0. To second order, with the Fisher as the
curvature, that raises the task's loss by ½·F·w² per element (Optimal Brain Damage), so
F alone is the wrong score: a weight with small Fisher but a large value is costly to
remove. Criteria (`masks.criterion`, and `masks.baselines` computed beside it):

=========== ============================================ ====================================
criterion   element                                      head / neuron
=========== ============================================ ====================================
saliency    ½·F·w²                                       ½·mean_i gate_i², the Fisher of a
                                                         gate on the unit (Kwon et al. 2022)
fisher      F (the seeds' criterion, for comparison)     mean F over the unit's elements
magnitude   |w|                                          mean |w| over the unit's elements
wanda       |w_ij|·||X_j|| (bias: |b_i|, input 1)        mean wanda score over the unit
random      uniform, seeded                              uniform, seeded
=========== ============================================ ====================================

`gate_i` of a query head is `sum_{k in head's o columns} g_i,k w_k` and of a neuron
`sum_{k in its down column} g_i,k w_k` (phase 1 stores it per sample): the derivative of
sample i's loss with respect to a multiplier on the unit's output. `||X_j||²` is the mean
square of input feature j over the task's labelled tokens (phase 1's `input_sq`).

Units:

* `element`: one element of a parameter `include` selects.
* `head`: a query head of one layer: its q rows and o columns (and their biases, in
  every selected parameter holding them, fused Q|K|V included). A KV head is removed
  exactly when every query head reading it is removed (GQA); it never counts as a unit.
* `neuron`: an MLP neuron of one layer: its up / gate rows and its down column.

Units compete within a *scope*: the whole model (`global`), one layer (`per_layer`;
tensors outside layers form one extra scope) or one tensor (`per_tensor`, elements
only). Wanda's elements compete within each output row by default, as in the paper
(`wanda_compare: row`; a bias element joins its output row). For sparsity `s` (the
fraction removed) a group of `n` competing units keeps `floor((1 - s) * n + 1/2)`
(round half up), exactly, ties included: ties go to the earlier unit (parameters by
name, elements in C order, heads / neurons by layer then index), as a stable sort by
descending score would.

Output `masks.safetensors`: `{criterion}/{sparsity}/{param}` boolean, True = kept
(`fisher_pipeline.pruning` reads and applies it), and `mask_summary.{parquet,csv}`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...config import NAMED_SELECTIONS
from ...errors import ConfigError, PhaseInputError
from ...layout import KV_BLOCKS, ParamGeometry, examples
from ...pruning import MASKS_FORMAT, mask_key, sparsity_key, write_masks_file
from ...store import FisherStore, open_store
from ..common import atomic_output_dir, read_finite, relocate, write_table
from . import MaskOptions

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["criterion", "sparsity", "level", "name", "layer", "n_elements", "kept_elements", "kept_fraction",
                   "n_units", "kept_units"]
#: Criteria that read the model's weights (saliency only for elements: a unit's gate is in the store).
NEEDS_WEIGHTS = ("saliency", "magnitude", "wanda")
#: The group blocks that make up a structured unit, and the one whose gate scores it.
UNIT_BLOCKS = {"head": ("q", "o"), "neuron": ("neuron",)}
GATE_ROLES = {"head": "o", "neuron": "mlp_out"}


@dataclass
class MaskSet:
    """Masks of one task for every criterion and sparsity.

    Attributes:
        masks: criterion -> sparsity -> parameter -> full-shape boolean mask (True = kept).
        kept_units: criterion -> sparsity -> parameter -> units kept (elements, or groups
            of its heads / neurons that are kept).
        n_units: parameter -> units (elements, or head / neuron groups).
        layers: parameter -> layer index (None outside layers).
    """

    masks: dict[str, dict[float, dict[str, np.ndarray]]] = field(default_factory=dict)
    kept_units: dict[str, dict[float, dict[str, int]]] = field(default_factory=dict)
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


def select_top_rows(scores: np.ndarray, sparsities: tuple[float, ...]) -> dict[float, np.ndarray]:
    """`select_top` within every row of `scores` `[rows, n]`, for each sparsity.

    One partition per sparsity (O(n)): the row's keep-th largest score is its threshold;
    of the scores equal to it, the first ones in the row fill the count (a stable sort's choice).
    """
    n = scores.shape[1]
    out = {}
    for s in sparsities:
        keep = keep_count(s, n)
        if keep <= 0 or keep >= n:
            out[s] = np.full(scores.shape, keep > 0)
            continue
        threshold = np.partition(scores, n - keep, axis=1)[:, n - keep, None]
        chosen = scores > threshold
        tied = scores == threshold
        missing = keep - chosen.sum(axis=1, keepdims=True)
        out[s] = chosen | (tied & (np.cumsum(tied, axis=1) <= missing))
    return out


# --- scores ------------------------------------------------------------------------------
class Scorer:
    """Scores of one criterion from a store (and the model's weights where the criterion needs them).

    Args:
        store: the task's phase 1 store.
        criterion: one of `CRITERIA`.
        weights: parameter name -> value (as the store names them); needed by saliency
            (elements), magnitude and wanda.
        seed: seed of the random criterion.
    """

    def __init__(self, store: FisherStore, criterion: str, weights: dict[str, np.ndarray] | None, seed: int):
        self.store, self.criterion, self.weights, self.seed = store, criterion, weights, seed
        self._gate_fisher_of: dict[str, np.ndarray] = {}

    def weight(self, param: str) -> np.ndarray:
        if self.weights is None or param not in self.weights:
            raise PhaseInputError(f"criterion {self.criterion!r} needs the model's weights ({param}); "
                                  "run masks with the model (the workflow passes model.path)")
        return np.asarray(self.weights[param], dtype=np.float32)

    def element(self, param: str) -> np.ndarray:
        """`[*shape]` float score of every element of `param`."""
        if self.criterion == "fisher":
            return read_finite(self.store, "fisher", param, dtype=np.float32)
        if self.criterion == "saliency":
            w = self.weight(param)
            return 0.5 * read_finite(self.store, "fisher", param, dtype=np.float32) * w * w
        if self.criterion == "magnitude":
            return np.abs(self.weight(param))
        if self.criterion == "wanda":
            return self._wanda(param)
        rng = np.random.default_rng([self.seed, zlib.crc32(param.encode())])
        return rng.random(self.store.geometry[param].shape, dtype=np.float32)

    def _wanda(self, param: str) -> np.ndarray:
        w = np.abs(self.weight(param))
        if param in self.store.input_sq_names:
            norm = np.sqrt(self.store.input_sq(param)).astype(np.float32)
            view = [1] * w.ndim
            view[self.store.input_dim(param)] = norm.size
            return w * norm.reshape(view)
        if bias_weight(param, self.store.input_sq_names) is not None:
            return w  # a bias is a weight on the constant input 1
        raise ConfigError(
            f"criterion wanda scores the weights of Linear / Conv1D layers (and their biases); {param} is neither "
            f"(no input statistics in {self.store.path}): restrict masks.include (e.g. 'blocks') or drop wanda"
        )

    def units(self, units: list[StructuredUnit], granularity: str) -> np.ndarray:
        """`[n_units]` score of every head / neuron unit."""
        if self.criterion == "saliency":
            return np.array([0.5 * self._gate_fisher(u.gate) for u in units])
        if self.criterion == "random":
            return np.random.default_rng([self.seed, zlib.crc32(granularity.encode())]).random(len(units))
        per_group: dict[str, np.ndarray] = {}
        totals = np.zeros(len(units))
        sizes = np.zeros(len(units))
        for i, unit in enumerate(units):
            for param, group in unit.members:
                if param not in per_group:
                    per_group[param] = self._group_sums(param)
                totals[i] += per_group[param][group]
                sizes[i] += self.store.geometry[param].sizes[group]
        return totals / sizes

    def _group_sums(self, param: str) -> np.ndarray:
        if self.criterion == "fisher":
            return read_finite(self.store, "group", param)
        return self.store.geometry[param].reduce_sum(self.element(param))

    def _gate_fisher(self, gate: tuple[str, int]) -> float:
        param, group = gate
        if param not in self._gate_fisher_of:
            self._gate_fisher_of[param] = self.store.gate_fisher(param)
        return float(self._gate_fisher_of[param][group])


def bias_weight(param: str, weights: list[str] | set[str]) -> str | None:
    """The weight beside bias `param` (`x.bias` -> `x.weight`) if it is in `weights`."""
    if not param.endswith(".bias"):
        return None
    weight = param[: -len("bias")] + "weight"
    return weight if weight in weights else None


# --- structured units --------------------------------------------------------------------
@dataclass(frozen=True)
class StructuredUnit:
    """One head or neuron of one layer.

    Attributes:
        layer: its layer.
        index: query head or neuron index.
        members: (parameter, group index) of every selected group it removes.
        gate: (parameter, group index) of the group whose gate gradient scores it.
    """

    layer: int
    index: int
    members: tuple[tuple[str, int], ...]
    gate: tuple[str, int]


def structured_units(store: FisherStore, params: list[str], granularity: str) -> list[StructuredUnit]:
    """The heads or neurons whose groups lie in `params`, by layer then index.

    Raises:
        ConfigError: no selected parameter holds a group of that kind.
    """
    geometry = store.geometry
    members: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for param in params:
        geo = geometry[param]
        for group, (block, index) in enumerate(geo.groups.keys):
            if block in UNIT_BLOCKS[granularity] and geo.layer is not None:
                members[(geo.layer, index)].append((param, group))
    if not members:
        raise ConfigError(
            f"masks.granularity = {granularity!r}, but no parameter masks.include selects holds "
            f"{granularity} groups ({', '.join(UNIT_BLOCKS[granularity])}); select attention (heads) or MLP (neurons) "
            f"parameters, e.g. include: blocks"
        )
    gates = _gate_groups(geometry.params, granularity)
    units = []
    for (layer, index), groups in sorted(members.items()):
        gate = gates.get((layer, index))
        if gate is None:
            raise PhaseInputError(f"layer {layer} has no {GATE_ROLES[granularity]} weight with a group for "
                                  f"{granularity} {index} in {store.path}: its gate cannot be scored")
        units.append(StructuredUnit(layer, index, tuple(groups), gate))
    return units


def _gate_groups(params: dict[str, ParamGeometry], granularity: str) -> dict[tuple[int, int], tuple[str, int]]:
    """(layer, index) -> (parameter, group) of the output-side weight group gating that unit."""
    block = "o" if granularity == "head" else "neuron"
    gates: dict[tuple[int, int], tuple[str, int]] = {}
    for name in sorted(params):
        geo = params[name]
        if geo.role != GATE_ROLES[granularity] or len(geo.shape) != 2 or geo.layer is None:
            continue
        for group, (b, index) in enumerate(geo.groups.keys):
            if b == block:
                gates.setdefault((geo.layer, index), (name, group))
    return gates


def structured_keep(store: FisherStore, params: list[str], units: list[StructuredUnit],
                    keep: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group keep flags of every parameter from unit flags; KV heads follow their query heads."""
    geometry = store.geometry
    flags = {p: np.ones(geometry[p].n_groups, dtype=bool) for p in params}
    removed: dict[int, set[int]] = defaultdict(set)
    for unit, kept in zip(units, keep, strict=True):
        if not kept:
            removed[unit.layer].add(unit.index)
            for param, group in unit.members:
                flags[param][group] = False
    attention = geometry.attention
    for param in params:
        geo = geometry[param]
        if geo.layer is None or not removed[geo.layer]:
            continue
        for group, (block, index) in enumerate(geo.groups.keys):
            if block in KV_BLOCKS and set(attention.query_heads(index)) <= removed[geo.layer]:
                flags[param][group] = False
    return flags


# --- masks ---------------------------------------------------------------------------------
def compute_masks(store: FisherStore, options: MaskOptions,
                  weights: dict[str, np.ndarray] | None = None) -> MaskSet:
    """Masks of every criterion and sparsity in `options` for the parameters `options.include` selects.

    Args:
        store: the task's phase 1 store.
        options: phase settings.
        weights: parameter name -> value, the model the store was made from (needed by
            saliency, magnitude and wanda).

    Raises:
        StoreContentError: a store array holds NaN/inf.
        ConfigError: `include` matches no parameter; a criterion cannot score a selected parameter.
        PhaseInputError: a criterion needs the weights and none were given.
    """
    params = selected_params(store, options.include)
    result = MaskSet(layers={p: store.geometry[p].layer for p in params})
    for criterion in options.criteria:
        scorer = Scorer(store, criterion, weights, options.seed)
        if options.granularity == "element":
            masks, kept = _element_masks(scorer, params, options)
            result.n_units.update({p: int(np.prod(store.geometry[p].shape)) for p in params})
        else:
            masks, kept = _structured_masks(scorer, params, options, result)
        result.masks[criterion], result.kept_units[criterion] = masks, kept
    if options.granularity != "element":
        result.layers = {p: result.layers[p] for p in result.n_units}
    return result


def _element_masks(scorer: Scorer, params: list[str], options: MaskOptions):
    geometry = scorer.store.geometry
    masks: dict[float, dict[str, np.ndarray]] = {s: {} for s in options.sparsities}
    kept: dict[float, dict[str, int]] = {s: {} for s in options.sparsities}
    if scorer.criterion == "wanda" and options.wanda_compare == "row":
        rows = _wanda_rows(scorer, params, options.sparsities)
        for s in options.sparsities:
            for p in params:
                masks[s][p] = rows[s][p]
                kept[s][p] = int(np.count_nonzero(rows[s][p]))
        return masks, kept
    for scope_params in _scopes(params, options.scope, {p: geometry[p].layer for p in params}):
        scores = [scorer.element(p).ravel() for p in scope_params]
        bounds = np.cumsum([0] + [len(x) for x in scores])
        flat = np.concatenate(scores) if len(scores) > 1 else scores[0]
        del scores
        for s in options.sparsities:
            keep = select_top(flat, keep_count(s, len(flat)))
            for p, start, stop in zip(scope_params, bounds[:-1], bounds[1:], strict=True):
                masks[s][p] = keep[start:stop].reshape(geometry[p].shape)
                kept[s][p] = int(np.count_nonzero(masks[s][p]))
    return masks, kept


def _wanda_rows(scorer: Scorer, params: list[str], sparsities: tuple[float, ...]) -> dict[float, dict[str, np.ndarray]]:
    """Wanda within each output row: a weight's row and its bias element compete together."""
    store = scorer.store
    out: dict[float, dict[str, np.ndarray]] = {s: {} for s in sparsities}
    weights_with_stats = [p for p in params if p in store.input_sq_names]
    biases = {bias_weight(p, weights_with_stats): p for p in params if bias_weight(p, weights_with_stats)}
    done: set[str] = set()
    for weight in weights_with_stats:
        scores = scorer.element(weight)
        out_dim = 1 - store.input_dim(weight)
        rows = np.moveaxis(scores, out_dim, 0)  # [out, in]
        bias = biases.get(weight)
        if bias is not None:
            rows = np.concatenate([rows, scorer.element(bias)[:, None]], axis=1)
        for s, flags in select_top_rows(rows, sparsities).items():
            n_in = scores.shape[1 - out_dim]
            out[s][weight] = np.ascontiguousarray(np.moveaxis(flags[:, :n_in], 0, out_dim))
            if bias is not None:
                out[s][bias] = flags[:, n_in].copy()
        done.update({weight, bias} - {None})
    for p in params:
        if p not in done:  # a parameter outside any Linear row: its elements compete together
            flat = scorer.element(p).ravel()
            for s in sparsities:
                out[s][p] = select_top(flat, keep_count(s, len(flat))).reshape(store.geometry[p].shape)
    return out


def _structured_masks(scorer: Scorer, params: list[str], options: MaskOptions, result: MaskSet):
    store = scorer.store
    units = structured_units(store, params, options.granularity)
    touched = sorted({param for unit in units for param, _ in unit.members}
                     | {p for p in params if set(store.geometry[p].groups.blocks) & set(KV_BLOCKS)
                        and options.granularity == "head"})
    scores = scorer.units(units, options.granularity)
    masks: dict[float, dict[str, np.ndarray]] = {s: {} for s in options.sparsities}
    kept: dict[float, dict[str, int]] = {s: {} for s in options.sparsities}
    for p in touched:
        result.n_units[p] = store.geometry[p].n_groups
    scope_of = (lambda u: 0) if options.scope == "global" else (lambda u: u.layer)
    by_scope: dict[object, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        by_scope[scope_of(unit)].append(i)
    for s in options.sparsities:
        keep = np.zeros(len(units), dtype=bool)
        for members in by_scope.values():
            keep[members] = select_top(scores[members], keep_count(s, len(members)))
        flags = structured_keep(store, touched, units, keep)
        for p in touched:
            masks[s][p] = np.array(store.geometry[p].expand(flags[p]))
            kept[s][p] = int(np.count_nonzero(flags[p]))
    return masks, kept


def mask_summary(mask_set: MaskSet) -> pd.DataFrame:
    """Kept elements and units per criterion and tensor, per layer and for the whole masked model.

    Returns:
        columns `SUMMARY_COLUMNS`; level is "tensor", "layer" (name `layer.<l>`, or
        `outside_layers`) or "global" (name `model`).
    """
    rows = []
    for criterion, by_sparsity in mask_set.masks.items():
        for s, masks in by_sparsity.items():
            per_tensor = [
                {"criterion": criterion, "sparsity": s, "level": "tensor", "name": p, "layer": mask_set.layers[p],
                 "n_elements": m.size, "kept_elements": int(np.count_nonzero(m)), "n_units": mask_set.n_units[p],
                 "kept_units": mask_set.kept_units[criterion][s][p]}
                for p, m in masks.items()
            ]
            by_layer: dict[int | None, list[dict]] = defaultdict(list)
            for row in per_tensor:
                by_layer[row["layer"]].append(row)
            rows += per_tensor
            rows += [_total(criterion, s, "layer", _layer_name(layer), layer, members)
                     for layer, members in by_layer.items()]
            rows.append(_total(criterion, s, "global", "model", None, per_tensor))
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    table["kept_fraction"] = table["kept_elements"] / table["n_elements"]
    return table


def run_masks(store_path: str | os.PathLike, out_dir: str | os.PathLike,
              options: MaskOptions | None = None, task: str | None = None,
              weights: dict[str, np.ndarray] | None = None, pipeline=None) -> dict[str, Path]:
    """Phase 3 for one task: write `masks.safetensors` and `mask_summary.{parquet,csv}` into `out_dir`.

    Args:
        store_path: the task's phase 1 store.
        out_dir: directory to (re)create, atomically.
        options: phase settings (defaults if None).
        task: task name recorded in the masks' metadata (default: the store's `task` attr).
        weights: parameter name -> value of the store's model; loaded from `pipeline.model`
            when None and a criterion needs them.
        pipeline: a `PipelineConfig` whose `model` section names the model (the workflow's).

    Returns:
        output key -> path: `masks`, `mask_summary_parquet`, `mask_summary_csv`.
    """
    options = options or MaskOptions()
    store = open_store(store_path)
    task = task or str(store.attrs.get("task", Path(store_path).stem))
    if weights is None and needs_weights(options) and pipeline is not None:
        from ...models.weights import load_weights

        weights = load_weights(pipeline.model, store)
    mask_set = compute_masks(store, options, weights)
    with atomic_output_dir(out_dir) as staging:
        paths = {"masks": write_masks(mask_set, staging / "masks.safetensors", _masks_metadata(store, task, options,
                                                                                              mask_set))}
        paths |= write_table(mask_summary(mask_set), staging, "mask_summary")
    return relocate(paths, staging, out_dir)


def needs_weights(options: MaskOptions) -> bool:
    """Whether some criterion of `options` reads the model's weights."""
    needed = set(NEEDS_WEIGHTS) - ({"saliency"} if options.granularity != "element" else set())
    return bool(set(options.criteria) & needed)


def write_masks(mask_set: MaskSet, path: Path, metadata: dict) -> Path:
    """Write every mask of `mask_set` into one safetensors file at `path`."""
    tensors = {mask_key(c, s, p): m for c, by_s in mask_set.masks.items() for s, masks in by_s.items()
               for p, m in masks.items()}
    return write_masks_file(tensors, path, metadata)


def _masks_metadata(store: FisherStore, task: str, options: MaskOptions, mask_set: MaskSet) -> dict:
    return {
        "format": MASKS_FORMAT,
        "task": task,
        "source_store": str(store.path),
        "model_id": store.attrs.get("model_id"),
        "weights_hash": store.attrs.get("weights_hash"),
        "criterion": options.criterion,
        "criteria": list(options.criteria),
        "sparsities": [sparsity_key(s) for s in options.sparsities],
        "scope": options.scope,
        "granularity": options.granularity,
        "include": options.include,
        "wanda_compare": options.wanda_compare,
        "seed": options.seed,
        "params": sorted(mask_set.layers),
        "layers": mask_set.layers,
        "meaning": "True = kept; sparsity = fraction of units removed",
    }


def selected_params(store: FisherStore, include: str | None) -> list[str]:
    """Parameters `masks.include` selects: a named selection, a regex, or None (all)."""
    if include is None:
        return sorted(store.param_names)
    if include in NAMED_SELECTIONS:
        return store.geometry.select(include, what="masks.include")
    params = [p for p in store.param_names if re.search(include, p)]
    if not params:
        raise ConfigError(
            f"masks.include = {include!r} matches no parameter of store {store.path}; it is a named selection "
            f"({', '.join(NAMED_SELECTIONS)}) or a regex searched in parameter names such as "
            f"{examples(store.param_names)} (null masks every parameter)"
        )
    return sorted(params)


def _scopes(params: list[str], scope: str, layers: dict[str, int | None]) -> list[list[str]]:
    """Parameters grouped by the scope their units compete in, each in name order."""
    if scope == "global":
        return [params]
    key = layers.get if scope == "per_layer" else (lambda p: p)
    grouped: dict[object, list[str]] = defaultdict(list)
    for p in params:
        grouped[key(p)].append(p)
    return list(grouped.values())


def _layer_name(layer: int | None) -> str:
    return "outside_layers" if layer is None else f"layer.{layer}"


def _total(criterion: str, sparsity: float, level: str, name: str, layer: int | None, members: list[dict]) -> dict:
    sums = {k: sum(m[k] for m in members) for k in ("n_elements", "kept_elements", "n_units", "kept_units")}
    return {"criterion": criterion, "sparsity": sparsity, "level": level, "name": name, "layer": layer, **sums}
