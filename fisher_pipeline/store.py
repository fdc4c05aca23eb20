"""The phase 1 store (zarr v3): writer with atomic completion, and the lazy reader.

Layout (a contract; README "Store layout" documents it for users):

    {task}.zarr            attrs: format_version, model_id, weights_hash, task,
                                  n_samples, loss_convention, fisher_kind, config_hash,
                                  package_version, per_sample_params, skipped, ...,
                                  geometry (layer, role, groups of every parameter and
                                  the attention shape: see `layout.ModelGeometry`)
      samples/id, samples/n_tokens, samples/loss          [N]
      fisher/<param>       mean of g^2, full shape, float32
      grad_mean/<param>    mean of g, full shape, float32
      group/<param>        sum of fisher within each group (head / neuron), [G] float32,
                           groups in the order of the geometry's segments
      group_m2/<param>     Welford M2 of each sample's group-reduced contribution, [G]
      fisher_m2/<param>    elementwise Welford M2 of g^2 (selected parameters), float32
      per_sample/<param>   g_i, [N, *shape], chunk (1, *shape), sharded by samples
      gate/<param>         gate_i,G = sum_{k in G} g_i,k w_k per sample and group, [N, G]
                           float32, rows in samples/id order, chunked like per_sample
      group_saliency/<param>     mean over samples of s_i,G = 0.5 sum_{k in G} g_i,k^2 w_k^2, [G]
      group_saliency_m2/<param>  its Welford M2, [G]
      input_sq/<param>     mean over scored token positions of x_j^2 at the layer's input,
                           [in_features] float64 (Linear / Conv1D weights used by one module;
                           attrs `input_sq`: {param: {input_dim, tokens}})

The store is written under `<path>.partial` and renamed to `<path>` only once every
array and attribute is in place: an interrupted run never leaves a finished-looking
store, and a rerun starts the partial store afresh.
"""

from __future__ import annotations

import json
import os
import threading
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .atomic import clean_stale, publish, remove_path
from .errors import StoreContentError, StoreFormatError, StoreMismatchError
from .layout import GroupSpec, ModelGeometry, TensorSlice

#: 2: head geometry in the attrs (`geometry`), `group_labels/` and group attrs gone.
#: 3: per-sample gates (`gate/`), group saliencies and input second moments (`input_sq/`).
FORMAT_VERSION = 3
#: Versions the reader opens: a version 2 store lacks only the arrays version 3 added,
#: and their readers say so.
READABLE_VERSIONS = (2, 3)
#: dtype of the stored per-sample gates: sums of float32 products, float32 keeps all of
#: their precision at half float64's disk and bandwidth.
GATE_DTYPE = np.dtype("float32")
LOSS_CONVENTION = "token_sum"


def partial_path(path: str | os.PathLike) -> Path:
    """Where a store is written before it is complete (then published by `atomic.publish`)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _remove(path: Path) -> None:
    remove_path(path)


_UINT64_MAX = 2**64 - 1


def _direct_shard_rows(array: zarr.Array) -> int:
    """Rows per shard if `array`'s shards can be written as plain files (0 if not): one row
    per inner chunk, raw little-endian bytes, the index at the end with a crc32c."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return 0
    sharding = codecs[0]
    little = BytesCodec(endian="little")
    plain = (sharding.codecs == (little,) and sharding.index_codecs == (little, Crc32cCodec())
             and sharding.index_location.value == "end" and array.dtype.byteorder in ("<", "=", "|")
             and tuple(sharding.chunk_shape) == (1, *array.shape[1:])
             and array.metadata.chunk_key_encoding.to_dict()
             == {"name": "default", "configuration": {"separator": "/"}})
    return int(array.metadata.chunk_grid.chunk_shape[0]) if plain else 0


def _write_shard(folder: Path, index: int, rows: np.ndarray, shard_rows: int) -> None:
    """Write shard `index` of a per-sample array: `rows` `[r <= shard_rows, ...]` then the index."""
    import google_crc32c

    rows = np.ascontiguousarray(rows)
    row_bytes = rows[0].nbytes if len(rows) else 0
    table = np.full((shard_rows, 2), _UINT64_MAX, dtype="<u8")  # (offset, length) per row; MAX: absent
    table[:len(rows), 0] = np.arange(len(rows), dtype=np.uint64) * np.uint64(row_bytes)
    table[:len(rows), 1] = row_bytes
    index_bytes = table.tobytes()
    checksum = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    path = folder.joinpath("c", str(index), *["0"] * (rows.ndim - 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(memoryview(rows).cast("B"))
        file.write(index_bytes + checksum)


class SampleArrays(Mapping[str, zarr.Array]):
    """The per-sample arrays (`per_sample/` or `gate/`) of a store being written, each opened
    by zarr only when used.

    Their `zarr.json` files are written from one template per shape, made by zarr in
    memory: created through zarr's API each array costs ~3 ms of event-loop round trips
    (0.3-0.5 s per store), and the direct shard writes never need the array objects. A
    write that straddles shards, or a resize, opens the array through zarr.

    Args:
        root: the store's root group (the arrays' parent's parent).
        folder: the store's folder.
        shapes: parameter name -> `[rows, *param_shape]`.
        shard_samples: rows per shard file; each row is one inner chunk.
        dtype: the arrays' dtype.
        group: the arrays' group in the store.
    """

    def __init__(self, root: zarr.Group, folder: Path, shapes: dict[str, tuple[int, ...]], shard_samples: int,
                 dtype: np.dtype, group: str = "per_sample"):
        self.root = root
        self.group = group
        if shapes:  # no empty group in a store without per-sample arrays
            root.require_group(self.group)
        self.layouts: dict[str, zarr.Array] = {}  # in-memory arrays with each shape's metadata
        made: dict[tuple[int, ...], zarr.Array] = {}
        for name, shape in shapes.items():
            if shape not in made:
                made[shape] = _in_memory_array(
                    shape=shape, chunks=(1, *shape[1:]), shards=(max(shard_samples, 1), *shape[1:]), dtype=dtype,
                    compressors=None,  # gradients barely compress (5-9%); not worth the time
                    fill_value=0)
            self.layouts[name] = made[shape]
            array_folder = folder / self.group / name
            array_folder.mkdir()
            (array_folder / "zarr.json").write_bytes(_metadata_bytes(made[shape]))
        self._opened: dict[str, zarr.Array] = {}

    def __getitem__(self, name: str) -> zarr.Array:
        if name not in self._opened:
            self.layouts[name]  # KeyError for a name that is not here
            self._opened[name] = self.root[f"{self.group}/{name}"]
        return self._opened[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)


class SampleRows:
    """The samples of a store being written: ids, token counts, losses, per-sample rows and gates.

    Rows are written by a background thread, at most one micro-batch in flight, so that
    zarr's encoding and the disk overlap the next micro-batch's compute.

    A micro-batch that fills one whole shard (rows `[k B, (k + 1) B)`, the usual case) is
    written as the shard file itself: the rows' bytes as they are, then zarr's shard index
    (offset and length of each row, then its crc32c), in one `write` from the caller's
    buffer. Through zarr's API the same write encodes each row and assembles the shard in
    fresh memory, which costs time and, by the allocator's fragmentation, memory that grew
    with N. Any other write goes through zarr. `tests/test_phase1.py` checks the files
    byte for byte against zarr's.

    Args:
        arrays: parameter name -> its `per_sample/` array, rows = samples in order.
        dtype: "float16" or "float32", the arrays' dtype.
        folder: the store's folder (None: every write goes through zarr).
        gates: parameter name -> its `gate/` array (`GATE_DTYPE`), rows = samples in order;
            every `append` must then give each its gates.
    """

    def __init__(self, arrays: Mapping[str, zarr.Array], dtype: str, folder: Path | None = None,
                 gates: Mapping[str, zarr.Array] | None = None):
        self.arrays = arrays
        self.gates = gates if gates is not None else {}
        #: "group/name" of every array -> its array mapping and name there
        self._members = {f"{group}/{name}": (mapping, name)
                         for group, mapping in (("per_sample", arrays), ("gate", self.gates)) for name in mapping}
        #: where each array's files are, and its rows per shard when its shards can be written
        #: as plain files (0: only through zarr)
        self.folders = {key: folder / key for key in self._members} if folder is not None else {}
        self.shard_rows, self._rows = {}, {}
        for key, (mapping, name) in self._members.items():
            layout = (mapping.layouts if isinstance(mapping, SampleArrays) else mapping)[name]  # without opening it
            self.shard_rows[key] = _direct_shard_rows(layout) if folder is not None else 0
            self._rows[key] = layout.shape[0]
        self.torch_dtype = getattr(torch, dtype)
        self.ids: list[str] = []
        self.n_tokens: list[int] = []
        self.losses: list[float] = []
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def append(self, ids: list[str], n_tokens: torch.Tensor, losses: torch.Tensor,
               per_sample: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor] | None = None,
               lent: bool = False) -> None:
        """Record a micro-batch: sample ids `[b]`, token counts, losses, g_i `[b, *shape]`,
        gates `[b, G]` (any float dtype, any device).

        By default the rows are copied in the stored dtype at once (the caller may reuse
        its buffers). With `lent=True` the caller promises per-sample CPU tensors in the
        stored dtype, unchanged until the *next* `append` returns (phase 1's accumulator
        alternates two buffer sets), and no copy is made of them (gates are always copied).
        """
        if self.gates and gates is None:
            raise ValueError("this store keeps per-sample gates: append needs each micro-batch's gates")
        start = len(self.ids)
        rows = {}
        for name in self.arrays:
            tensor = per_sample[name].detach()
            if lent and tensor.device.type == "cpu" and tensor.dtype == self.torch_dtype:
                rows[f"per_sample/{name}"] = tensor.numpy()
            else:  # torch converts to float16 several times faster than numpy
                rows[f"per_sample/{name}"] = tensor.to("cpu", self.torch_dtype, copy=True).numpy()
        for name in self.gates:
            rows[f"gate/{name}"] = gates[name].detach().to("cpu", torch.float32, copy=True).numpy()
        self._wait()
        self._pending = self._writer.submit(self._write_rows, start, rows)
        self.ids.extend(ids)
        self.n_tokens.extend(int(n) for n in n_tokens.tolist())
        self.losses.extend(float(x) for x in losses.tolist())

    def _write_rows(self, start: int, rows: dict[str, np.ndarray]) -> None:
        for key, data in rows.items():
            shard = self.shard_rows[key]
            if shard and start % shard == 0 and len(data) <= shard:
                _write_shard(self.folders[key], start // shard, data, shard)
            else:  # a micro-batch that straddles shards (after a skipped sample): zarr merges
                mapping, name = self._members[key]
                mapping[name][start:start + len(data)] = data

    def _wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def abort(self) -> None:
        """Stop the background writer (its error, if any, matters less than the caller's)."""
        try:
            self._wait()
        except Exception:
            pass
        self._writer.shutdown()

    def finish(self, root: zarr.Group) -> int:
        """Wait for the last rows, trim the arrays, write `samples/`; return N."""
        self._wait()
        self._writer.shutdown()
        n = len(self.ids)
        for key, rows in self._rows.items():
            if rows != n:  # fewer samples than planned (skipped, or a short task)
                mapping, name = self._members[key]
                array = mapping[name]
                array.resize((n, *array.shape[1:]))
        ids = root.create_array("samples/id", shape=(n,), dtype=str)  # variable-length UTF-8
        ids[:] = np.array(self.ids, dtype=object)
        root.create_array("samples/n_tokens", data=np.array(self.n_tokens, dtype=np.int32))
        root.create_array("samples/loss", data=np.array(self.losses, dtype=np.float32))
        return n


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
        self.partial = partial_path(path)
        clean_stale(self.path)  # old copies and staging left by interrupted runs
        _remove(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
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

    def append(self, ids: list[str], n_tokens: torch.Tensor, losses: torch.Tensor,
               per_sample: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor],
               lent: bool = False) -> None:
        """Record a committed micro-batch: sample ids `[b]`, token counts, losses, g_i, and
        the gates `[b, G]` of every parameter (see `SampleRows.append`)."""
        self.samples.append(ids, n_tokens, losses, per_sample, gates, lent)

    def abort(self) -> None:
        """Give up: stop the background writer and remove the partial store."""
        self.samples.abort()
        _remove(self.partial)

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
        """Write the statistics and metadata, then rename the store into place."""
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
        publish(self.partial, self.path)  # the path holds the old or the new store, never neither
        return self.path




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


def _in_memory_array(**settings: Any) -> zarr.Array:
    """An array made by zarr in memory: its metadata is a template for files we write ourselves."""
    return zarr.create_array(zarr.storage.MemoryStore(), **settings)


def _metadata_bytes(array: zarr.Array) -> bytes:
    """The `zarr.json` zarr writes for `array`."""
    return array.metadata.to_buffer_dict(zarr.core.buffer.default_buffer_prototype())["zarr.json"].to_bytes()


class FisherStore:
    """Lazy reader of one task's store; arrays are read only when asked for.

    Attributes:
        attrs: the store's metadata.
        sample_ids: sample ids in store order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an interrupted run left a .partial store: rerun phase 1)" if partial_path(path).exists() else ""
            raise StoreFormatError(f"no Fisher store at {self.path}{hint}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.root = zarr.open_consolidated(self.path, mode="r")
        except Exception as err:
            raise StoreFormatError(f"{self.path} is not a Fisher store ({err})") from None
        self.attrs = dict(self.root.attrs)
        version = self.attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreFormatError(
                f"{self.path} has store format version {version!r}; this fisher_pipeline reads "
                f"version {FORMAT_VERSION} (and version 2, which lacks the gates, group saliencies and input "
                "second moments). Rerun phase 1 to rewrite it."
            )
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
        if f"fisher/{name}" in self.root and self.attrs.get("format_version") != FORMAT_VERSION:
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


def _standard_error(m2: np.ndarray, n: int) -> np.ndarray:
    if n < 2:
        return np.full_like(m2, np.nan)
    return np.sqrt(m2 / (n - 1) / n)


def open_store(path: str | os.PathLike, *, weights_hash: str | None = None,
               config_hash: str | None = None, task: str | None = None) -> FisherStore:
    """Open a complete Fisher store lazily, optionally checking what it was made from."""
    return FisherStore(path).check(weights_hash=weights_hash, config_hash=config_hash, task=task)
