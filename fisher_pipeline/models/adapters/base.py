"""What every architecture adapter tells the rest of the code: the model's geometry.

Adapters are the only code that knows tensor layouts. A family adapter says, in a few
lines, how each layer's parameters split into heads and neurons (`group_specs`, as
`layout.GroupSpec` segments) and what each module is for (`module_roles`); this base
class turns that into the model-free `layout.ModelGeometry` that phase 1 stores, and
derives head slices from it, so there is one source of truth per family.

Index conventions: `H` query heads, `H_kv` key/value heads, `d` head_dim. Under
grouped-query attention query head `h` reads KV head `h // (H // H_kv)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ...errors import UnsupportedArchitectureError
from ...layout import AttentionGeometry, GroupSpec, ModelGeometry, ParamGeometry, TensorSlice
from ...roles import KV_BLOCKS


class ArchitectureAdapter(ABC):
    """Layout knowledge of one architecture family."""

    #: `config.model_type` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]]
    #: Family name and example checkpoints, for docs and error messages.
    family: ClassVar[str]
    #: Module path inside a layer -> role of its weight and bias (see `layout.ROLES`).
    module_roles: ClassVar[dict[str, str]]

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.n_layers: int = self.config.num_hidden_layers
        self.n_heads: int = self.config.num_attention_heads
        self.n_kv_heads: int = getattr(self.config, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedArchitectureError(
                f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads "
                f"({type(model).__name__}): the GQA map is undefined"
            )
        self.params = dict(model.named_parameters(remove_duplicate=False))

    # --- what a family adapter provides --------------------------------------------
    @abstractmethod
    def layer_prefix(self, layer: int) -> str:
        """Name prefix of the parameters of transformer block `layer` (e.g. `model.layers.3`)."""

    @abstractmethod
    def group_specs(self) -> dict[str, GroupSpec]:
        """Group partition of every parameter that has heads or neurons."""

    @abstractmethod
    def o_proj_module(self, layer: int) -> nn.Module:
        """The output projection of `layer`; its input is `[..., H * d]`, head-major."""

    # --- derived ---------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """Positions the model was trained for (`max_position_embeddings`), if the config says."""
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value else None

    def kv_head(self, head: int) -> int:
        """KV head read by query head `head` (GQA map)."""
        return head // (self.n_heads // self.n_kv_heads)

    def attention_geometry(self) -> AttentionGeometry:
        return AttentionGeometry(self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim,
                                 tuple(self.kv_head(h) for h in range(self.n_heads)))

    def geometry(self) -> ModelGeometry:
        """Layer, role and groups of every trainable parameter (tied weights once)."""
        if not hasattr(self, "_geometry"):
            specs = self.group_specs()
            params: dict[str, ParamGeometry] = {}
            for name, param in self.model.named_parameters():
                if not param.requires_grad:
                    continue
                shape = tuple(param.shape)
                layer, role = self._place(name)
                params[name] = ParamGeometry(name, shape, layer, role, specs.get(name) or GroupSpec.whole(shape))
            self._geometry = ModelGeometry(self.attention_geometry(), params)
        return self._geometry

    def group_spec(self, name: str, shape: tuple[int, ...]) -> GroupSpec:
        """Group partition of parameter `name` (whole tensor if it has no heads/neurons)."""
        geometry = self.geometry().params.get(name)
        return geometry.groups if geometry is not None else GroupSpec.whole(shape)

    def head_slices(self, layer: int, block: str, head: int) -> list[TensorSlice]:
        """Positions of block `block` in {q,k,v,o} of query head `head` in `layer`.

        For k and v the slice is that of the KV head `kv_head(head)`. Biases are
        included where the model has them (o has none per head: its bias is shared).
        """
        owner = self.kv_head(head) if block in KV_BLOCKS else head
        geometry = self.geometry()
        return [TensorSlice(name, geometry[name].groups.dim, torch.from_numpy(geometry[name].positions(block)[owner]))
                for name in geometry.head_params(layer, block)]

    def _place(self, name: str) -> tuple[int | None, str]:
        """Layer and role of parameter `name`."""
        module_path = name.rpartition(".")[0]
        module = self.model.get_submodule(module_path)
        for layer in range(self.n_layers):
            prefix = self.layer_prefix(layer) + "."
            if name.startswith(prefix):
                relative = module_path[len(prefix):]
                return layer, self.module_roles.get(relative) or _generic_role(module)
        if module is self.model.get_output_embeddings():
            return None, "lm_head"
        return None, _generic_role(module)

    # --- helpers for family adapters ------------------------------------------------
    def _set_row_spec(self, specs: dict[str, GroupSpec], module: str, spec: GroupSpec) -> None:
        """Give `module`'s weight and (when present) bias the row partition `spec`."""
        for kind in ("weight", "bias"):
            if f"{module}.{kind}" in self.params:
                specs[f"{module}.{kind}"] = spec


def _generic_role(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embed"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "other"
