"""Per-sample parameter gradients of one layer type, from its input and output gradient.

Written once per layer type and wired by `RULES` (BackPACK-style) and `NAMED_RULES`. Index letters:
`b` sample, `s` position (all non-batch, non-feature dims flattened), `o` output
feature, `i` input feature, `r` a range of parameter rows.

Each rule returns, per parameter of the module, a `RowGrad`: an object that writes the
per-sample gradient `[b, r, *param_shape[1:]]` of any row range on demand into a
caller's buffer, so that huge parameters (the vocabulary matrix) are materialised a
few rows at a time and no large tensor is allocated per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D


class RowGrad(Protocol):
    """Per-sample gradient of one parameter from one use of it, by row ranges."""

    #: Whether `rows` is dense; sparse uses are cheaper to add into a dense result.
    dense: bool

    def write(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write per-sample gradient rows `start:stop` into `out` `[b, stop - start, *shape[1:]]`."""

    def add_to(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Add per-sample gradient rows `start:stop` to `out`, in place."""


def _flat(t: torch.Tensor) -> torch.Tensor:
    """`[b, ..., f]` -> `[b, s, f]`."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


@dataclass
class OuterProductGrad:
    """Gradient `sum_s left[b, s, r] * right[b, s, :]` (Linear: left = grad_out, right = input)."""

    left: torch.Tensor  # [b, s, rows]
    right: torch.Tensor  # [b, s, cols]
    dense = True

    def write(self, out: torch.Tensor, start: int, stop: int) -> None:
        torch.bmm(self.left[:, :, start:stop].transpose(1, 2), self.right, out=out)  # [b, r, cols]

    def add_to(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.baddbmm_(self.left[:, :, start:stop].transpose(1, 2), self.right)


@dataclass
class SummedGrad:
    """Gradient `sum_s values[b, s, r]` (biases, norm weights)."""

    values: torch.Tensor  # [b, s, rows]
    dense = True

    def write(self, out: torch.Tensor, start: int, stop: int) -> None:
        torch.sum(self.values[:, :, start:stop], 1, out=out)  # [b, r]

    def add_to(self, out: torch.Tensor, start: int, stop: int) -> None:
        out += self.values[:, :, start:stop].sum(1)


@dataclass
class EmbeddingGrad:
    """Gradient of an embedding table: row `v` of sample `b` sums grad_out where ids == v."""

    ids: torch.Tensor  # [b, s] int64
    grad_out: torch.Tensor  # [b, s, f]
    padding_idx: int | None
    dense = False

    def write(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.zero_()
        self.add_to(out, start, stop)

    def add_to(self, out: torch.Tensor, start: int, stop: int) -> None:
        n_rows = stop - start
        hit = (self.ids >= start) & (self.ids < stop)
        if self.padding_idx is not None:  # nn.Embedding never updates its padding row
            hit &= self.ids != self.padding_idx
        sample = torch.arange(out.shape[0], device=self.ids.device)[:, None].expand_as(self.ids)
        flat_row = (sample * n_rows + self.ids - start)[hit]
        out.view(-1, out.shape[-1]).index_add_(0, flat_row, self.grad_out[hit])


def linear_rule(module: nn.Linear, inputs: torch.Tensor, grad_out: torch.Tensor) -> dict[str, RowGrad]:
    """`y = x W^T + b`, W `[o, i]`: per-sample `dW = go^T x` (`bso,bsi->boi`)."""
    go = _flat(grad_out)
    grads: dict[str, RowGrad] = {"weight": OuterProductGrad(go, _flat(inputs))}
    if module.bias is not None:
        grads["bias"] = SummedGrad(go)
    return grads


def conv1d_rule(module: Conv1D, inputs: torch.Tensor, grad_out: torch.Tensor) -> dict[str, RowGrad]:
    """HF `Conv1D`: `y = x W + b`, W `[i, o]` (transposed Linear): per-sample `dW = x^T go`."""
    go = _flat(grad_out)
    grads: dict[str, RowGrad] = {"weight": OuterProductGrad(_flat(inputs), go)}
    if module.bias is not None:
        grads["bias"] = SummedGrad(go)
    return grads


def embedding_rule(module: nn.Embedding, inputs: torch.Tensor, grad_out: torch.Tensor) -> dict[str, RowGrad]:
    """Lookup table `[V, f]`: per-sample gradient is sparse in rows (the sample's tokens)."""
    ids = inputs.reshape(inputs.shape[0], -1)
    return {"weight": EmbeddingGrad(ids, _flat(grad_out), module.padding_idx)}


def affine_norm_rule(module: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor) -> dict[str, RowGrad]:
    """Norms computing `y = w * n(x) (+ b)` (LayerNorm, RMSNorm variants): `dw = sum_s go * n(x)`.

    `n(x)` is recomputed by the module itself with unit weight and zero bias, so any
    variant of the normalisation (epsilon placement, float32 upcast) is matched exactly.
    """
    # unit weight and zero bias in the input's dtype: a half-precision model's inputs reach the
    # rules in float32 (`hooks.compute_dtype`), and LayerNorm wants one dtype throughout
    overrides = {"weight": torch.ones_like(module.weight, dtype=inputs.dtype)}
    if getattr(module, "bias", None) is not None:
        overrides["bias"] = torch.zeros_like(module.bias, dtype=inputs.dtype)
    with torch.no_grad():
        normalized = functional_call(module, overrides, (inputs,))
    go = _flat(grad_out)
    grads: dict[str, RowGrad] = {"weight": SummedGrad(go * _flat(normalized))}
    if "bias" in overrides:
        grads["bias"] = SummedGrad(go)
    return grads


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, RowGrad]]


#: Layer type -> its per-sample rule (BackPACK-style); subclasses take their base's rule.
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_rule,
    Conv1D: conv1d_rule,
    nn.Embedding: embedding_rule,
    nn.LayerNorm: affine_norm_rule,
}
#: Each family defines its own RMSNorm class (LlamaRMSNorm, Qwen2RMSNorm, ...): matched by name.
NAMED_RULES: dict[str, Rule] = {"RMSNorm": affine_norm_rule}


def rule_for(module: nn.Module) -> Rule | None:
    """The per-sample rule of `module`'s layer type (`RULES`, then `NAMED_RULES` by class-name
    suffix), or None if it has none. Norms count only with an elementwise affine weight."""
    rule = next((RULES[cls] for cls in type(module).__mro__ if cls in RULES), None)
    if rule is None:
        rule = next((r for suffix, r in NAMED_RULES.items() if type(module).__name__.endswith(suffix)), None)
    if rule is affine_norm_rule and not (getattr(module, "weight", None) is not None and module.weight.dim() == 1):
        return None
    return rule
