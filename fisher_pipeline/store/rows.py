"""The per-sample rows of a store being written (`per_sample/`, `gate/`, `samples/`), written in
the background, whole shards as plain files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

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


def _in_memory_array(**settings: Any) -> zarr.Array:
    """An array made by zarr in memory: its metadata is a template for files we write ourselves."""
    return zarr.create_array(zarr.storage.MemoryStore(), **settings)


def _metadata_bytes(array: zarr.Array) -> bytes:
    """The `zarr.json` zarr writes for `array`."""
    return array.metadata.to_buffer_dict(zarr.core.buffer.default_buffer_prototype())["zarr.json"].to_bytes()
