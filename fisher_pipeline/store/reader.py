"""Reads a complete store lazily (`FisherStore`, `open_store`), and checks that stores compare."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..atomic import staging_siblings
from ..errors import StoreContentError, StoreFormatError, StoreMismatchError
from ..layout import GroupSpec, ModelGeometry, TensorSlice
from .format import FORMAT_VERSION, READABLE_VERSIONS, RECORDED_VERSION
from .integrity import open_checked, unrecorded_store


class FisherStore:
    """Lazy reader of one task's store; arrays are read only when asked for.

    Attributes:
        attrs: the store's metadata.
        sample_ids: sample ids in store order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = (" (an interrupted run left a staging directory: rerun phase 1)"
                    if staging_siblings(self.path) else "")
            raise StoreFormatError(f"no Fisher store at {self.path}{hint}")
        remedy = f"rerun phase 1 for this task (remove {self.path}; the workflow writes it again)"
        try:
            self.root, self._checked = open_checked(self.path, remedy)
        except StoreFormatError:
            raise
        except Exception as err:
            raise StoreFormatError(f"{self.path} is not a Fisher store ({err})") from None
        self.attrs = dict(self.root.attrs)
        version = self.attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreFormatError(
                f"{self.path} has store format version {version!r}; this fisher_pipeline reads "
                f"version {FORMAT_VERSION} (and versions 2 and 3: version 2 lacks the gates, group saliencies and "
                "input second moments, neither has an integrity record). Rerun phase 1 to rewrite it."
            )
        if self._checked is None:
            unrecorded_store(self.path, "rerun phase 1 for this task", recorded=version >= RECORDED_VERSION)
        elif self.attrs.get("task"):
            self._checked.remedy = (f"rerun phase 1 for task {self.attrs['task']!r} (remove {self.path}; the "
                                    "workflow writes it again)")
        self._index: dict[str, int] | None = None

    # --- samples -----------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.attrs["n_samples"])

    @property
    def sample_ids(self) -> list[str]:
        return [str(x) for x in self.root["samples/id"][:]]

    @property
    def n_tokens(self) -> np.ndarray:
        return self.root["samples/n_tokens"][:]

    @property
    def losses(self) -> np.ndarray:
        return self.root["samples/loss"][:]

    def sample_index(self, ids: Iterable[str]) -> np.ndarray:
        """Store rows of sample `ids` (KeyError naming an unknown id)."""
        if self._index is None:
            self._index = {sid: i for i, sid in enumerate(self.sample_ids)}
        try:
            return np.array([self._index[i] for i in ids], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"sample id {err.args[0]!r} is not in store {self.path}") from None

    # --- aggregated statistics ---------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return sorted(self.root["grad_mean"].array_keys())  # every store has grad_mean/ (held-out ones no fisher/)

    @property
    def per_sample_names(self) -> list[str]:
        return list(self.attrs.get("per_sample_params", []))

    def array(self, kind: str, name: str) -> zarr.Array:
        """The lazy zarr array `kind/name` (kind: fisher, grad_mean, group, ...)."""
        key = f"{kind}/{name}"
        if kind == "fisher" and self.attrs.get("elementwise_fisher") is False:
            raise StoreContentError(f"store {self.path} keeps no elementwise Fisher (a {self.attrs.get('sample_set')} "
                                    "store: mean and per-sample gradients only); read the Fisher of the task's "
                                    "analysed store")
        if key not in self.root:
            raise KeyError(f"{key} is not in store {self.path}")
        return self.root[key]

    def fisher(self, name: str) -> np.ndarray:
        """Diagonal Fisher `mean_i g_i^2` of parameter `name`, full shape."""
        return self.array("fisher", name)[...]

    def grad_mean(self, name: str) -> np.ndarray:
        """Mean gradient `mean_i g_i`, full shape."""
        return self.array("grad_mean", name)[...]

    def fisher_m2(self, name: str) -> np.ndarray:
        """Elementwise Welford M2 of `g^2` (only for parameters selected in the config)."""
        return self.array("fisher_m2", name)[...]

    def fisher_se(self, name: str) -> np.ndarray:
        """Standard error of the Fisher estimate, elementwise: `sqrt(M2 / (N-1) / N)`."""
        return _standard_error(self.fisher_m2(name), self.n_samples)

    def group_fisher(self, name: str) -> np.ndarray:
        """Fisher summed within each group (head / neuron) of `name`, `[G]`."""
        return self.array("group", name)[...]

    def group_names(self, name: str) -> list[str]:
        """Display names of the groups of `name` (`q.h0`, `k.h1`, `neuron.17`, `all`)."""
        return list(self.geometry[name].groups.names)

    def group_sizes(self, name: str) -> np.ndarray:
        """Number of parameter elements in each group, `[G]`."""
        return self.geometry[name].sizes

    def group_labels(self, name: str) -> np.ndarray:
        """Group index of each position along the group dimension, `[shape[dim]]`."""
        return self.geometry[name].groups.label_array

    def group_spec(self, name: str) -> GroupSpec:
        """The stored group partition of `name`."""
        return self.geometry[name].groups

    def group_m2(self, name: str) -> np.ndarray:
        return self.array("group_m2", name)[...]

    def group_se(self, name: str) -> np.ndarray:
        """Standard error of each group's Fisher (from the spread of per-sample group sums)."""
        return _standard_error(self.group_m2(name), self.n_samples)

    # --- gates, saliencies and input second moments ------------------------------
    def _added_in_v3(self, kind: str, name: str) -> zarr.Array:
        """Array `kind/name` of the arrays format version 3 added (an older store lacks them)."""
        key = f"{kind}/{name}"
        if key in self.root:
            return self.root[key]
        if f"fisher/{name}" in self.root and self.attrs.get("format_version") == 2:
            raise StoreFormatError(
                f"{self.path} has no {key}: it was written by an older phase 1 (store format version "
                f"{self.attrs.get('format_version')!r}) that did not store it; rerun phase 1 for this task.")
        raise KeyError(f"{key} is not in store {self.path}")

    def gate(self, name: str, ids: Iterable[str] | None = None) -> np.ndarray:
        """Per-sample gate gradients `gate_i,G = sum_{k in G} g_i,k w_k` of `name`, `[N, G]`
        float64 (rows: sample `ids`, default all in store order; groups as `group_names`)."""
        array = self._added_in_v3("gate", name)
        if ids is None:
            return array[...].astype(np.float64)
        return array.get_orthogonal_selection((self.sample_index(ids),)).astype(np.float64)

    def gate_fisher(self, name: str) -> np.ndarray:
        """Fisher of a multiplicative gate on each group, `mean_i gate_i,G^2`, `[G]`."""
        return np.square(self.gate(name)).mean(0)

    def gate_fisher_se(self, name: str) -> np.ndarray:
        """Standard error of `gate_fisher`: `sd_i(gate_i,G^2) / sqrt(N)` (NaN for N < 2), `[G]`."""
        squares = np.square(self.gate(name))
        if len(squares) < 2:
            return np.full(squares.shape[1], np.nan)
        return squares.std(0, ddof=1) / np.sqrt(len(squares))

    def group_saliency(self, name: str) -> np.ndarray:
        """Mean over samples of `s_i,G = 0.5 * sum_{k in G} g_i,k^2 w_k^2` = `0.5 * sum_{k in G} F_k w_k^2`,
        the Optimal Brain Damage cost of removing each group, `[G]`."""
        return self._added_in_v3("group_saliency", name)[...].astype(np.float64)

    def group_saliency_se(self, name: str) -> np.ndarray:
        """Standard error of `group_saliency`: `sqrt(M2 / (N-1) / N)`, `[G]`."""
        return _standard_error(self._added_in_v3("group_saliency_m2", name)[...].astype(np.float64), self.n_samples)

    @property
    def _input_sq_attrs(self) -> dict[str, dict[str, int]]:
        if "input_sq" not in self.attrs:
            raise StoreFormatError(
                f"{self.path} has no input_sq (input second moments of the Linear / Conv1D layers): it was written "
                f"by an older phase 1 (store format version {self.attrs.get('format_version')!r}); rerun phase 1 "
                "for this task.")
        return self.attrs["input_sq"]

    @property
    def input_sq_names(self) -> list[str]:
        """Weights with input second moments: those of Linear / Conv1D layers no other module uses."""
        return sorted(self._input_sq_attrs)

    def _input_sq_entry(self, name: str) -> dict[str, int]:
        entries = self._input_sq_attrs
        if name not in entries:
            raise KeyError(f"{name} has no input_sq in store {self.path}: only the weights of Linear / Conv1D "
                           f"layers used by no other module have one ({len(entries)} here)")
        return entries[name]

    def input_sq(self, name: str) -> np.ndarray:
        """Mean over scored token positions of each input feature's square at `name`'s layer, `[in_features]`."""
        self._input_sq_entry(name)
        return self._added_in_v3("input_sq", name)[...].astype(np.float64)

    def input_dim(self, name: str) -> int:
        """The dimension of weight `name` that indexes input features (1: Linear `[out, in]`, 0: Conv1D `[in, out]`)."""
        return int(self._input_sq_entry(name)["input_dim"])

    def input_sq_tokens(self, name: str) -> int:
        """Token positions `input_sq(name)` averages over (the scored positions of every sample)."""
        return int(self._input_sq_entry(name)["tokens"])

    # --- geometry ----------------------------------------------------------------
    @cached_property
    def geometry(self) -> ModelGeometry:
        """Layer, role and groups of every parameter, and the attention shape (GQA map)."""
        return ModelGeometry.from_attrs(self.attrs["geometry"])

    def heads(self, name: str, block: str, kind: str = "per_sample", ids: Iterable[str] | None = None,
              rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The heads of `block` in array `kind/name`, stacked: one read, one reshape.

        Args:
            name: parameter holding heads of `block` (see `geometry.head_params`).
            block: q, k, v or o (k and v are per KV head).
            kind: `per_sample` (then rows are samples), or a full-shape statistic
                (`fisher`, `grad_mean`, `fisher_m2`).
            ids, rows: samples to read (by id or store row; default all), per-sample only.

        Returns:
            `[N, H, *shape']` for per-sample data, `[H, *shape']` for a statistic, where
            `shape'` is the parameter's shape with the head dim narrowed to head_dim.
        """
        geometry = self.geometry[name]
        array = self.array(kind, name)
        if kind != "per_sample":
            return geometry.split_heads(array, block)
        samples = self.sample_index(ids) if ids is not None else rows
        return geometry.split_heads(array, block, batch_dims=1, samples=samples)

    # --- per-sample data ---------------------------------------------------------
    def per_sample(self, name: str, ids: Iterable[str] | None = None,
                   rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Per-sample gradients `g_i` of `name`: `[k, *shape]` for sample `ids` (or store `rows`)."""
        array = self.array("per_sample", name)
        index = self.sample_index(ids) if ids is not None else rows
        if index is None:
            return array[...]
        if isinstance(index, slice):
            return array[index]
        return array.get_orthogonal_selection((np.asarray(index),))

    def per_sample_slice(self, tensor_slice: TensorSlice, ids: Iterable[str] | None = None) -> np.ndarray:
        """`g_i` restricted to a head slice: `[k, ...]` with `tensor_slice.dim` narrowed."""
        array = self.array("per_sample", tensor_slice.param)
        samples = self.sample_index(ids) if ids is not None else slice(None)
        selection: list[Any] = [samples] + [slice(None)] * (array.ndim - 1)
        selection[tensor_slice.dim + 1] = tensor_slice.index.numpy()
        return array.get_orthogonal_selection(tuple(selection))

    def contributions(self, name: str, ids: Iterable[str] | None = None) -> np.ndarray:
        """Per-sample Fisher contributions `C_i = g_i^2` (float32), `[k, *shape]`."""
        return np.square(self.per_sample(name, ids).astype(np.float32))

    def check(self, *, weights_hash: str | None = None, config_hash: str | None = None,
              task: str | None = None) -> FisherStore:
        """Raise `StoreMismatchError` if the store was made from another model/config/task."""
        for key, expected in (("weights_hash", weights_hash), ("config_hash", config_hash), ("task", task)):
            found = self.attrs.get(key)
            if expected is not None and found != expected:
                raise StoreMismatchError(
                    f"store {self.path} was written with {key} {found!r}, but {expected!r} was expected "
                    f"(model {self.attrs.get('model_id')!r}). It belongs to another model or config: "
                    "rerun phase 1 for this one, or point to the matching store."
                )
        return self


def _standard_error(m2: np.ndarray, n: int) -> np.ndarray:
    if n < 2:
        return np.full_like(m2, np.nan)
    return np.sqrt(m2 / (n - 1) / n)


def open_store(path: str | os.PathLike, *, weights_hash: str | None = None,
               config_hash: str | None = None, task: str | None = None) -> FisherStore:
    """Open a complete Fisher store lazily, optionally checking what it was made from."""
    return FisherStore(path).check(weights_hash=weights_hash, config_hash=config_hash, task=task)


def check_same_model(stores: Mapping[str, FisherStore], per_sample: bool = False) -> None:
    """Refuse stores that cannot be compared: other weights, other parameters, other Fisher kinds.

    Args:
        stores: task -> opened store.
        per_sample: also require the same per-sample parameters and dtype (the pair phases
            compare per-sample gradients element by element).

    Raises:
        StoreMismatchError: naming both stores, the differing attribute and the fix.
    """
    keys = ["weights_hash", "model_id", "fisher_kind"]
    if per_sample:
        keys += ["per_sample_params", "per_sample_dtype"]
    (first_task, first), *others = stores.items()
    for task, store in others:
        for key in keys:
            if store.attrs.get(key) != first.attrs.get(key):
                raise StoreMismatchError(
                    f"stores of tasks {first_task!r} ({first.path}) and {task!r} ({store.path}) differ in "
                    f"{key} ({_short(first.attrs.get(key))} vs {_short(store.attrs.get(key))}): cross-task phases "
                    "need stores made from one model with one `fisher` config; rerun phase 1 for the stale task."
                )
        if store.param_names != first.param_names:
            missing = sorted(set(first.param_names) ^ set(store.param_names))[:5]
            raise StoreMismatchError(
                f"stores {first.path} and {store.path} hold different parameters (e.g. {missing}): "
                "rerun phase 1 with the same model and config for every task."
            )


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...]"
