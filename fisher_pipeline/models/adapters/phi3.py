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

from .base import ArchitectureAdapter, GroupSpec, TensorSlice


class Phi3Adapter(ArchitectureAdapter):
    model_types = ("phi3",)
    family = "Phi-3 (Phi-3, Phi-3.5-mini, Phi-4-mini)"

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def _block_start(self, block: str) -> int:
        """First qkv_proj row of block q, k or v."""
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[block]

    def head_slices(self, layer: int, block: str, head: int) -> list[TensorSlice]:
        attn = f"{self._prefix(layer)}.self_attn"
        d = self.head_dim
        if block == "o":
            return [TensorSlice(f"{attn}.o_proj.weight", 1, self._range(head * d, d))]
        owner = head if block == "q" else self.kv_head(head)
        rows = self._range(self._block_start(block) + owner * d, d)
        return self._row_slices(f"{attn}.qkv_proj", rows)

    def group_specs(self) -> dict[str, GroupSpec]:
        d = self.head_dim
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self._prefix(layer)}.self_attn"
            heads = {"q": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads}
            qkv = GroupSpec.blocks(0, [(f"{block}.h{h}", d) for block, count in heads.items() for h in range(count)])
            self._set_row_spec(specs, f"{attn}.qkv_proj", qkv)
            specs[f"{attn}.o_proj.weight"] = GroupSpec.blocks(1, [(f"o.h{h}", d) for h in range(self.n_heads)])
            mlp = f"{self._prefix(layer)}.mlp"
            width = self.params[f"{mlp}.down_proj.weight"].shape[1]
            per_neuron = [(f"neuron.{n}", 1) for n in range(width)]
            # Gate rows then up rows; a repeated name joins both rows of a neuron.
            specs[f"{mlp}.gate_up_proj.weight"] = GroupSpec.blocks(0, per_neuron + per_neuron)
            neurons = GroupSpec.blocks(1, per_neuron)
            specs[f"{mlp}.down_proj.weight"] = neurons
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn.o_proj
