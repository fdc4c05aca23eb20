"""Llama family: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms).

Separate projections, `nn.Linear` weights `[out, in]`:
  q_proj `[H * d, D]`, k_proj / v_proj `[H_kv * d, D]`: head h owns rows `h*d : (h+1)*d`;
  o_proj `[D, H * d]`: head h owns columns `h*d : (h+1)*d`;
  MLP gate_proj / up_proj `[I, D]` rows and down_proj `[D, I]` columns are per neuron.
Qwen3's q_norm / k_norm `[d]` are shared by all heads and stay whole tensors.
"""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, GroupSpec


class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "Llama (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen2.5, Qwen3)"
    module_roles = {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
        "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "mlp_out",
    }

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def group_specs(self) -> dict[str, GroupSpec]:
        d = self.head_dim
        specs: dict[str, GroupSpec] = {}
        for layer in range(self.n_layers):
            attn = f"{self.layer_prefix(layer)}.self_attn"
            heads = {"q": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads}
            for block, count in heads.items():
                self._set_row_spec(specs, f"{attn}.{block}_proj", GroupSpec.heads(0, (block, count, d)))
            specs[f"{attn}.o_proj.weight"] = GroupSpec.heads(1, ("o", self.n_heads, d))
            mlp = f"{self.layer_prefix(layer)}.mlp"
            width = self.params[f"{mlp}.down_proj.weight"].shape[1]
            for name in ("gate_proj", "up_proj"):
                self._set_row_spec(specs, f"{mlp}.{name}", GroupSpec.heads(0, ("neuron", width, 1)))
            specs[f"{mlp}.down_proj.weight"] = GroupSpec.heads(1, ("neuron", width, 1))
        return specs

    def o_proj_module(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn.o_proj
