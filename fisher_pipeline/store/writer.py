"""Writes one task's store in a staging directory and publishes it whole (`StoreWriter`)."""

from __future__ import annotations

import json
import os
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..atomic import Staging, disk_full_error
from ..layout import ModelGeometry
from .format import FORMAT_VERSION, GATE_DTYPE, LOSS_CONVENTION
from .integrity import write_manifest
from .rows import SampleArrays, SampleRows, _in_memory_array, _metadata_bytes


class StoreWriter:
    """Writes one task's store; `close()` completes it atomically.

    Args:
        path: final store path (`results/fisher/{task}.zarr`).
        attrs: metadata (model id, hashes, task, config...).
        geometry: layer, role and groups of every parameter, and the attention shape
            (from the architecture adapter); stored so phases never need the model.
        per_sample_names: parameters whose per-sample gradients are stored.
        per_sample_dtype: "float16" or "float32".
        max_samples: upper bound on N (arrays are trimmed on close).
        shard_samples: samples per shard file of per-sample arrays.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        attrs: dict[str, Any],
        geometry: ModelGeometry,
        per_sample_names: Iterable[str],
        per_sample_dtype: str,
        max_samples: int,
        shard_samples: int = 8,
        elementwise_fisher: bool = True,
    ):
        self.path = Path(path)
        # False: no `fisher/` arrays (a held-out store: the checks read its mean gradient and
        # per-sample gradients, and the analysed store's Fisher; 0.5 GB less per SmolLM2 store)
        self.elementwise_fisher = elementwise_fisher
        # Claims the path (another process writing it fails here, naming it), refuses a user's
        # file there, removes what interrupted runs left, and gives this writer its own staging.
        self.staging = Staging(self.path)
        self.partial = self.staging.path
        try:
            self._open(attrs, geometry, per_sample_names, per_sample_dtype, max_samples, shard_samples)
        except BaseException:
            self.staging.abort()
            raise

    def _open(self, attrs, geometry, per_sample_names, per_sample_dtype, max_samples, shard_samples) -> None:
        self.root = zarr.open_group(self.partial, mode="w")
        self.attrs = dict(attrs)
        self.geometry = geometry
        self.shapes = {name: geo.shape for name, geo in geometry.params.items()}
        shapes = self.shapes
        self.dtype = np.dtype(per_sample_dtype)
        self.per_sample = SampleArrays(self.root, self.partial,
                                       {name: (max_samples, *shapes[name]) for name in sorted(per_sample_names)},
                                       shard_samples, self.dtype)
        self.gates = SampleArrays(self.root, self.partial,
                                  {name: (max_samples, geo.n_groups) for name, geo in sorted(geometry.params.items())},
                                  shard_samples, GATE_DTYPE, group="gate")
        self.samples = SampleRows(self.per_sample, per_sample_dtype, self.partial, gates=self.gates)
        self.skipped: list[dict[str, str]] = []
        self.needed_bytes = self._needed_bytes(max_samples)

    def _needed_bytes(self, n_samples: int) -> int:
        """About how many bytes the complete store takes (for a disk-full message): the
        float32 statistics (two full-shape arrays per parameter, the Fisher and the mean
        gradient), the per-sample rows and gates of `n_samples` samples, and ~1 KB of
        metadata for each of the ~8 arrays per parameter."""
        elements = sum(int(np.prod(shape)) for shape in self.shapes.values())
        statistics = 4 * elements * (2 if self.elementwise_fisher else 1)
        rows = sum(int(np.prod(self.shapes[name])) for name in self.per_sample) * self.dtype.itemsize
        gates = sum(geo.n_groups for geo in self.geometry.params.values()) * GATE_DTYPE.itemsize
        return statistics + n_samples * (rows + gates) + 8 * 1024 * len(self.shapes)

    def append(self, ids: list[str], n_tokens: torch.Tensor, losses: torch.Tensor,
               per_sample: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor],
               lent: bool = False) -> None:
        """Record a committed micro-batch: sample ids `[b]`, token counts, losses, g_i, and
        the gates `[b, G]` of every parameter (see `SampleRows.append`)."""
        try:
            self.samples.append(ids, n_tokens, losses, per_sample, gates, lent)
        except BaseException as err:
            self._raise_disk_full(err)
            raise

    def _raise_disk_full(self, error: BaseException) -> None:
        """Raise a `DiskFullError` (path, free space, size needed) if `error` is a full disk."""
        full = disk_full_error(error, self.path, self.staging, self.needed_bytes)
        if full is not None:
            raise full from error

    def abort(self) -> None:
        """Give up: stop the background writer, remove the staging directory, release the path."""
        try:
            self.samples.abort()
        finally:
            self.staging.abort()

    def skip(self, sample_id: str, reason: str) -> None:
        """Record a sample left out of the statistics, and why."""
        self.skipped.append({"id": sample_id, "reason": reason})

    def _write_statistics(self, accumulator) -> None:
        """Every full-shape and group statistic as float32 (input second moments as float64),
        one array (one file) each.

        About 4 arrays per parameter (1,100 for SmolLM2). Created through zarr's API, each
        costs ~3 ms of its event-loop round trips, seconds per store; so zarr writes the
        metadata of one array per distinct shape (into memory), and each array's
        `zarr.json` (that metadata, verbatim) and its single uncompressed chunk (raw
        little-endian bytes, the `bytes` codec) are written as files by a few threads.
        Each thread converts its float64 state to float32 through one reused 4 MB buffer,
        a slice at a time, writing each slice while it is in cache: a fresh float32 copy
        per array would cost a page fault per 4 KB (three times the conversion itself),
        and no copy of the model's size is ever made. Uncompressed: zstd saved only 5-7%
        of these bytes for seconds of CPU per store.
        """
        for kind in ("fisher", "grad_mean", "group", "group_m2", "group_saliency", "group_saliency_m2"):
            if kind != "fisher" or self.elementwise_fisher:
                self.root.create_group(kind)
        if accumulator.input_dims:
            self.root.create_group("input_sq")
        templates = _MetadataTemplates()
        m2_group = threading.Lock()  # fisher_m2/ exists only where some parameter has M2
        local = threading.local()

        def write_array(key: str, source: torch.Tensor, divisor: int = 1, dtype: torch.dtype = torch.float32) -> None:
            buffers = local.__dict__.setdefault("buffers", {})
            if dtype not in buffers:
                buffers[dtype] = torch.empty(_STATISTICS_SLICE, dtype=dtype)
            folder = self.partial / key
            folder.mkdir()
            (folder / "zarr.json").write_bytes(templates.get(tuple(source.shape), str(dtype).split(".")[-1]))
            chunk = folder / "c"
            for _ in range(source.dim()):  # one mkdir each: file-system calls cost ~0.1-0.7 ms
                chunk.mkdir()
                chunk = chunk / "0"
            _write_converted(chunk, source, divisor, buffers[dtype])

        def write(name: str) -> None:
            # Looked up here, one parameter at a time: a merge of shards computes each on demand.
            fisher, group = accumulator.fisher[name], accumulator.group[name]
            if self.elementwise_fisher:
                write_array(f"fisher/{name}", fisher.total, max(fisher.count, 1))
            grad = accumulator.grad[name]
            write_array(f"grad_mean/{name}", grad.total, max(grad.count, 1))
            if fisher.m2 is not None:
                with m2_group:
                    if not (self.partial / "fisher_m2").exists():
                        self.root.create_group("fisher_m2")
                write_array(f"fisher_m2/{name}", fisher.m2)
            write_array(f"group/{name}", group.total, max(group.count, 1))
            write_array(f"group_m2/{name}", group.m2)
            saliency = accumulator.saliency[name]
            write_array(f"group_saliency/{name}", saliency.total, max(saliency.count, 1))
            write_array(f"group_saliency_m2/{name}", saliency.m2)
            if name in accumulator.input_dims:  # float64: a second moment that users renormalise
                inputs = accumulator.input_sq[name]
                write_array(f"input_sq/{name}", inputs.total, max(inputs.count, 1), torch.float64)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(write, self.shapes))

    def close(self, accumulator) -> Path:
        """Write the statistics, metadata and integrity record, then publish the store.

        On any failure the staging directory is removed (a full disk raises `DiskFullError`)
        and the path keeps what it held.
        """
        try:
            self._complete(accumulator)
        except BaseException as err:
            try:
                self._raise_disk_full(err)
                raise
            finally:
                self.abort()
        return self.staging.publish()  # the path holds the old or the new store, never neither

    def _complete(self, accumulator) -> None:
        n = self.samples.finish(self.root)
        self._write_statistics(accumulator)
        input_sq = {name: {"input_dim": int(dim), "tokens": int(accumulator.input_sq[name].count)}
                    for name, dim in sorted(accumulator.input_dims.items())}
        self.root.attrs.update({
            **self.attrs,
            "format_version": FORMAT_VERSION,
            "loss_convention": LOSS_CONVENTION,
            "n_samples": n,
            "per_sample_params": sorted(self.per_sample),
            "per_sample_dtype": str(self.dtype),
            "skipped": self.skipped,
            "geometry": self.geometry.to_attrs(),
            "input_sq": input_sq,
            "elementwise_fisher": self.elementwise_fisher,
        })
        consolidate(self.partial)
        write_manifest(self.partial)


def consolidate(path: Path) -> None:
    """Write zarr's consolidated metadata into the root `zarr.json` of the store at `path`.

    The same bytes as `zarr.consolidate_metadata(path)` (zarr-python's extension to v3,
    `tests/test_phase1.py` compares them), built from the ~1,200 `zarr.json` files with
    the json module: zarr's own call parses every node into its metadata classes through
    its event loop (~0.3-0.8 s per store). Every node's metadata, keyed by its path, goes
    in flat, sorted by depth then case-folded path; groups carry an empty
    `consolidated_metadata` of their own.
    """
    nodes = {}
    for file in path.rglob("zarr.json"):
        nodes[file.parent.relative_to(path).as_posix()] = json.loads(file.read_bytes())
    root = nodes.pop(".")
    order = sorted(nodes, key=lambda key: (key.count("/"), unicodedata.normalize("NFKC", key).casefold()))
    flat = {key: _consolidated_group(nodes[key], {}) if nodes[key]["node_type"] == "group" else nodes[key]
            for key in order}
    document = json.dumps(_consolidated_group(root, flat), indent=2, allow_nan=True)
    (path / "zarr.json").write_bytes(document.encode())


def _consolidated_group(group: dict, metadata: dict) -> dict:
    """A group's metadata with `consolidated_metadata` (listing `metadata`), in zarr's key order."""
    consolidated = {"kind": "inline", "must_understand": False, "metadata": metadata}
    out = {key: value for key, value in group.items() if key not in ("consolidated_metadata", "node_type")}
    return {**out, "consolidated_metadata": consolidated, "node_type": group["node_type"]}


class _MetadataTemplates:
    """`zarr.json` bytes of an uncompressed single-chunk array, per shape and dtype, made by zarr."""

    def __init__(self) -> None:
        self._made: dict[tuple[tuple[int, ...], str], bytes] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: str = "float32") -> bytes:
        with self._lock:
            if (shape, dtype) not in self._made:
                if not shape:
                    raise ValueError("statistics are at least 1-d")
                self._made[shape, dtype] = _metadata_bytes(_in_memory_array(
                    shape=shape, dtype=dtype, chunks=shape, compressors=None, fill_value=0))
            return self._made[shape, dtype]


#: float32 elements converted and written at a time by each statistics thread (4 MB).
_STATISTICS_SLICE = 1 << 20


def _write_converted(path: Path, source: torch.Tensor, divisor: int, buffer: torch.Tensor) -> None:
    """Write `source / divisor` as raw little-endian values of `buffer`'s dtype to `path`, a slice at a time.

    `source` is a float64 tensor on any device; `buffer` a reused float32 (or float64) CPU
    tensor. The quotient is computed in float64 and rounded once, as `(source / divisor).float()`.
    """
    flat = source.detach().reshape(-1)
    with open(path, "wb") as file:
        for start in range(0, flat.numel(), buffer.numel()):
            part = flat[start:start + buffer.numel()]
            out = buffer[:part.numel()]
            if part.device == out.device:
                torch.div(part, divisor, out=out)
            else:  # on the device in float64, then one transfer of the float32 result
                out.copy_(torch.div(part, divisor).to(buffer.dtype))
            file.write(out.numpy().data)
