"""Fold per-sample gradients into Fisher statistics, one micro-batch at a time.

Per parameter the accumulator keeps, in float64 (see `welford.py`):
  * `fisher`: Welford state of `C_i = g_i * g_i` (mean = diagonal empirical Fisher; M2
    elementwise only for the parameters selected for it),
  * `grad`: running mean of `g_i`,
  * `group`: Welford state of each sample's group-reduced contribution
    (`sum of C_i over a head / neuron`), always with M2.

Squares are taken per sample before any reduction over samples. A micro-batch is
first staged (float32 sums over at most `batch_size` samples) and committed only after
the caller has checked that no sample produced a non-finite gradient, so a bad sample
can be dropped and its batch redone without it ever touching the statistics.
"""

from __future__ import annotations

import torch

from .layout import GroupSpec
from .scratch import Scratch
from .welford import Welford, batch_moments


class FisherAccumulator:
    """Statistics of per-sample gradients of a set of parameters.

    Args:
        shapes: parameter name -> shape.
        specs: parameter name -> group partition.
        m2_names: parameters that get an elementwise M2 of `g^2`.
        per_sample_names: parameters whose per-sample `g_i` are handed back on commit.
        device: where statistics live (the model's device).
        dtype: dtype of the per-sample gradients (the model's); staging sums use it.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        specs: dict[str, GroupSpec],
        m2_names: set[str],
        per_sample_names: set[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.shapes = shapes
        self.specs = specs
        self._labels = {n: s.labels.to(device) for n, s in specs.items()}
        self.m2_names = set(m2_names)
        self.per_sample_names = set(per_sample_names)
        self.device = device
        self.fisher = {n: Welford.zeros(s, n in self.m2_names, device) for n, s in shapes.items()}
        self.grad = {n: Welford.zeros(s, False, device) for n, s in shapes.items()}
        self.group = {n: Welford.zeros((len(self.specs[n].keys),), True, device) for n in shapes}
        zeros = {n: torch.zeros(s, dtype=dtype, device=device) for n, s in shapes.items()}
        self._sum_c = zeros
        self._sum_g = {n: torch.zeros_like(t) for n, t in zeros.items()}
        self._m2_c = {n: torch.zeros_like(zeros[n]) for n in self.m2_names}
        self._group_c: dict[str, torch.Tensor] = {}
        self._per_sample: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()
        self._batch_size = 0
        self._scratch = Scratch()

    def begin(self, batch_size: int) -> None:
        """Start staging a micro-batch of `batch_size` samples."""
        self._batch_size = batch_size
        self._touched.clear()
        self._group_c = {
            n: torch.zeros(batch_size, len(s.keys), dtype=torch.float64, device=self.device)
            for n, s in self.specs.items()
        }
        for name in self.per_sample_names:
            buffer = self._per_sample.get(name)
            if buffer is None or buffer.shape[0] != batch_size:
                self._per_sample[name] = torch.empty(batch_size, *self.shapes[name], device=self.device,
                                                     dtype=self._sum_g[name].dtype)

    def add(self, name: str, start: int, stop: int, grads: torch.Tensor) -> None:
        """Stage rows `start:stop` of parameter `name`'s per-sample gradients `[b, r, ...]`.

        `grads` is consumed (squared in place).
        """
        rows = slice(start, stop)
        torch.sum(grads, 0, out=self._sum_g[name][rows])
        if name in self.per_sample_names:
            self._per_sample[name][:, rows] = grads
        contributions = grads.square_()
        torch.sum(contributions, 0, out=self._sum_c[name][rows])
        if name in self.m2_names:
            mean = self._sum_c[name][rows] / contributions.shape[0]
            deviations = torch.sub(contributions, mean, out=self._scratch.view(*contributions.shape, like=mean))
            torch.sum(deviations.square_(), 0, out=self._m2_c[name][rows])
        self._stage_groups(name, start, stop, contributions)
        self._touched.add(name)

    def _stage_groups(self, name: str, start: int, stop: int, contributions: torch.Tensor) -> None:
        spec = self.specs[name]
        group_dim = spec.dim + 1
        other = [d for d in range(1, contributions.dim()) if d != group_dim]
        # float32 within a chunk row (at most a few thousand terms), float64 across samples
        per_position = (contributions.sum(other) if other else contributions).double()
        labels = self._labels[name][start:stop] if spec.dim == 0 else self._labels[name]
        self._group_c[name].index_add_(1, labels, per_position)

    def non_finite_samples(self) -> dict[int, str]:
        """Staged samples with a non-finite gradient: sample row -> first parameter hit."""
        bad: dict[int, str] = {}
        for name in self._touched:
            for row in torch.nonzero(~torch.isfinite(self._group_c[name]).all(1)).flatten().tolist():
                bad.setdefault(row, name)
        return bad

    def commit(self) -> dict[str, torch.Tensor]:
        """Merge the staged micro-batch into the statistics.

        Returns:
            parameter name -> per-sample gradients `[b, *shape]` (float32, valid until the
            next `begin`) for the per-sample parameters.
        """
        n = self._batch_size
        for name in self.shapes:
            if name not in self._touched:  # no gradient reached this parameter: g_i = 0
                self._sum_c[name].zero_()
                self._sum_g[name].zero_()
                if name in self.m2_names:
                    self._m2_c[name].zero_()
                if name in self.per_sample_names:
                    self._per_sample[name].zero_()
            self.fisher[name].merge_moments(n, self._sum_c[name], self._m2_c.get(name))
            self.grad[name].merge_moments(n, self._sum_g[name])
            self.group[name].merge_moments(*batch_moments(self._group_c[name]))
        self._touched.clear()
        return {name: self._per_sample[name] for name in self.per_sample_names}

    @property
    def count(self) -> int:
        """Samples folded in so far."""
        return next(iter(self.fisher.values())).count if self.fisher else 0
