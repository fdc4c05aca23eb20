"""The two phase 1 engines: batched per-sample gradients from hooks, and the batch-1 reference loop.

Each stages one micro-batch into a `FisherAccumulator`: the forward pass (with the input
second moments recorded), the per-sample losses, the backward pass whose per-sample
gradients the accumulator folds, and the samples that must be dropped (non-finite loss or
gradient), with the statistics left as before the micro-batch when there are any.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accumulate import FisherAccumulator
from ..config import FisherConfig
from .hooks import PerSampleGradients, compute_dtype
from .inputs import InputMoments
from .loss import Batch, per_sample_loss, sample_labels, scored_positions


class Engine:
    """Stages one micro-batch into the accumulator; reports samples that must be dropped.

    Both engines run the forward pass under `InputMoments.recording` (the input second
    moments of the accumulator's `input_dims` layers) and hand the sums over once the
    micro-batch has begun.
    """

    def __init__(self, model: nn.Module, accumulator: FisherAccumulator, config: FisherConfig):
        self.model = model
        self.accumulator = accumulator
        self.config = config
        self.inputs = InputMoments(model, only=set(accumulator.input_dims))
        if self.inputs.dims != accumulator.input_dims:
            raise ValueError("the accumulator's input_dims are not the model's Linear / Conv1D weights "
                             "(engine.inputs.input_features)")

    def _targets(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.config.labels == "sampled":
            return sample_labels(logits, batch, self.config.seed)
        return batch.input_ids

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        with self.inputs.recording(scored_positions(batch.label_mask)):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                use_cache=False).logits
        return per_sample_loss(logits, self._targets(logits, batch), batch.label_mask)

    def _begin(self, batch_size: int, undo: list | None) -> None:
        """Begin the micro-batch in the accumulator and stage the forward's input sums."""
        self.accumulator.begin(batch_size, undo=undo)
        for name, (sums, positions) in self.inputs.sums.items():
            self.accumulator.add_inputs(name, sums, positions)

    def stage(self, batch: Batch) -> tuple[torch.Tensor, dict[int, str]]:
        """Forward/backward `batch` into the statistics; returns losses `[b]` and {row: reason}
        of bad samples. With bad samples, the statistics are left as before the call."""
        losses, bad = self._pass(batch)
        folded = self.accumulator.folded() if bad else []
        if folded:  # the same batch again, taking back exactly the chunks that were folded
            self._pass(batch, undo=folded)
        return losses, bad

    def _pass(self, batch: Batch, undo: list | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        raise NotImplementedError


class HookEngine(Engine):
    """Batched per-sample gradients from hooks."""

    def __init__(self, model: nn.Module, accumulator: FisherAccumulator, config: FisherConfig):
        super().__init__(model, accumulator, config)
        self.hooks = PerSampleGradients(model, accumulator.add, config.chunk_elements, only=set(accumulator.shapes))

    def _pass(self, batch: Batch, undo: list | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        with self.hooks:
            losses = self._forward_loss(batch)
            bad = {int(r): "non-finite loss" for r in torch.nonzero(~torch.isfinite(losses)).flatten()}
            if bad:
                self.hooks.finish()
                return losses.detach(), bad
            self._begin(len(batch.ids), undo)
            losses.sum().backward()
            self.hooks.finish()
        return losses.detach(), _gradient_failures(self.accumulator)


class LoopEngine(Engine):
    """The reference: batch-size-1 forward/backward per sample with plain autograd."""

    def _pass(self, batch: Batch, undo: list | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        if len(batch.ids) != 1:
            raise ValueError("the loop engine stages one sample at a time")
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad and n in self.accumulator.shapes}
        for p in params.values():
            p.grad = None
        loss = self._forward_loss(batch)
        if not torch.isfinite(loss).all():
            return loss.detach(), {0: "non-finite loss"}
        self._begin(1, undo)
        loss.sum().backward()
        for name, p in params.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            # a half-precision model's gradient, folded as float32 like the hooks engine's
            self.accumulator.add(name, 0, p.shape[0], grad[None].to(compute_dtype(grad.dtype), copy=True))
            p.grad = None
        return loss.detach(), _gradient_failures(self.accumulator)


def _gradient_failures(accumulator: FisherAccumulator) -> dict[int, str]:
    return {row: f"non-finite gradient in {name}" for row, name in accumulator.non_finite_samples().items()}
