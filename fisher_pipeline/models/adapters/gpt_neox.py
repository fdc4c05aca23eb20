"""GPT-NeoX family (Pythia, GPT-NeoX-20B): fused query_key_value interleaved per head.

`nn.Linear` weights `[out, in]`. GPTNeoXAttention views the fused projection output
as `[..., H, 3 * d]` and chunks the last axis into q, k, v, so the `3D` rows of
attention.query_key_value weight `[3D, D]` (and its bias `[3D]`) are laid out
`[H, 3, d]`: head h owns the row block `h*3d : (h+1)*3d`, whose first `d` rows are
its q, next `d` its k, last `d` its v. There is no GQA (every head has its own k, v).
  attention.dense `[D, D]`: head h owns columns `h*d : (h+1)*d` (bias shared, whole);
  mlp.dense_h_to_4h `[I, D]` + bias `[I]`: neuron n is row / entry n;
  mlp.dense_4h_to_h `[D, I]`: neuron n is column n.
Partial rotary (rotary_pct / partial_rotary_factor) changes only what happens to q
and k inside a head, not which rows belong to it.
"""

from __future__ import annotations

from torch import nn

from ...layout import Segment
from .base import ArchitectureAdapter, GroupSpec


class GPTNeoXAdapter(ArchitectureAdapter):
    model_types = ("gpt_neox",)
    family = "GPT-NeoX (Pythia, GPT-NeoX-20B)"
    module_roles = {"attention.query_key_value": "qkv", "attention.dense": "o",
                    "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out"}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # GPTNeoXAttention uses hidden_size // heads whatever else the config says.
        self.n_kv_heads = self.n_heads
        self.head_dim = self.config.hidden_size // self.n_heads

    def layer_prefix(self, layer: int) -> str:
        return f"gpt_neox.layers.{layer}"

    def group_specs(self) -> dict[str, GroupSpec]:
        d = self.head_dim
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self.layer_prefix(layer)}.attention"
            # Row blocks in memory order: q.h0, k.h0, v.h0, q.h1, ...
            interleaved = tuple(Segment(block, h, 1, d) for h in range(self.n_heads) for block in ("q", "k", "v"))
            self._set_row_spec(specs, f"{attn}.query_key_value", GroupSpec(0, interleaved))
            specs[f"{attn}.dense.weight"] = GroupSpec.heads(1, ("o", self.n_heads, d))
            mlp = f"{self.layer_prefix(layer)}.mlp"
            width = self.params[f"{mlp}.dense_4h_to_h.weight"].shape[1]
            self._set_row_spec(specs, f"{mlp}.dense_h_to_4h", GroupSpec.heads(0, ("neuron", width, 1)))
            specs[f"{mlp}.dense_4h_to_h.weight"] = GroupSpec.heads(1, ("neuron", width, 1))
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].attention.dense
