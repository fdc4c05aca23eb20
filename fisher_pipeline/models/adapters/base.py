"""What every architecture adapter tells the rest of the code: heads, head slices, groups.

Adapters are the only code that knows tensor layouts. Everything else asks them:

* `head_slices(layer, block, head)` -> the exact positions of Q/K/V/O head `head` in
  the parameters (weights and biases), as `TensorSlice`s along one dimension each;
* `group_specs()` -> how each parameter splits into named groups (heads, neurons) for
  group-reduced Fisher; parameters not listed form one whole-tensor group.

Index conventions: `H` query heads, `H_kv` key/value heads, `d` head_dim. Under
grouped-query attention query head `h` reads KV head `h // (H // H_kv)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

BLOCKS = ("q", "k", "v", "o")


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
class GroupSpec:
    """A partition of a parameter into named groups along one dimension.

    Attributes:
        dim: dimension along which groups are laid out.
        labels: int64 `[shape[dim]]`, the group of each position along `dim`.
        names: group names, `labels` indexes them (e.g. `"q.h0"`, `"neuron.17"`).
    """

    dim: int
    labels: torch.Tensor
    names: tuple[str, ...]

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> "GroupSpec":
        """The single group holding a whole tensor."""
        return cls(dim=0, labels=torch.zeros(shape[0] if shape else 1, dtype=torch.long), names=("all",))

    @classmethod
    def blocks(cls, dim: int, parts: list[tuple[str, int]]) -> "GroupSpec":
        """Consecutive blocks along `dim`: `parts` lists (group name, block length) in order.

        A name may appear several times (its blocks join one group).
        """
        ids: dict[str, int] = {}
        labels: list[int] = []
        for name, length in parts:
            labels.extend([ids.setdefault(name, len(ids))] * length)
        return cls(dim=dim, labels=torch.tensor(labels, dtype=torch.long), names=tuple(ids))

    def reduce(self, values: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
        """Sum `values` `[*batch, *param_shape]` within each group -> `[*batch, n_groups]`."""
        dim = self.dim + batch_dims
        other = [d for d in range(batch_dims, values.dim()) if d != dim]
        per_position = values.sum(dim=other) if other else values
        out = per_position.new_zeros(*values.shape[:batch_dims], len(self.names))
        return out.index_add_(batch_dims, self.labels.to(values.device), per_position)


class ArchitectureAdapter(ABC):
    """Layout knowledge of one architecture family."""

    #: `config.model_type` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]]
    #: Family name and example checkpoints, for docs and error messages.
    family: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.n_layers: int = self.config.num_hidden_layers
        self.n_heads: int = self.config.num_attention_heads
        self.n_kv_heads: int = getattr(self.config, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads")
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def kv_head(self, head: int) -> int:
        """KV head read by query head `head` (GQA map)."""
        return head // (self.n_heads // self.n_kv_heads)

    def _range(self, start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, dtype=torch.long)

    def _row_slices(self, module: str, rows: torch.Tensor) -> list[TensorSlice]:
        """`rows` of `module`'s weight and, when it has one, of its bias (Linear layout)."""
        return [TensorSlice(f"{module}.{kind}", 0, rows) for kind in ("weight", "bias")
                if f"{module}.{kind}" in self.params]

    def _set_row_spec(self, specs: dict[str, "GroupSpec"], module: str, spec: "GroupSpec") -> None:
        """Give `module`'s weight and (when present) bias the row partition `spec`."""
        for kind in ("weight", "bias"):
            if f"{module}.{kind}" in self.params:
                specs[f"{module}.{kind}"] = spec

    @abstractmethod
    def head_slices(self, layer: int, block: str, head: int) -> list[TensorSlice]:
        """Positions of block `block` in {q,k,v,o} of query head `head` in `layer`.

        For k and v the slice is that of the KV head `kv_head(head)`. Biases are
        included where the model has them (o has none per head: its bias is shared).
        """

    @abstractmethod
    def group_specs(self) -> dict[str, GroupSpec]:
        """Group partition of every parameter that has heads or neurons."""

    @abstractmethod
    def o_proj_module(self, layer: int) -> nn.Module:
        """The output projection of `layer`; its input is `[..., H * d]`, head-major."""

    def group_spec(self, name: str, shape: tuple[int, ...]) -> GroupSpec:
        """Group partition of parameter `name` (whole tensor if it has no heads/neurons)."""
        return self._group_specs_cached().get(name) or GroupSpec.whole(shape)

    def _group_specs_cached(self) -> dict[str, GroupSpec]:
        if not hasattr(self, "_specs"):
            self._specs = self.group_specs()
        return self._specs
