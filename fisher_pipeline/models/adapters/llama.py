"""Llama family: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms).

Separate projections, `nn.Linear` weights `[out, in]`:
  q_proj `[H * d, D]`, k_proj / v_proj `[H_kv * d, D]`: head h owns rows `h*d : (h+1)*d`;
  o_proj `[D, H * d]`: head h owns columns `h*d : (h+1)*d`;
  MLP gate_proj / up_proj `[I, D]` rows and down_proj `[D, I]` columns are per neuron.
Qwen3's q_norm / k_norm `[d]` are shared by all heads and stay whole tensors.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, GroupSpec, TensorSlice


class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "Llama (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen2.5, Qwen3)"

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def head_slices(self, layer: int, block: str, head: int) -> list[TensorSlice]:
        attn = f"{self._prefix(layer)}.self_attn"
        d = self.head_dim
        if block == "o":
            return [TensorSlice(f"{attn}.o_proj.weight", 1, self._range(head * d, d))]
        owner = head if block == "q" else self.kv_head(head)
        rows = self._range(owner * d, d)
        return self._row_slices(f"{attn}.{block}_proj", rows)

    def group_specs(self) -> dict[str, GroupSpec]:
        d = self.head_dim
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self._prefix(layer)}.self_attn"
            heads = {"q": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads}
            for block, count in heads.items():
                spec = GroupSpec.blocks(0, [(f"{block}.h{h}", d) for h in range(count)])
                self._set_row_spec(specs, f"{attn}.{block}_proj", spec)
            specs[f"{attn}.o_proj.weight"] = GroupSpec.blocks(1, [(f"o.h{h}", d) for h in range(self.n_heads)])
            mlp = f"{self._prefix(layer)}.mlp"
            width = self.params[f"{mlp}.down_proj.weight"].shape[1]
            neurons = GroupSpec.blocks(0, [(f"neuron.{n}", 1) for n in range(width)])
            for name in ("gate_proj", "up_proj"):
                specs[f"{mlp}.{name}.weight"] = neurons
            specs[f"{mlp}.down_proj.weight"] = GroupSpec(1, neurons.labels, neurons.names)
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn.o_proj
