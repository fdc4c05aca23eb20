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

from .base import ArchitectureAdapter, GroupSpec, TensorSlice

_QKV_OFFSET = {"q": 0, "k": 1, "v": 2}


class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    family = "GPT-2 (gpt2, distilgpt2)"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # GPT2Attention derives head_dim from the width and ignores any other field.
        self.n_kv_heads = self.n_heads
        self.head_dim = self.config.hidden_size // self.n_heads

    def _prefix(self, layer: int) -> str:
        return f"transformer.h.{layer}"

    def head_slices(self, layer: int, block: str, head: int) -> list[TensorSlice]:
        attn = f"{self._prefix(layer)}.attn"
        d, width = self.head_dim, self.n_heads * self.head_dim
        if block == "o":
            return [TensorSlice(f"{attn}.c_proj.weight", 0, self._range(head * d, d))]
        columns = self._range(_QKV_OFFSET[block] * width + head * d, d)
        # Weight: output features are dim 1 (columns); bias: dim 0 of the same features.
        return [
            TensorSlice(f"{attn}.c_attn.weight", 1, columns),
            TensorSlice(f"{attn}.c_attn.bias", 0, columns),
        ]

    def group_specs(self) -> dict[str, GroupSpec]:
        d = self.head_dim
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self._prefix(layer)}.attn"
            qkv = [(f"{block}.h{h}", d) for block in ("q", "k", "v") for h in range(self.n_heads)]
            qkv_columns = GroupSpec.blocks(1, qkv)
            specs[f"{attn}.c_attn.weight"] = qkv_columns
            specs[f"{attn}.c_attn.bias"] = GroupSpec(0, qkv_columns.labels, qkv_columns.names)
            specs[f"{attn}.c_proj.weight"] = GroupSpec.blocks(0, [(f"o.h{h}", d) for h in range(self.n_heads)])
            mlp = f"{self._prefix(layer)}.mlp"
            width = self.params[f"{mlp}.c_proj.weight"].shape[0]
            neurons = GroupSpec.blocks(1, [(f"neuron.{n}", 1) for n in range(width)])
            specs[f"{mlp}.c_fc.weight"] = neurons
            specs[f"{mlp}.c_fc.bias"] = GroupSpec(0, neurons.labels, neurons.names)
            specs[f"{mlp}.c_proj.weight"] = GroupSpec(0, neurons.labels, neurons.names)
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].attn.c_proj
