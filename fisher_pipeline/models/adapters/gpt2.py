"""GPT-2 family (GPT-2, DistilGPT2): fused Conv1D attention, no GQA.

`Conv1D` stores weights `[in, out]`, transposed against `nn.Linear`, so output
features are COLUMNS:
  attn.c_attn weight `[D, 3D]`, bias `[3D]`: columns are Q, then K, then V (each `D`
    wide), heads contiguous within each: head h's q columns are `h*d : (h+1)*d`,
    its k columns `D + h*d ...`, its v columns `2D + h*d ...`;
  attn.c_proj weight `[D, D]`: head h's input features are ROWS `h*d : (h+1)*d`
    (its bias `[D]` is shared by all heads and stays whole);
  mlp.c_fc weight `[D, I]` + bias `[I]`: neuron n is column / bias entry n;
  mlp.c_proj weight `[I, D]`: neuron n is row n.
Config fields n_layer / n_head / n_embd reach the base class as num_hidden_layers /
num_attention_heads / hidden_size through GPT2Config.attribute_map; there are no KV
heads apart from the query heads and head_dim is always n_embd // n_head.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, GroupSpec


class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    family = "GPT-2 (gpt2, distilgpt2)"
    module_roles = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # GPT2Attention derives head_dim from the width and ignores any other field.
        self.n_kv_heads = self.n_heads
        self.head_dim = self.config.hidden_size // self.n_heads

    def layer_prefix(self, layer: int) -> str:
        return f"transformer.h.{layer}"

    def group_specs(self) -> dict[str, GroupSpec]:
        d, h = self.head_dim, self.n_heads
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self.layer_prefix(layer)}.attn"
            # Weight: output features are dim 1 (columns); bias: dim 0 of the same features.
            specs[f"{attn}.c_attn.weight"] = GroupSpec.heads(1, ("q", h, d), ("k", h, d), ("v", h, d))
            specs[f"{attn}.c_attn.bias"] = GroupSpec.heads(0, ("q", h, d), ("k", h, d), ("v", h, d))
            specs[f"{attn}.c_proj.weight"] = GroupSpec.heads(0, ("o", h, d))
            mlp = f"{self.layer_prefix(layer)}.mlp"
            width = self.params[f"{mlp}.c_proj.weight"].shape[0]
            specs[f"{mlp}.c_fc.weight"] = GroupSpec.heads(1, ("neuron", width, 1))
            specs[f"{mlp}.c_fc.bias"] = GroupSpec.heads(0, ("neuron", width, 1))
            specs[f"{mlp}.c_proj.weight"] = GroupSpec.heads(0, ("neuron", width, 1))
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].attn.c_proj
