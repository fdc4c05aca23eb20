"""Where heads and neurons sit inside parameters: the geometry phase 1 stores, model-free.

The architecture adapters (`models/adapters/`) are the only code that knows a family's
tensor layouts. They describe every parameter with a `ParamGeometry` — its layer, its
role (`q`, `k`, `v`, `o`, fused `qkv`, `mlp_in`, `mlp_out`, `embed`, `lm_head`, `norm`,
`other`) and its groups along one dimension — and the model's attention shape with an
`AttentionGeometry` (heads, KV heads, head_dim, the GQA map). Phase 1 writes both into
the store (`ModelGeometry.to_attrs`), so every later phase can split any stored tensor
into heads or neurons without loading the model.

Groups are described as `Segment`s: `count` consecutive groups of `size` positions each,
laid out one after the other along the group dimension. Every supported layout is a
short list of segments:

    Llama q_proj rows            [q 0..H-1 x d]
    GPT-2 c_attn columns         [q 0..H-1 x d] [k 0..H-1 x d] [v 0..H-1 x d]
    GPT-NeoX query_key_value     [q 0 x d] [k 0 x d] [v 0 x d] [q 1 x d] ... (per head)
    Phi-3 gate_up_proj rows      [neuron 0..I-1 x 1] [neuron 0..I-1 x 1] (rows n, I+n join)

A group is identified by (block, index): `("q", 3)` is query head 3, `("k", 1)` KV head
1, `("neuron", 17)`, `("all", 0)` a whole tensor. Index conventions: `N` samples, `H`
heads of a block, `d` head_dim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .roles import HEAD_BLOCKS, KV_BLOCKS, NAMED_SELECTIONS, ROLES  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class TensorSlice:
    """Positions of one parameter along one dimension (e.g. the rows of a head).

    Attributes:
        param: parameter name as in `model.named_parameters()`.
        dim: dimension of the parameter the positions index.
        index: sorted int64 positions along `dim`.
    """

    param: str
    dim: int
    index: torch.Tensor

    def take(self, tensor: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
        """Select this slice from `tensor` shaped `[*batch, *param_shape]`."""
        return tensor.index_select(self.dim + batch_dims, self.index.to(tensor.device))


@dataclass(frozen=True)
class Segment:
    """`count` consecutive groups `block.first` ... `block.(first+count-1)` of `size` positions each."""

    block: str
    first: int
    count: int
    size: int

    def to_list(self) -> list:
        return [self.block, self.first, self.count, self.size]


@dataclass(frozen=True)
class GroupSpec:
    """A partition of a parameter into groups (heads, neurons) along one dimension.

    Attributes:
        dim: dimension along which groups are laid out.
        segments: the groups in memory order along `dim` (a group met again joins its
            earlier positions, e.g. Phi-3's gate and up rows of one neuron).
    """

    dim: int
    segments: tuple[Segment, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> GroupSpec:
        """The single group `all` holding a whole tensor."""
        return cls(0, (Segment("all", 0, 1, shape[0] if len(shape) else 1),))

    @classmethod
    def heads(cls, dim: int, *blocks: tuple[str, int, int]) -> GroupSpec:
        """Blocks of heads one after the other: `(block, n_heads, head_dim)` each."""
        return cls(dim, tuple(Segment(block, 0, count, size) for block, count, size in blocks))

    @cached_property
    def _table(self) -> tuple[list[tuple[str, int]], np.ndarray]:
        groups: dict[tuple[str, int], int] = {}
        labels: list[np.ndarray] = []
        for seg in self.segments:
            ids = [groups.setdefault((seg.block, seg.first + j), len(groups)) for j in range(seg.count)]
            labels.append(np.repeat(np.asarray(ids, dtype=np.int64), seg.size))
        return list(groups), np.concatenate(labels) if labels else np.zeros(0, np.int64)

    @property
    def keys(self) -> list[tuple[str, int]]:
        """(block, index) of every group, in group order."""
        return self._table[0]

    @property
    def label_array(self) -> np.ndarray:
        """int64 `[shape[dim]]`: the group of each position along `dim`."""
        return self._table[1]

    @cached_property
    def labels(self) -> torch.Tensor:
        """`label_array` as a torch tensor."""
        return torch.from_numpy(self.label_array)

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Display names: `q.h0`, `k.h1`, `o.h3`, `neuron.17`, `all`."""
        return tuple(group_name(block, index) for block, index in self.keys)

    @property
    def blocks(self) -> list[str]:
        """Block of every group (`q`, `k`, `v`, `o`, `neuron`, `all`)."""
        return [block for block, _ in self.keys]

    @property
    def length(self) -> int:
        """Positions along `dim`."""
        return int(sum(seg.count * seg.size for seg in self.segments))

    def reduce(self, values: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
        """Sum `values` `[*batch, *param_shape]` within each group -> `[*batch, n_groups]`."""
        dim = self.dim + batch_dims
        other = [d for d in range(batch_dims, values.dim()) if d != dim]
        per_position = values.sum(dim=other) if other else values
        out = per_position.new_zeros(*values.shape[:batch_dims], len(self.keys))
        return out.index_add_(batch_dims, self.labels.to(values.device), per_position)

    def to_attrs(self) -> dict[str, Any]:
        return {"dim": self.dim, "segments": [seg.to_list() for seg in self.segments]}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> GroupSpec:
        segments = tuple(Segment(str(b), int(f), int(c), int(s)) for b, f, c, s in attrs["segments"])
        return cls(int(attrs["dim"]), segments)


def group_name(block: str, index: int) -> str:
    """The display name of group (block, index)."""
    if block in HEAD_BLOCKS:
        return f"{block}.h{index}"
    if block == "all":
        return "all"
    return f"{block}.{index}"


@dataclass(frozen=True)
class AttentionGeometry:
    """The attention shape of a model: the same in every layer.

    Attributes:
        n_layers: transformer blocks.
        n_heads: query heads `H` (also the heads of `o`).
        n_kv_heads: key/value heads `H_kv` (the heads of `k` and `v`).
        head_dim: `d`.
        gqa_map: `[H]`, the KV head each query head reads.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    gqa_map: tuple[int, ...]

    def n_heads_of(self, block: str) -> int:
        """Heads of block `block`: query heads for q and o, KV heads for k and v."""
        return self.n_kv_heads if block in KV_BLOCKS else self.n_heads

    def query_heads(self, kv_head: int) -> list[int]:
        """The query heads that read KV head `kv_head`."""
        return [h for h, kv in enumerate(self.gqa_map) if kv == kv_head]

    def to_attrs(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "gqa_map": list(self.gqa_map)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> AttentionGeometry:
        return cls(int(attrs["n_layers"]), int(attrs["n_heads"]), int(attrs["n_kv_heads"]),
                   int(attrs["head_dim"]), tuple(int(h) for h in attrs["gqa_map"]))


@dataclass(frozen=True)
class ParamGeometry:
    """One parameter: its shape, layer, role and groups.

    Attributes:
        param: parameter name.
        shape: the parameter's shape.
        layer: transformer block index, None outside the blocks (embeddings, final norm).
        role: one of `ROLES`.
        groups: its partition into heads / neurons (one `all` group if it has none).
    """

    param: str
    shape: tuple[int, ...]
    layer: int | None
    role: str
    groups: GroupSpec

    @property
    def n_groups(self) -> int:
        return len(self.groups.keys)

    @cached_property
    def sizes(self) -> np.ndarray:
        """int64 `[G]`: parameter elements in each group."""
        other = int(np.prod(self.shape)) // (self.shape[self.groups.dim] if self.shape else 1)
        return np.bincount(self.groups.label_array, minlength=self.n_groups).astype(np.int64) * other

    def head_blocks(self) -> list[str]:
        """The head blocks (q, k, v, o) this parameter holds heads of, in group order."""
        return list(dict.fromkeys(b for b in self.groups.blocks if b in HEAD_BLOCKS))

    def positions(self, block: str) -> np.ndarray:
        """`[n, size]` positions along the group dim of every group of `block`, by index.

        Raises:
            KeyError: the parameter has no group of block `block`.
        """
        keys = self.groups.keys
        ids = sorted((index, gid) for gid, (b, index) in enumerate(keys) if b == block)
        if not ids:
            raise KeyError(f"{self.param} has no {block!r} groups (it holds {sorted(set(self.groups.blocks))})")
        labels = self.groups.label_array
        rows = [np.flatnonzero(labels == gid) for _, gid in ids]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"{self.param}: the {block!r} groups differ in size; they cannot be stacked")
        return np.stack(rows)

    def split_heads(self, values: np.ndarray | Any, block: str, batch_dims: int = 0,
                    samples: slice | np.ndarray | None = None) -> np.ndarray:
        """The heads of `block` in `values` as one stacked array: one read, one reshape.

        `values` is the parameter (`[*shape]`, `batch_dims=0`) or a stack of per-sample
        tensors (`[N, *shape]`, `batch_dims=1`); a numpy array or a lazy zarr array,
        which is then read once, for exactly the head positions.

        Returns:
            `[*batch, H, *shape']` where `shape'` is `shape` with the group dim narrowed to
            the head size, i.e. `"n ... (h d) ... -> n h ... d ..."`. Head `h` of block k
            or v is KV head `h`.
        """
        positions = self.positions(block)  # [H, d]
        n_heads, size = positions.shape
        dim = batch_dims + self.groups.dim
        flat = positions.ravel()
        start = int(flat[0])
        if np.array_equal(flat, np.arange(start, start + flat.size)):  # contiguous: a plain slice read
            index: Any = slice(start, start + flat.size)
        else:
            index = flat
        selection: list[Any] = [slice(None)] * (batch_dims + len(self.shape))
        selection[dim] = index
        if samples is not None:
            selection[0] = samples
        data = _read(values, tuple(selection))
        split = data.reshape(*data.shape[:dim], n_heads, size, *data.shape[dim + 1:])
        return np.moveaxis(split, dim, batch_dims)  # "n ... h d ... -> n h ... d ..."

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum `values` (the parameter's full shape) within each group -> `[G]` float64."""
        along_dim = np.moveaxis(np.atleast_1d(values), self.groups.dim, 0)
        per_position = along_dim.reshape(along_dim.shape[0], -1).sum(1, dtype=np.float64)
        return np.bincount(self.groups.label_array, weights=per_position, minlength=self.n_groups)

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast one value per group `[G]` to the parameter's full shape (read-only view)."""
        per_position = np.asarray(per_group)[self.groups.label_array]
        if not self.shape:
            return per_position.reshape(())
        view = [1] * len(self.shape)
        view[self.groups.dim] = self.shape[self.groups.dim]
        return np.broadcast_to(per_position.reshape(view), self.shape)

    def to_attrs(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "layer": self.layer, "role": self.role, **self.groups.to_attrs()}

    @classmethod
    def from_attrs(cls, param: str, attrs: Mapping[str, Any]) -> ParamGeometry:
        layer = attrs["layer"]
        return cls(param, tuple(int(s) for s in attrs["shape"]), None if layer is None else int(layer),
                   str(attrs["role"]), GroupSpec.from_attrs(attrs))


@dataclass(frozen=True)
class ModelGeometry:
    """Every parameter's geometry and the attention shape: what phase 1 stores.

    Attributes:
        attention: heads, KV heads, head_dim, GQA map.
        params: parameter name -> geometry, for every trainable parameter.
    """

    attention: AttentionGeometry
    params: dict[str, ParamGeometry] = field(default_factory=dict)

    def __getitem__(self, param: str) -> ParamGeometry:
        try:
            return self.params[param]
        except KeyError:
            raise KeyError(f"no parameter {param!r} in this geometry; e.g. {examples(self.params)}") from None

    def head_params(self, layer: int, block: str) -> list[str]:
        """Parameters of `layer` that hold heads of `block` (weights and biases), by name."""
        return sorted(name for name, geo in self.params.items()
                      if geo.layer == layer and block in geo.head_blocks())

    def select(self, selection: str, layers: Sequence[int] | None = None, *, what: str = "selection",
               layers_what: str = "layers") -> list[str]:
        """Parameters chosen by a named selection or a regex, optionally in some layers only.

        Args:
            selection: a key of `NAMED_SELECTIONS` (`attention`, `mlp`, `all`, `none`), or a
                regex searched in parameter names (`""` selects nothing).
            layers: layer indices (negative counts from the last layer); None = all layers
                (and parameters outside layers); a list keeps only parameters in those layers.
            what, layers_what: the config keys of `selection` and `layers`, for error messages.

        Raises:
            ConfigError: a layer is out of range, or a selection that should select
                something matches no parameter.
        """
        n_layers = self.attention.n_layers
        wanted: set[int] | None = None
        if layers is not None:
            bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
            if bad:
                raise ConfigError(f"{layers_what} = {list(layers)}: layer(s) {bad} out of range; the model has "
                                  f"{n_layers} layers (0..{n_layers - 1}; negative counts from the last, -1)")
            wanted = {layer % n_layers for layer in layers}
        if selection in NAMED_SELECTIONS:
            roles = NAMED_SELECTIONS[selection]
            chosen = [n for n, g in self.params.items() if roles is None or g.role in roles]
        else:
            regex = re.compile(selection) if selection else None
            chosen = [n for n in self.params if regex is not None and regex.search(n)]
        if wanted is not None:
            chosen = [n for n in chosen if self.params[n].layer in wanted]
        if not chosen and selection not in ("none", ""):
            where = "" if layers is None else f" in layers {list(layers)}"
            raise ConfigError(
                f"{what} = {selection!r}{where} matches no parameter of this model. Use a named selection "
                f"({', '.join(NAMED_SELECTIONS)}) or a regex matching names such as {examples(self.params)}"
            )
        return sorted(chosen)

    def to_attrs(self) -> dict[str, Any]:
        return {"attention": self.attention.to_attrs(),
                "params": {name: geo.to_attrs() for name, geo in sorted(self.params.items())}}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ModelGeometry:
        return cls(AttentionGeometry.from_attrs(attrs["attention"]),
                   {name: ParamGeometry.from_attrs(name, geo) for name, geo in attrs["params"].items()})


def examples(names: Iterable[str], count: int = 4) -> str:
    names = sorted(names)
    picks = [names[int(i)] for i in np.linspace(0, len(names) - 1, min(count, len(names)))] if names else []
    return ", ".join(dict.fromkeys(picks))


def _read(values: Any, selection: tuple) -> np.ndarray:
    """`values[selection]` for numpy arrays, torch tensors and lazy zarr arrays (one read)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        out = values[tuple(s if isinstance(s, slice) else slice(None) for s in selection)]
        for axis, index in enumerate(selection):
            if not isinstance(index, slice):
                out = np.take(out, np.asarray(index), axis=axis)
        return out
    if any(not isinstance(s, slice) for s in selection):
        return values.get_orthogonal_selection(selection)  # zarr: reads only the chunks touched
    return values[selection]
