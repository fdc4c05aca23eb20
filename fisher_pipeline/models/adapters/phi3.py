"""Phi-3 family (Phi-3, Phi-3.5, Phi-4-mini): fused qkv_proj and gate_up_proj.

`nn.Linear` weights `[out, in]`, no biases:
  self_attn.qkv_proj `[(H + 2 H_kv) d, D]`: rows are the `H*d` Q rows, then the
    `H_kv*d` K rows, then the `H_kv*d` V rows, heads contiguous in each block;
    query head h owns q rows `h*d ...`, its KV head j = h // (H / H_kv) owns k rows
    `H*d + j*d ...` and v rows `(H + H_kv)*d + j*d ...`;
  self_attn.o_proj `[D, H * d]`: head h owns columns `h*d : (h+1)*d`;
  mlp.gate_up_proj `[2I, D]`: Phi3MLP chunks its output in two, first the I gate
    rows, then the I up rows, so neuron n owns rows n and I + n (one group);
  mlp.down_proj `[D, I]`: neuron n is column n.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, GroupSpec


class Phi3Adapter(ArchitectureAdapter):
    model_types = ("phi3",)
    family = "Phi-3 (Phi-3, Phi-3.5-mini, Phi-4-mini)"
    module_roles = {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
                    "mlp.gate_up_proj": "mlp_in", "mlp.down_proj": "mlp_out"}

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def group_specs(self) -> dict[str, GroupSpec]:
        d, h, h_kv = self.head_dim, self.n_heads, self.n_kv_heads
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self.layer_prefix(layer)}.self_attn"
            qkv = GroupSpec.heads(0, ("q", h, d), ("k", h_kv, d), ("v", h_kv, d))
            self._set_row_spec(specs, f"{attn}.qkv_proj", qkv)
            specs[f"{attn}.o_proj.weight"] = GroupSpec.heads(1, ("o", h, d))
            mlp = f"{self.layer_prefix(layer)}.mlp"
            width = self.params[f"{mlp}.down_proj.weight"].shape[1]
            # Gate rows then up rows; neuron n meets twice, so rows n and I + n join one group.
            specs[f"{mlp}.gate_up_proj.weight"] = GroupSpec.heads(0, ("neuron", width, 1), ("neuron", width, 1))
            specs[f"{mlp}.down_proj.weight"] = GroupSpec.heads(1, ("neuron", width, 1))
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn.o_proj
