"""Fold per-sample gradients into Fisher statistics, one chunk of rows at a time.

Per parameter the accumulator keeps, in float64 (see `welford.py`):
  * `fisher`: Welford state of `C_i = g_i * g_i` (mean = diagonal empirical Fisher; M2
    elementwise only for the parameters selected for it),
  * `grad`: running mean of `g_i`,
  * `group`: Welford state of each sample's group-reduced contribution
    (`sum of C_i over a head / neuron`), always with M2,
  * `saliency`: Welford state (with M2) of each sample's group saliency
    `s_i,G = 0.5 * sum_{k in G} g_i,k^2 w_k^2`, whose mean is the Optimal Brain Damage
    cost `0.5 * sum_{k in G} F_k w_k^2` of removing the group,
  * `input_sq`, for the Linear / Conv1D weights in `input_dims`: the mean over scored
    token positions of each input feature's square at the layer's input (Wanda's
    `||X_j||^2 / T`), from the sums the engine hands over per micro-batch
    (`add_inputs`); its `count` is the number of positions.

Per micro-batch it also hands back, on commit, each sample's gate gradients
`gate_i,G = sum_{k in G} g_i,k w_k` (the gradient of sample i's loss with respect to a
multiplicative gate on group G), `[b, G]` per parameter: `sample_gates`.

That is 16 bytes per parameter (8 more where M2 is kept) and nothing else of the
model's size: each chunk of per-sample rows `[b, r, ...]`, handed over while it is
still in cache, is reduced over the samples and folded straight into the float64
state (Chan's merge on those rows), so the state is read and written once per
micro-batch and no staging copy of the model exists. Squares are taken per sample
before any reduction over samples. On the CPU, float32 chunks of parameters without an
elementwise M2 go through one pass of a compiled kernel (`kernels/fold.c`: sums, squares,
group sums of `g^2`, `g * w`, `(g * w)^2` and the per-sample copy together); elsewhere
torch operations do the same.

A sample whose gradient is not finite must leave no trace. Folding stops at the first
chunk with a non-finite value (a device-side flag, so a GPU never waits on it); the
chunks already folded are listed, and `begin(..., undo=folded)` lets the caller run the
same micro-batch again to subtract exactly them (inverse Chan merge) before it redoes
the batch without the bad sample. (The compiled kernel checks row by row: it folds the
finite rows of the chunk where the flag trips, lists the chunk, and its undo pass
leaves out the same rows.) Non-finite gradients are rare, so this costs
nothing in the common case. Gates, group saliencies and input sums are staged per
micro-batch and folded only on commit, so a discarded pass leaves nothing of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import kernels
from .layout import GroupSpec
from .scratch import Scratch
from .welford import Welford, batch_moments

#: (parameter name, first row, stop row) of one folded chunk.
Chunk = tuple[str, int, int]


def device_side_flags(device: torch.device) -> bool:
    """Whether the finiteness check stays on the device (no host wait per chunk): GPUs."""
    return device.type != "cpu"


class FisherAccumulator:
    """Statistics of per-sample gradients of a set of parameters.

    Args:
        shapes: parameter name -> shape.
        specs: parameter name -> group partition.
        m2_names: parameters that get an elementwise M2 of `g^2`.
        per_sample_names: parameters whose per-sample `g_i` are handed back on commit.
        device: where the per-sample gradients arrive (the model's device).
        dtype: dtype of the per-sample gradients (the model's).
        per_sample_dtype: dtype of the per-sample copies handed back on commit (the
            store's: converting while the chunk is in cache saves a pass).
        state_device: where the float64 statistics live (default `device`); `cpu`
            keeps a large model's state off the GPU at the price of a transfer per chunk.
        fold_kernel: "auto" folds float32 CPU chunks with the compiled one-pass kernel
            (`kernels/fold.c`) where it builds, "torch" always with torch operations.
        weights: parameter name -> its values (the model's parameters, on `device`), for
            the gates `sum g * w` and the group saliencies; every name of `shapes`.
        input_dims: weights whose layer's input second moments are kept (`add_inputs`)
            -> the weight dimension that indexes input features (1 for Linear `[out, in]`,
            0 for Conv1D `[in, out]`).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        specs: dict[str, GroupSpec],
        m2_names: set[str],
        per_sample_names: set[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        per_sample_dtype: torch.dtype | None = None,
        state_device: torch.device | str | None = None,
        fold_kernel: str = "auto",
        *,
        weights: Mapping[str, torch.Tensor],
        input_dims: Mapping[str, int] | None = None,
    ):
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise ValueError(f"no weights given for {len(missing)} parameter(s), e.g. {missing[0]}: the gates "
                             "sum g * w need every accumulated parameter's values")
        self.shapes = shapes
        self.specs = specs
        self.device = torch.device(device)
        self.state_device = torch.device(state_device) if state_device is not None else self.device
        self._labels = {n: s.labels.to(self.device) for n, s in specs.items()}
        self.m2_names = set(m2_names)
        self.per_sample_names = set(per_sample_names)
        self.per_sample_dtype = per_sample_dtype or dtype
        self.fisher = {n: Welford.zeros(s, n in self.m2_names, self.state_device) for n, s in shapes.items()}
        self.grad = {n: Welford.zeros(s, False, self.state_device) for n, s in shapes.items()}
        self.group = {n: Welford.zeros((len(self.specs[n].keys),), True, self.state_device) for n in shapes}
        self.saliency = {n: Welford.zeros((len(self.specs[n].keys),), True, self.state_device) for n in shapes}
        # contiguous (a no-op for a model's parameters): the kernel reads rows of them
        # float32 values of a half-precision model's weights: the gates are float32 products
        self.weights = {n: weights[n].detach().to(self.device, _float32_at_least(weights[n].dtype)).contiguous()
                        for n in shapes}
        for name, weight in self.weights.items():
            if tuple(weight.shape) != tuple(shapes[name]):
                raise ValueError(f"weights of {name} have shape {tuple(weight.shape)}, not {tuple(shapes[name])}")
        self.input_dims = dict(input_dims or {})
        self.input_sq = {n: Welford.zeros((shapes[n][d],), False, self.state_device)
                         for n, d in self.input_dims.items()}
        #: per-sample gates of the last committed micro-batch: name -> `[b, G]` float64
        self.sample_gates: dict[str, torch.Tensor] = {}
        # Two sets of per-sample buffers, used alternately: what one commit hands back stays
        # valid while the next micro-batch is computed (a background writer can read it).
        self._per_sample_sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self._per_sample: dict[str, torch.Tensor] = {}
        self._group_c: dict[str, torch.Tensor] = {}
        self._gate_c: dict[str, torch.Tensor] = {}
        self._saliency_c: dict[str, torch.Tensor] = {}
        self._input_c: dict[str, tuple[torch.Tensor, int]] = {}
        self._touched: set[str] = set()
        self._batch_size = 0
        self._commits = 0
        self._ok = torch.ones((), dtype=torch.bool, device=self.device)
        # Folded chunks of this micro-batch, with the device flag at fold time (None: folded).
        self._chunks: list[tuple[Chunk, torch.Tensor | None]] = []
        self._undo: set[Chunk] | None = None
        self._sums = Scratch()
        self._squares = Scratch()
        self._deviations = Scratch()
        self._products = Scratch()
        if fold_kernel not in ("auto", "torch"):
            raise ValueError(f"fold_kernel must be 'auto' or 'torch', not {fold_kernel!r}")
        compiled = (fold_kernel == "auto" and self.device.type == "cpu" and self.state_device.type == "cpu"
                    and dtype == torch.float32 and self.per_sample_dtype in kernels.COPY_KINDS)
        self._kernel = kernels.load() if compiled else None

    # --- staging ---------------------------------------------------------------------
    def begin(self, batch_size: int, undo: list[Chunk] | None = None) -> None:
        """Start a micro-batch of `batch_size` samples.

        With `undo` (the `folded()` list of a discarded pass over this very batch), the
        next pass subtracts exactly those chunks from the statistics instead of adding.
        """
        self._batch_size = batch_size
        self._touched.clear()
        self._chunks.clear()
        self._ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._undo = set(undo) if undo is not None else None
        self._input_c = {}

        def staging() -> dict[str, torch.Tensor]:
            return {n: torch.zeros(batch_size, len(s.keys), dtype=torch.float64, device=self.device)
                    for n, s in self.specs.items()}

        self._group_c = staging()
        if undo is not None:  # an undo pass stages no gates or saliencies and copies nothing
            return
        self._gate_c, self._saliency_c = staging(), staging()
        buffers = self._per_sample_sets[self._commits % 2]
        for name in self.per_sample_names:
            buffer = buffers.get(name)
            if buffer is None or buffer.shape[0] != batch_size:
                buffers[name] = torch.empty(batch_size, *self.shapes[name], device=self.device,
                                            dtype=self.per_sample_dtype)
        self._per_sample = buffers

    def add(self, name: str, start: int, stop: int, grads: torch.Tensor) -> None:
        """Fold rows `start:stop` of parameter `name`'s per-sample gradients `[b, r, ...]`.

        `grads` is consumed (squared in place).
        """
        rows = slice(start, stop)
        compiled = self._kernel is not None and self._kernel_takes(name, grads)
        if self._undo is not None:
            if (name, start, stop) in self._undo:
                (self._fold_compiled if compiled else self._fold)(name, rows, grads, sign=-1)
            return
        if compiled:
            self._fold_compiled(name, rows, grads, sign=1)
            self._touched.add(name)
            return
        if name in self.per_sample_names:
            self._per_sample[name][:, rows].copy_(grads)
        self._fold(name, rows, grads, sign=1)
        self._touched.add(name)

    def add_inputs(self, name: str, sums: torch.Tensor, positions: int) -> None:
        """Stage this micro-batch's input sums of weight `name`'s layer: `sums` `[in]` of
        `x_t,j^2` over `positions` scored token positions (folded on commit; ignored in an undo pass)."""
        if self._undo is not None:
            return
        if name not in self.input_dims:
            raise KeyError(f"{name} was not declared in input_dims: no input second moments are kept for it")
        staged, count = self._input_c.get(name, (None, 0))
        sums = sums.to(self.state_device, torch.float64)
        self._input_c[name] = (sums if staged is None else staged + sums, count + int(positions))

    def _fold(self, name: str, rows: slice, grads: torch.Tensor, sign: int) -> None:
        n_batch = grads.shape[0]
        sum_g = torch.sum(grads, 0, out=self._sums.view(*grads.shape[1:], like=grads))
        if sign > 0:  # before squaring in place: the gates need g
            products = torch.mul(grads, self.weights[name][rows],
                                 out=self._products.view(*grads.shape, like=grads))
            self._stage(self._gate_c, name, rows, products)
            self._stage(self._saliency_c, name, rows, products.square_(), alpha=0.5)
        contributions = grads.square_()
        sum_c = torch.sum(contributions, 0, out=self._squares.view(*grads.shape[1:], like=grads))
        m2_c = None
        if name in self.m2_names:
            deviations = torch.sub(contributions, sum_c / n_batch,
                                   out=self._deviations.view(*contributions.shape, like=contributions))
            m2_c = deviations.square_().sum(0)
        batch: int | torch.Tensor = n_batch
        if sign > 0:
            self._stage(self._group_c, name, rows, contributions)
            # sum_c sums squares: it is finite iff every g in the chunk is (and then so is sum_g).
            finite = torch.isfinite(sum_c.amax())
            if not device_side_flags(self.device):  # checking costs no wait on a CPU
                self._ok = self._ok & finite
                if not self._ok:
                    return
                self._chunks.append(((name, rows.start, rows.stop), None))
            else:  # a device-side flag: zeros, not NaN * 0, once a chunk was not finite
                self._ok = self._ok & finite
                zero = torch.zeros((), dtype=sum_c.dtype, device=sum_c.device)
                sum_c = torch.where(self._ok, sum_c, zero, out=sum_c)
                sum_g = torch.where(self._ok, sum_g, zero, out=sum_g)
                m2_c = torch.where(self._ok, m2_c, zero) if m2_c is not None else None
                batch = self._ok.to(torch.int64) * n_batch
                self._chunks.append(((name, rows.start, rows.stop), self._ok))
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.state_device)
        self.fisher[name].fold_rows(rows, batch, self._to_state(sum_c), self._to_state(m2_c), sign)
        self.grad[name].fold_rows(rows, batch, self._to_state(sum_g), None, sign)

    def _kernel_takes(self, name: str, grads: torch.Tensor) -> bool:
        """Whether the compiled kernel folds this chunk (not M2 states, not tensors of 3+ dims)."""
        return name not in self.m2_names and grads.dim() in (2, 3) and grads.is_contiguous()

    def _fold_compiled(self, name: str, rows: slice, grads: torch.Tensor, sign: int) -> None:
        """`_fold` (with the per-sample copy and group staging) in one pass of the compiled kernel.

        Non-finite values are handled per row of the chunk rather than per chunk: a row
        whose `g^2` is not finite is left out of the state, the chunk's finite rows are
        folded and the chunk recorded, and an undo pass leaves out the same rows.
        """
        n_batch, n_rows = grads.shape[:2]
        flat = grads.view(n_batch, n_rows, -1) if grads.dim() == 3 else grads.view(n_batch, 1, n_rows)
        spec = self.specs[name]
        fold_state = sign < 0 or bool(self._ok)  # after a non-finite chunk: copies and group sums only
        total_c = self.fisher[name].total[rows] if fold_state else None
        total_g = self.grad[name].total[rows] if fold_state else None
        copy, group_kind, weights = None, kernels.GROUP_NONE, None
        if sign > 0:
            if name in self.per_sample_names:
                copy = self._per_sample[name][:, rows].view(flat.shape)  # rows of a sample are contiguous
            per_row = grads.dim() == 3 and spec.dim == 0
            group_kind = kernels.GROUP_PER_ROW if per_row else kernels.GROUP_PER_COLUMN
            weights = self.weights[name][rows]
        folded = self._kernel.fold(flat, total_g, total_c, float(sign), copy, group_kind, weights)
        if sign < 0:
            return
        labels = self._labels[name][rows] if spec.dim == 0 else self._labels[name]
        self._group_c[name].index_add_(1, labels, folded.group)
        self._gate_c[name].index_add_(1, labels, folded.gate)
        self._saliency_c[name].index_add_(1, labels, folded.saliency, alpha=0.5)
        if fold_state:
            self._chunks.append(((name, rows.start, rows.stop), None))
            if folded.skipped:
                self._ok = torch.zeros((), dtype=torch.bool)

    def _to_state(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.device == self.state_device:
            return tensor
        return tensor.to(self.state_device, non_blocking=False)

    def _stage(self, staging: dict[str, torch.Tensor], name: str, rows: slice, values: torch.Tensor,
               alpha: float = 1.0) -> None:
        """Add `alpha *` the per-sample group sums of chunk `values` `[b, r, ...]` into `staging[name]`."""
        spec = self.specs[name]
        group_dim = spec.dim + 1
        other = [d for d in range(1, values.dim()) if d != group_dim]
        # float32 within a chunk row (at most a few thousand terms), float64 across samples
        per_position = (values.sum(other) if other else values).double()
        labels = self._labels[name][rows] if spec.dim == 0 else self._labels[name]
        staging[name].index_add_(1, labels, per_position, alpha=alpha)

    def non_finite_samples(self) -> dict[int, str]:
        """Samples of this micro-batch with a non-finite gradient: sample row -> first parameter hit."""
        bad: dict[int, str] = {}
        for name in sorted(self._touched):  # the same name in every process and parameter share
            for row in torch.nonzero(~torch.isfinite(self._group_c[name]).all(1)).flatten().tolist():
                bad.setdefault(row, name)
        return bad

    def folded(self) -> list[Chunk]:
        """Chunks of this micro-batch already in the statistics (to undo before redoing it)."""
        if not self._chunks:
            return []
        flags = [flag for _, flag in self._chunks if flag is not None]
        ok = iter(torch.stack(flags).tolist() if flags else [])
        return [chunk for chunk, flag in self._chunks if flag is None or next(ok)]

    def commit(self) -> dict[str, torch.Tensor]:
        """Close the micro-batch: count its samples and fold its group statistics.

        Returns:
            parameter name -> per-sample gradients `[b, *shape]` (in `per_sample_dtype`),
            valid until the second `begin` after this commit. The micro-batch's per-sample
            gates are in `sample_gates` until the next commit.
        """
        if self._undo is not None:
            raise RuntimeError("commit() after an undo pass: begin() the corrected micro-batch first")
        if not bool(self._ok):
            raise ValueError("this micro-batch has non-finite per-sample gradients (see non_finite_samples()); "
                             "it was not folded in: undo its folded() chunks and redo it without those samples")
        n = self._batch_size
        for name in self.shapes:
            if name not in self._touched:  # no gradient reached this parameter: g_i = 0
                self.fisher[name].fold_zeros(n)
                if name in self.per_sample_names:
                    self._per_sample[name].zero_()
            self.fisher[name].count += n
            self.grad[name].count += n
            self.group[name].merge_moments(*batch_moments(self._group_c[name].to(self.state_device)))
            self.saliency[name].merge_moments(*batch_moments(self._saliency_c[name].to(self.state_device)))
        for name, (sums, positions) in self._input_c.items():
            self.input_sq[name].merge_moments(positions, sums)
        self.sample_gates = self._gate_c
        self._input_c = {}
        self._touched.clear()
        self._chunks.clear()
        self._commits += 1
        return {name: self._per_sample[name] for name in self.per_sample_names}

    @property
    def count(self) -> int:
        """Samples folded in so far."""
        return next(iter(self.fisher.values())).count if self.fisher else 0


def _float32_at_least(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
