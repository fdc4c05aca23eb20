"""Reading the partial stores of a task's shards, checking they fit together, and merging them
exactly into the store one job would have written (`merge_shards`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import staging_siblings
from ..errors import StoreFormatError, StoreMismatchError, TaskError
from ..layout import ModelGeometry
from ..shard_plan import shard_name, shard_ranges
from ..store import StoreWriter
from ..store.integrity import open_checked, unrecorded_store
from ..welford import Welford
from .partial import INPUT_SQ_ARRAY, SHARD_FORMAT_VERSION, STATE_ARRAYS, ShardInfo

_RERUN = ("rerun its job (the workflow reruns only missing shards: `snakemake --cores N`; by hand: "
          "`python -m fisher_pipeline fisher --config ... --task TASK --sample-shard k/K --param-shard p/P "
          "--out PATH`)")


class Shard:
    """Lazy reader of one complete partial store."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.name.endswith(".partial"):
            staged = re.fullmatch(r"\.(.+)\.\d+-[0-9a-f]+\.partial", self.path.name)
            final = self.path.with_name(staged.group(1)) if staged else "the shard's own path"
            raise StoreFormatError(
                f"shard {self.path} is a partial shard (the unfinished output of a failed or interrupted job), "
                f"not a complete one: pass {final} once its job has finished; {_RERUN}"
            )
        if not self.path.exists():
            left = staging_siblings(self.path)
            if left:
                raise StoreFormatError(
                    f"shard {self.path} is incomplete: its job failed or was interrupted (it left "
                    f"{left[0].name}); {_RERUN}"
                )
            raise StoreFormatError(f"shard {self.path} does not exist: {_RERUN}")
        try:
            self.root, checked = open_checked(self.path, _RERUN)
        except StoreFormatError:
            raise
        except Exception as err:
            raise StoreFormatError(f"{self.path} is not a phase 1 shard ({err}); {_RERUN}") from None
        self.attrs = dict(self.root.attrs)
        version = self.attrs.get("shard_format_version")
        if version == SHARD_FORMAT_VERSION and checked is None:
            unrecorded_store(self.path, _RERUN, recorded=True)
        if version != SHARD_FORMAT_VERSION:
            what = "a finished Fisher store, not a shard" if "format_version" in self.attrs else "not a phase 1 shard"
            raise StoreFormatError(
                f"{self.path} is {what} (shard_format_version {version!r}; this fisher_pipeline merges version "
                f"{SHARD_FORMAT_VERSION}): pass the shards written by `fisher --sample-shard ...`; {_RERUN}"
            )
        self.info = ShardInfo.from_attrs(self.attrs["shard"])
        self.store_attrs: dict[str, Any] = dict(self.attrs["store_attrs"])
        self.count = int(self.attrs["count"])
        self.skipped: list[dict[str, str]] = list(self.attrs["skipped"])
        self.input_sq: dict[str, dict[str, int]] = dict(self.attrs["input_sq"])

    @property
    def key(self) -> tuple[int, int]:
        return self.info.sample_shard, self.info.param_shard

    @cached_property
    def ids(self) -> list[str]:
        return [str(x) for x in self.root["samples/id"][:]]

    @cached_property
    def n_tokens(self) -> np.ndarray:
        return self.root["samples/n_tokens"][:]

    @cached_property
    def losses(self) -> np.ndarray:
        return self.root["samples/loss"][:]

    def welford(self, kind: str, name: str) -> Welford:
        """The shard's float64 Welford state `kind` (fisher, grad, group, saliency, input_sq) of
        parameter `name` (for input_sq its count is the scored token positions)."""
        if kind == "input_sq":
            total = torch.from_numpy(self.root[f"{INPUT_SQ_ARRAY}/{name}"][...])
            return Welford(int(self.input_sq[name]["tokens"]), total, None)
        total_key, m2_key = STATE_ARRAYS[kind]
        total = torch.from_numpy(self.root[f"{total_key}/{name}"][...])
        m2 = None
        if m2_key is not None and f"{m2_key}/{name}" in self.root:
            m2 = torch.from_numpy(self.root[f"{m2_key}/{name}"][...])
        return Welford(self.count, total, m2)

    def per_sample(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of the shard's per-sample gradients of `name`."""
        return self.root[f"per_sample/{name}"][start:stop]

    def gate(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of the shard's per-sample gates of `name`."""
        return self.root[f"gate/{name}"][start:stop]


class _MergedStates(Mapping):
    """Parameter -> Welford state merged over the sample shards (Chan, in shard index order).

    Computed when asked for, one shard's state read at a time (the last result is kept);
    what stays in memory beyond that is up to the caller.
    """

    def __init__(self, kind: str, sources: dict[str, list[Shard]]):
        self.kind = kind
        self.sources = sources
        self._last: tuple[str, Welford] | None = None

    def __getitem__(self, name: str) -> Welford:
        last = self._last
        if last is not None and last[0] == name:
            return last[1]
        merged = None
        for shard in self.sources[name]:  # one shard's state read at a time
            state = shard.welford(self.kind, name)
            if merged is None:
                merged = Welford.zeros(tuple(state.total.shape), state.m2 is not None)
            merged.merge(state)
        self._last = (name, merged)
        return merged

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


class MergedStatistics:
    """What `StoreWriter.close` reads from an accumulator, merged from shards on demand."""

    def __init__(self, sources: dict[str, list[Shard]], count: int, geometry: ModelGeometry):
        self.fisher = _MergedStates("fisher", sources)
        self.grad = _MergedStates("grad", sources)
        self.group = _MergedStates("group", sources)
        self.saliency = _MergedStates("saliency", sources)
        self.input_dims = {name: int(shards[0].input_sq[name]["input_dim"]) for name, shards in sorted(sources.items())
                           if name in shards[0].input_sq}
        # sums and token counts add up: the merged mean is the token-weighted mean of the shards'
        self.input_sq = _MergedStates("input_sq", {name: sources[name] for name in self.input_dims})
        self.count = count
        self.shapes = {name: geometry.params[name].shape for name in sources}


def _describe(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)[:200]


def check_shards(shards: Sequence[Shard], *, task: str | None = None,
                 config_hash: str | None = None) -> dict[tuple[int, int], Shard]:
    """Check that `shards` are one complete, consistent K x P grid; return it by (k, p).

    Raises:
        StoreMismatchError: shards of another model / config / task / split, duplicated or
            overlapping shards, parameter shares that do not partition the model.
        StoreFormatError: a shard of the grid is missing.
    """
    if not shards:
        raise StoreFormatError("no shards to merge: pass the partial stores of every shard of the task")
    first = shards[0]
    expected = {"task": task, "config_hash": config_hash}
    for key, value in expected.items():
        found = first.store_attrs.get(key)
        if value is not None and found != value:
            raise StoreMismatchError(
                f"shard {first.path} was written with {key} {found!r}, but this merge expects {value!r}: it "
                f"belongs to another {'task' if key == 'task' else 'config'}. Delete it and {_RERUN}"
            )
    for shard in shards[1:]:
        for key in sorted(set(first.store_attrs) | set(shard.store_attrs)):
            if first.store_attrs.get(key) != shard.store_attrs.get(key):
                raise StoreMismatchError(
                    f"shards {first.path} and {shard.path} differ in {key} ({_describe(first.store_attrs.get(key))} "
                    f"vs {_describe(shard.store_attrs.get(key))}): they come from different runs (model, config, "
                    f"task or package version). Delete the stale one and {_RERUN}"
                )
        for key in ("geometry", "per_sample_dtype", "shard_samples"):
            if first.attrs.get(key) != shard.attrs.get(key):
                raise StoreMismatchError(f"shards {first.path} and {shard.path} differ in {key}: they come from "
                                         f"different models or configs. Delete the stale one and {_RERUN}")
        counts = (shard.info.sample_shards, shard.info.param_shards, shard.info.task_samples)
        if counts != (first.info.sample_shards, first.info.param_shards, first.info.task_samples):
            raise StoreMismatchError(
                f"shard {shard.path} belongs to a split into {shard.info.sample_shards} sample shards x "
                f"{shard.info.param_shards} parameter shares of {shard.info.task_samples} samples, but "
                f"{first.path} to {first.info.sample_shards} x {first.info.param_shards} of "
                f"{first.info.task_samples}: shards of different runs are mixed. Pass only the shards of one run "
                f"(delete the stale ones)."
            )
    n_k, n_p, n_task = first.info.sample_shards, first.info.param_shards, first.info.task_samples
    grid: dict[tuple[int, int], Shard] = {}
    for shard in shards:
        k, p = shard.key
        if not (0 <= k < n_k and 0 <= p < n_p):
            raise StoreMismatchError(f"shard {shard.path} claims to be {shard.info.label}, outside the grid: "
                                     f"it is damaged. Delete it and {_RERUN}")
        if shard.key in grid:
            raise StoreMismatchError(
                f"shards {grid[shard.key].path} and {shard.path} are both {shard.info.label} (duplicated "
                f"shards): pass each shard once."
            )
        grid[shard.key] = shard
    ranges = shard_ranges(n_task, n_k)
    for k in range(n_k):
        for p in range(n_p):
            if (k, p) not in grid:
                where = first.path.parent / shard_name(k, n_k, p, n_p)
                raise StoreFormatError(
                    f"shard {where} (task {first.store_attrs.get('task')!r}, sample shard {k} of {n_k}, parameter "
                    f"share {p} of {n_p}) is missing from the merge: pass it too, or {_RERUN}"
                )
    for (k, p), shard in sorted(grid.items()):
        if (shard.info.sample_start, shard.info.sample_stop) != ranges[k]:
            raise StoreMismatchError(
                f"shard {shard.path} holds samples {shard.info.sample_start}..{shard.info.sample_stop} of "
                f"{n_task}, but sample shard {k} of {n_k} covers {ranges[k][0]}..{ranges[k][1]} (overlapping or "
                f"misplaced shards). Delete it and {_RERUN}"
            )
        reference = grid[(k, 0)]
        skipped_ids = [item["id"] for item in shard.skipped]
        if p and (shard.ids != reference.ids or skipped_ids != [item["id"] for item in reference.skipped]):
            raise StoreMismatchError(
                f"shards {reference.path} and {shard.path} (parameter shares of sample shard {k}) hold different "
                f"samples or skipped samples ({_describe(reference.skipped)} vs {_describe(shard.skipped)}). A "
                f"sample whose gradient is non-finite only in some parameters is skipped only by the shares "
                f"holding them: fix the model or data, or set fisher.param_shards: 1."
            )
        if shard.info.params != grid[(0, p)].info.params:
            raise StoreMismatchError(f"shards {grid[(0, p)].path} and {shard.path} hold different parameters for "
                                     f"share {p}: they come from different runs. Delete the stale one and {_RERUN}")
    geometry_names = set(first.attrs["geometry"]["params"])
    owner: dict[str, Shard] = {}
    for p in range(n_p):
        for name in grid[(0, p)].info.params:
            if name in owner:
                raise StoreMismatchError(f"parameter {name} is in both {owner[name].path} and {grid[(0, p)].path} "
                                         f"(overlapping parameter shares): they come from different runs.")
            owner[name] = grid[(0, p)]
    missing = sorted(geometry_names - set(owner))
    if missing or set(owner) - geometry_names:
        raise StoreMismatchError(
            f"the parameter shares of {first.path.parent} do not cover the model exactly (missing "
            f"{missing[:3]}, unknown {sorted(set(owner) - geometry_names)[:3]}): the shards are damaged or mixed."
        )
    return grid


def all_skipped_error(task: str, n_samples: int, skipped: Sequence[tuple[str, str]]) -> TaskError:
    """The error of a task whose every sample was skipped (one job or a merge)."""
    reasons = "; ".join(f"{sample_id}: {reason}" for sample_id, reason in skipped[:3])
    return TaskError(
        f"task {task!r}: all {n_samples} samples were skipped (non-finite loss or gradient; "
        f"e.g. {reasons}), so there is nothing to store. Check the model's weights (NaN/inf) and "
        "the task's text; with fisher.labels 'sampled', try 'empirical'."
    )


def _skipped(grid: dict[tuple[int, int], Shard], n_k: int, n_p: int) -> list[tuple[str, str]]:
    """Skipped samples of every sample shard in order, each with the least reason over the shares.

    Every share of a sample shard skips the same samples (checked); a non-finite gradient is
    reported in a parameter of the share's own, so the shares may name different ones: the
    least reason is kept ("non-finite gradient in <the smallest parameter name reported>").
    """
    skipped = []
    for k in range(n_k):
        for row, item in enumerate(grid[(k, 0)].skipped):
            skipped.append((item["id"], min(grid[(k, p)].skipped[row]["reason"] for p in range(n_p))))
    return skipped


def open_shards(paths: Iterable[str | os.PathLike], *, task: str | None = None,
                config_hash: str | None = None) -> dict[tuple[int, int], Shard]:
    """Open and check the partial stores of one task's shards (`check_shards`): (k, p) -> shard."""
    return check_shards([Shard(path) for path in paths], task=task, config_hash=config_hash)


def _grid_shape(grid: Mapping[tuple[int, int], Shard]) -> tuple[int, int]:
    return 1 + max(k for k, _ in grid), 1 + max(p for _, p in grid)


def merged_statistics(grid: Mapping[tuple[int, int], Shard]) -> MergedStatistics:
    """The float64 Welford states of the whole task, merged from a checked grid on demand.

    Each parameter's state is the Chan merge of its share's states over the sample shards
    in shard index order, starting from an empty state (what `merge_shards` stores).
    """
    n_k, n_p = _grid_shape(grid)
    first = grid[(0, 0)]
    geometry = ModelGeometry.from_attrs(first.attrs["geometry"])
    owners = {name: p for p in range(n_p) for name in grid[(0, p)].info.params}
    sources = {name: [grid[(k, owners[name])] for k in range(n_k)] for name in geometry.params}
    return MergedStatistics(sources, sum(grid[(k, 0)].count for k in range(n_k)), geometry)


def merge_shards(paths: Iterable[str | os.PathLike], out: str | os.PathLike, *, task: str | None = None,
                 config_hash: str | None = None) -> Path:
    """Merge the partial stores of one task's K x P shards into the task's store `out`.

    The result is the store one job would have written, to float rounding (`StoreWriter`,
    same attrs): Welford states merged with Chan's formula over the sample shards in shard
    index order (whatever the order of `paths`), parameter shares joined, per-sample arrays
    and sample lists concatenated in sample order, `shard_samples` rows at a time. Written
    atomically; nothing is left at `out` on an error.

    Args:
        paths: the partial stores (any order).
        out: the store to write (`results/fisher/{task}.zarr`).
        task, config_hash: when given, every shard must have been written for them.

    Raises:
        StoreFormatError: a shard is missing, partial or not a shard.
        StoreMismatchError: shards of another config / model / task / split, duplicates, overlaps.
        TaskError: every sample of the task was skipped.
    """
    grid = open_shards(paths, task=task, config_hash=config_hash)
    n_k, n_p = _grid_shape(grid)
    first = grid[(0, 0)]
    rows = [grid[(k, 0)] for k in range(n_k)]  # samples come from parameter share 0 (all shares agree)
    skipped = _skipped(grid, n_k, n_p)
    total = sum(shard.count for shard in rows)
    store_attrs = first.store_attrs
    if total == 0:
        raise all_skipped_error(str(store_attrs.get("task")), first.info.task_samples, skipped)
    geometry = ModelGeometry.from_attrs(first.attrs["geometry"])
    per_sample_owner = {name: p for p in range(n_p) for name in grid[(0, p)].attrs["per_sample_params"]}
    owner = {name: p for p in range(n_p) for name in grid[(0, p)].info.params}
    block = max(int(first.attrs["shard_samples"]), 1)
    writer = StoreWriter(out, store_attrs, geometry, sorted(per_sample_owner), first.attrs["per_sample_dtype"],
                         total, shard_samples=block)
    try:
        offsets = np.cumsum([0] + [shard.count for shard in rows])
        for start in range(0, total, block):  # blocks aligned with the store's per-sample shards
            stop = min(start + block, total)
            pieces = []  # (sample shard, first row, end row) in the shard's own rows
            for k in range(n_k):
                lo, hi = max(start, offsets[k]), min(stop, offsets[k + 1])
                if lo < hi:
                    pieces.append((k, int(lo - offsets[k]), int(hi - offsets[k])))
            ids = [sample_id for k, lo, hi in pieces for sample_id in rows[k].ids[lo:hi]]
            n_tokens = np.concatenate([rows[k].n_tokens[lo:hi] for k, lo, hi in pieces])
            losses = np.concatenate([rows[k].losses[lo:hi] for k, lo, hi in pieces])
            per_sample = {
                name: torch.from_numpy(np.concatenate([grid[(k, p)].per_sample(name, lo, hi) for k, lo, hi in pieces]))
                for name, p in per_sample_owner.items()
            }
            gates = {
                name: torch.from_numpy(np.concatenate([grid[(k, p)].gate(name, lo, hi) for k, lo, hi in pieces]))
                for name, p in owner.items()
            }
            writer.append(ids, torch.from_numpy(n_tokens), torch.from_numpy(losses), per_sample, gates)
        for sample_id, reason in skipped:
            writer.skip(sample_id, reason)
        return writer.close(merged_statistics(grid))
    except BaseException:
        writer.abort()
        raise
