"""Writing one shard's partial store (`ShardWriter`); its layout is in the package docstring."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..atomic import Staging, disk_full_error
from ..layout import ModelGeometry
from ..store import GATE_DTYPE, SampleArrays, SampleRows
from ..store.integrity import write_manifest
from ..welford import Welford

#: 2: gates, group saliencies and input second moments.
#: 3: `integrity.json` (`store.integrity`), checked when the shard is read.
SHARD_FORMAT_VERSION = 3


#: Welford states of a partial store: kind -> (total array group, M2 array group or None).
STATE_ARRAYS = {"fisher": ("fisher_total", "fisher_m2"), "grad": ("grad_total", None),
                "group": ("group_total", "group_m2"), "saliency": ("saliency_total", "saliency_m2")}


#: The input second moments' sums (their count is the token positions, in the attrs).
INPUT_SQ_ARRAY = "input_sq_total"


@dataclass(frozen=True)
class ShardInfo:
    """Where one job sits in the K x P grid of a task."""

    sample_shard: int
    sample_shards: int
    param_shard: int
    param_shards: int
    sample_start: int
    sample_stop: int
    task_samples: int
    params: tuple[str, ...]

    def to_attrs(self) -> dict[str, Any]:
        return {"sample_shard": self.sample_shard, "sample_shards": self.sample_shards,
                "param_shard": self.param_shard, "param_shards": self.param_shards,
                "sample_start": self.sample_start, "sample_stop": self.sample_stop,
                "task_samples": self.task_samples, "params": list(self.params)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ShardInfo:
        return cls(*(int(attrs[key]) for key in ("sample_shard", "sample_shards", "param_shard", "param_shards",
                                                   "sample_start", "sample_stop", "task_samples")),
                   tuple(str(p) for p in attrs["params"]))

    @property
    def label(self) -> str:
        return (f"sample shard {self.sample_shard} of {self.sample_shards}, parameter share "
                f"{self.param_shard} of {self.param_shards}")


class ShardWriter:
    """Writes one shard's partial store; `close()` completes it atomically.

    Args:
        path: the partial store's path.
        store_attrs: the attrs the merged store will get (model id, hashes, task, ...).
        geometry: the whole model's geometry.
        shard: the job's place in the grid and its parameter share.
        per_sample_names: parameters of the share whose per-sample gradients are stored.
        per_sample_dtype: "float16" or "float32".
        shard_samples: per-sample shard size of the merged store (`fisher.batch_size`).
    """

    def __init__(self, path: str | os.PathLike, store_attrs: Mapping[str, Any], geometry: ModelGeometry,
                 shard: ShardInfo, per_sample_names: Iterable[str], per_sample_dtype: str, shard_samples: int):
        self.path = Path(path)
        self.staging = Staging(self.path)  # claims the path, refuses a user's file, cleans leftovers
        self.partial = self.staging.path
        try:
            self._open(store_attrs, geometry, shard, per_sample_names, per_sample_dtype, shard_samples)
        except BaseException:
            self.staging.abort()
            raise

    def _open(self, store_attrs, geometry, shard, per_sample_names, per_sample_dtype, shard_samples) -> None:
        self.root = zarr.open_group(self.partial, mode="w")
        self.store_attrs = dict(store_attrs)
        self.geometry = geometry
        self.shard = shard
        self.shard_samples = shard_samples
        self.dtype = np.dtype(per_sample_dtype)
        rows = shard.sample_stop - shard.sample_start
        shapes = {name: (rows, *geometry.params[name].shape) for name in sorted(per_sample_names)}
        self.per_sample = SampleArrays(self.root, self.partial, shapes, shard_samples, self.dtype)
        self.gates = SampleArrays(self.root, self.partial,
                                  {name: (rows, geometry.params[name].n_groups) for name in shard.params},
                                  shard_samples, GATE_DTYPE, group="gate")
        self.samples = SampleRows(self.per_sample, per_sample_dtype, self.partial, gates=self.gates)

    def append(self, ids: list[str], n_tokens: torch.Tensor, losses: torch.Tensor,
               per_sample: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor]) -> None:
        """Record a committed micro-batch (the caller's tensors are copied at once)."""
        try:
            self.samples.append(ids, n_tokens, losses, dict(per_sample), gates)
        except BaseException as err:
            full = disk_full_error(err, self.path, self.staging)
            if full is not None:
                raise full from err
            raise

    def abort(self) -> None:
        """Give up: stop the background writer, remove the staging directory, release the path."""
        try:
            self.samples.abort()
        finally:
            self.staging.abort()

    def close(self, accumulator, skipped: Sequence[tuple[str, str]]) -> Path:
        """Write the float64 Welford states of the share, the samples and the attrs; publish.

        Args:
            accumulator: exposes `.fisher`, `.grad`, `.group`, `.saliency`, `.input_sq`
                (name -> `Welford`), `.input_dims` and `.count`.
            skipped: (sample id, reason) of the samples left out, in task order.

        On any failure the staging directory is removed and the path keeps what it held.
        """
        try:
            self._complete(accumulator, skipped)
        except BaseException as err:
            full = disk_full_error(err, self.path, self.staging)
            self.abort()
            if full is not None:
                raise full from err
            raise
        return self.staging.publish()

    def _complete(self, accumulator, skipped: Sequence[tuple[str, str]]) -> None:
        n = self.samples.finish(self.root)
        if n != accumulator.count:
            raise RuntimeError(f"{n} samples were written but {accumulator.count} folded into the statistics")
        arrays: list[tuple[str, np.ndarray]] = []
        for name in self.shard.params:
            for kind, (total_key, m2_key) in STATE_ARRAYS.items():
                state: Welford = getattr(accumulator, kind)[name]
                if state.count != n:
                    raise RuntimeError(f"{kind} state of {name} holds {state.count} samples, not {n}")
                arrays.append((f"{total_key}/{name}", _float64(state.total)))
                if m2_key is not None and state.m2 is not None:
                    arrays.append((f"{m2_key}/{name}", _float64(state.m2)))
        input_sq = {}
        for name, dim in sorted(accumulator.input_dims.items()):
            state = accumulator.input_sq[name]
            arrays.append((f"{INPUT_SQ_ARRAY}/{name}", _float64(state.total)))
            input_sq[name] = {"input_dim": int(dim), "tokens": int(state.count)}
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda item: self.root.create_array(
                item[0], data=item[1], compressors=None, chunks=item[1].shape or (1,)), arrays))
        self.root.attrs.update({
            "shard_format_version": SHARD_FORMAT_VERSION,
            "shard": self.shard.to_attrs(),
            "store_attrs": self.store_attrs,
            "geometry": self.geometry.to_attrs(),
            "per_sample_params": sorted(self.per_sample),
            "per_sample_dtype": str(self.dtype),
            "shard_samples": self.shard_samples,
            "count": n,
            "skipped": [{"id": sample_id, "reason": reason} for sample_id, reason in skipped],
            "input_sq": input_sq,
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(self.partial)
        write_manifest(self.partial)


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
