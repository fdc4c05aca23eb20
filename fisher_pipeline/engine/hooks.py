"""Batched per-sample gradients of every parameter from module hooks.

While the context is active, parameters do not require grad: autograd computes only
gradients with respect to activations (as much work as the input-gradient half of an
ordinary backward), and the hooks compute per-sample parameter gradients instead of
the batch-summed ones autograd would have made (the same number of flops). Each
parameter's per-sample gradient is handed to a sink in row chunks as soon as all its
uses in the forward pass have reported, so at most one parameter's micro-batch of
per-sample tensors is alive at a time -- except for tied parameters (embedding + LM
head), whose first use is held until the last arrives, because `g_i` of a tied
weight is the sum over its uses and must be formed before squaring.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from ..scratch import Scratch
from .layers import RowGrad, rule_for

#: sink(param_name, row_start, row_stop, per_sample_rows `[b, r, *shape[1:]]`).
Sink = Callable[[str, int, int, torch.Tensor], None]

#: Model dtypes whose per-sample products are computed in float32 instead (8 or 11
#: significant bits would round each product, and the sum over positions, to ~0.4% / 0.05%).
HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample gradients of parameters of `dtype` are computed and handed out in:
    float32 for a half-precision model, the model's own otherwise (float32, float64)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


class UnsupportedLayerError(TypeError):
    """A trainable parameter lives in a layer type with no per-sample rule."""


class PerSampleGradients:
    """Context manager: hooks `model` so each backward feeds per-sample gradients to `sink`.

    The chunk handed to `sink` is a view of a reused buffer: valid only during the call
    (the sink may modify it in place). For a bfloat16 / float16 model the layer inputs and
    output gradients are upcast to float32 (one layer at a time) and the chunks are float32
    (`compute_dtype`): the model runs in half precision, the per-sample products do not.

    Args:
        model: the model; its trainable parameters all need a per-sample rule.
        sink: called once per (parameter, row chunk) during backward / `finish()`.
        chunk_elements: at most this many per-sample elements (`b * rows * cols`) are
            materialised per chunk; bounds memory for vocabulary-sized tables.
        only: compute per-sample gradients of these parameters only (default: every
            trainable one); the backward still runs through the whole model.
    """

    def __init__(self, model: nn.Module, sink: Sink, chunk_elements: int = 1 << 21,
                 only: set[str] | None = None):
        self.model = model
        self.sink = sink
        self.chunk_elements = chunk_elements
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if only is not None:
            unknown = sorted(set(only) - set(trainable))
            if unknown:
                raise KeyError(f"no trainable parameter named {unknown[0]!r} in {type(model).__name__}")
            trainable = {n: p for n, p in trainable.items() if n in only}
        self.frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in trainable]
        self.names = {id(p): n for n, p in trainable.items()}
        self.params = trainable
        self._hooked: list[tuple[nn.Module, Callable]] = []
        covered: set[str] = set()
        for module in model.modules():
            rule = rule_for(module)
            own = [id(p) for p in module.parameters(recurse=False) if id(p) in self.names]
            if rule is not None and own:
                self._hooked.append((module, rule))
                covered.update(self.names[i] for i in own)
        missing = sorted(set(self.params) - covered)
        if missing:
            owners = {type(m).__name__ for m in model.modules() for n, p in m.named_parameters(recurse=False)
                      if self.names.get(id(p)) in missing}
            raise UnsupportedLayerError(
                f"no per-sample gradient rule for layer type(s) {', '.join(sorted(owners))} holding "
                f"{len(missing)} trainable parameter(s), e.g. {missing[0]}; supported: Linear, Conv1D, "
                "Embedding, LayerNorm, *RMSNorm (weight * normalised input). Freeze them "
                "(requires_grad=False) or add a rule in fisher_pipeline/engine/layers.py."
            )
        self._handles: list = []
        # One reused buffer for every chunk: fresh multi-MB tensors per chunk would be
        # fresh pages from the OS each time (page faults cost as much as the math).
        self._workspace = Scratch()
        self._reset()

    def _reset(self) -> None:
        self._expected: dict[str, int] = defaultdict(int)
        self._uses: dict[str, list[RowGrad]] = defaultdict(list)
        self._batch_size = 0
        self._model_batch = 0

    def __enter__(self) -> PerSampleGradients:
        for param in [*self.params.values(), *self.frozen]:
            param.requires_grad_(False)
        self._handles.append(self.model.register_forward_pre_hook(self._record_batch_size, with_kwargs=True))
        for module, rule in self._hooked:
            self._handles.append(module.register_forward_hook(self._forward_hook(rule)))
        return self

    def _record_batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is not None:
            self._model_batch = inputs.shape[0]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in [*self.params.values(), *self.frozen]:
            param.requires_grad_(True)
        self._reset()

    def _forward_hook(self, rule: Callable):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            names = {attr: self.names[id(p)] for attr, p in module.named_parameters(recurse=False)
                     if id(p) in self.names}
            for name in names.values():
                self._expected[name] += 1
            inputs = args[0].detach()
            if not output.requires_grad:  # nothing upstream needs grad: start the graph here
                output.requires_grad_(True)
            batch = self._model_batch
            if batch > 1 and output.shape[0] == 1:
                # Shared across the batch (e.g. position embeddings of position_ids [1, t]):
                # broadcasting would sum the samples' gradients, so give each its own copy.
                output = output.expand(batch, *output.shape[1:])
                inputs = inputs.expand(batch, *inputs.shape[1:])

            def on_grad(grad_out: torch.Tensor) -> None:
                self._batch_size = grad_out.shape[0]
                for attr, row_grad in rule(module, _upcast(inputs), _upcast(grad_out.detach())).items():
                    name = names.get(attr)
                    if name is None:  # a parameter left out by `only`
                        continue
                    self._uses[name].append(row_grad)
                    if len(self._uses[name]) == self._expected[name]:
                        self._emit(name)

            output.register_hook(on_grad)
            return output

        return hook

    def _emit(self, name: str) -> None:
        uses = sorted(self._uses.pop(name), key=lambda use: not use.dense)  # dense first: sparse add in
        self._expected.pop(name)
        shape = self.params[name].shape
        per_row = self._batch_size * math.prod(shape[1:])
        step = max(1, self.chunk_elements // max(per_row, 1))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            chunk = self._workspace.view(self._batch_size, stop - start, *shape[1:], like=self.params[name],
                                         dtype=compute_dtype(self.params[name].dtype))
            uses[0].write(chunk, start, stop)
            for use in uses[1:]:
                use.add_to(chunk, start, stop)
            self.sink(name, start, stop, chunk)

    def finish(self) -> None:
        """After `backward()`: emit parameters some of whose uses got no gradient, reset."""
        for name in list(self._uses):
            self._emit(name)
        self._reset()
