"""Second moments of linear layers' inputs over the scored positions (Wanda's `||X_j||^2`).

For the weight `W` of an `nn.Linear` (`[o, i]`) or HF `Conv1D` (`[i, o]`) used by that one
module only, the forward hook sums `x_t,j^2` per input feature `j` over the token
positions `t` whose prediction enters the loss (`loss.scored_positions`): per sample in
the input's dtype (float32 at least), then over the samples in float64. A tied weight
(an LM head sharing the embedding table) is left out: its other use has no such input.

Index letters: `b` sample, `t` position, `i` input feature.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def input_features(model: nn.Module, only: set[str] | None = None) -> dict[str, int]:
    """Weights of Linear / Conv1D layers that no other module uses -> the weight dim indexing inputs.

    Args:
        model: the model.
        only: keep these parameter names only (default: every one).

    Returns:
        parameter name (as in `model.named_parameters()`) -> 1 for Linear, 0 for Conv1D.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    owners = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    dims = {}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        name = names.get(id(module.weight))
        if name is None or owners[id(module.weight)] != 1 or (only is not None and name not in only):
            continue
        dims[name] = 1 if isinstance(module, nn.Linear) else 0
    return dict(sorted(dims.items()))


class InputMoments:
    """Per forward pass, `sum_{b, scored t} x_b,t,i^2` `[i]` (float64) and the scored positions,
    for each weight of `input_features(model, only)`.

    Args:
        model: the model.
        only: parameters to cover (default every Linear / Conv1D weight used by one module).
    """

    def __init__(self, model: nn.Module, only: set[str] | None = None):
        self.model = model
        self.dims = input_features(model, only)
        by_id = {id(p): n for n, p in model.named_parameters() if n in self.dims}
        self._modules = [(module, by_id[id(module.weight)]) for module in model.modules()
                         if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) in by_id]
        #: after a `recording` forward: name -> (float64 `[i]` sums, scored positions)
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}

    @contextmanager
    def recording(self, scored: torch.Tensor):
        """Hooks the layers for one forward pass whose scored positions are `scored` (bool `[b, t]`).

        `sums` is emptied on entry and filled by the forward.
        """
        self.sums = {}
        n_scored = int(scored.sum())
        weights = scored.unsqueeze(-1)  # [b, t, 1]
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # q, k, v read one input: square it once

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                x = args[0]
                if x.shape[:-1] != scored.shape:
                    raise RuntimeError(
                        f"{name}: its layer's input has shape {tuple(x.shape)}, not [batch, positions, features] "
                        f"= [{', '.join(map(str, scored.shape))}, ...]: its input second moments (Wanda) cannot be "
                        "attributed to token positions")
                cached = seen.get(id(x))
                if cached is None or cached[0] is not x:
                    squares = torch.where(weights, x.detach(), 0).float().square_()
                    cached = (x, squares.sum(1).double().sum(0))  # float32 within a sample, float64 across
                    seen[id(x)] = cached
                total, count = self.sums.get(name, (None, 0))
                self.sums[name] = (cached[1] if total is None else total + cached[1], count + n_scored)
            return hook

        handles = [module.register_forward_hook(hook_for(name)) for module, name in self._modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
