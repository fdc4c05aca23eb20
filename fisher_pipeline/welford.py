"""Running mean and M2 (sum of squared deviations) with Chan et al.'s parallel merge.

State is kept in float64 as (count, sum, m2): the mean is `sum / count`. Summing in
float64 loses at most ~count * 1e-16 relative, far below float32 resolution, and makes
a merge of shards exact up to rounding whatever their order. M2 merges with

    M2 = M2_a + M2_b + (mean_b - mean_a)^2 * n_a * n_b / n        (Chan, Golub, LeVeque 1979)

so `variance = M2 / (n - 1)` and the standard error of the mean `sqrt(variance / n)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def batch_moments(values: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, sum and M2 over dim 0 of `values` `[n, *shape]`, computed two-pass in float64."""
    values = values.to(torch.float64)
    total = values.sum(0)
    m2 = (values - total / values.shape[0]).square_().sum(0)
    return values.shape[0], total, m2


@dataclass
class Welford:
    """Elementwise running statistics of a stream of tensors of one shape.

    Attributes:
        count: number of samples folded in.
        total: float64 sum of the samples, `[*shape]`.
        m2: float64 sum of squared deviations from the mean, `[*shape]`, or None when
            only the mean is tracked.
    """

    count: int
    total: torch.Tensor
    m2: torch.Tensor | None

    @classmethod
    def zeros(cls, shape: tuple[int, ...], track_m2: bool = True, device: str | torch.device = "cpu") -> Welford:
        """Empty state for tensors of `shape`."""
        total = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls(0, total, torch.zeros_like(total) if track_m2 else None)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the samples so far (zeros before any sample)."""
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance `M2 / (n - 1)` (NaN for fewer than two samples)."""
        if self.m2 is None:
            raise ValueError("this Welford state does not track M2")
        return self.m2 / (self.count - 1) if self.count > 1 else torch.full_like(self.m2, float("nan"))

    @property
    def standard_error(self) -> torch.Tensor:
        """Standard error of the mean, `sqrt(var / n)`."""
        return (self.variance / self.count).sqrt()

    def merge_moments(self, count: int, total: torch.Tensor, m2: torch.Tensor | None = None) -> None:
        """Fold in a batch given by its count, sum and M2 (Chan's formula), in place.

        `total` and `m2` may be float32 views of any part of the state's shape-compatible
        tensors; they are promoted to float64 as they are added.
        """
        if count == 0:
            return
        if self.m2 is not None:
            if m2 is None:
                raise ValueError("a state that tracks M2 needs the batch's M2 to merge")
            if self.count:
                delta = total.to(torch.float64) / count - self.mean
                self.m2.add_(m2).add_(delta.square_(), alpha=self.count * count / (self.count + count))
            else:
                self.m2.copy_(m2)
        self.total.add_(total)
        self.count += count

    def fold_rows(self, rows: slice, count: int | torch.Tensor, total: torch.Tensor, m2: torch.Tensor | None,
                  sign: int = 1) -> None:
        """Chan-merge a batch into rows `rows` of the state, in place, without changing `count`.

        The caller folds every row of a batch this way (chunk by chunk, each while it is
        in cache) and then adds the batch's size to `count` once. `sign=-1` is the exact
        inverse: it takes a batch folded before (not yet counted) back out.

        Args:
            rows: rows of the first dimension.
            count: samples in the batch (a 0-d tensor may be 0: then nothing changes).
            total: the batch's sum over its samples of those rows (any float dtype).
            m2: the batch's M2 of those rows (needed when the state tracks M2).
        """
        state_total = self.total[rows]
        if sign < 0:
            state_total.sub_(total)
        if self.m2 is not None:
            if m2 is None:
                raise ValueError("a state that tracks M2 needs the batch's M2 to merge")
            state_m2 = self.m2[rows]
            if self.count:
                batch = count if isinstance(count, int) else count.to(torch.float64)
                weight = self.count * batch / (self.count + batch)  # 0 for an empty batch
                batch_mean = total.to(torch.float64) / (batch if isinstance(batch, int) else batch.clamp(min=1))
                delta = batch_mean.sub_(state_total, alpha=1 / self.count)
                state_m2.add_(delta.square_().mul_(weight), alpha=sign)
            state_m2.add_(m2, alpha=sign)
        if sign > 0:
            state_total.add_(total)

    def fold_zeros(self, count: int) -> None:
        """The M2 part of folding `count` all-zero samples (their sums add nothing); no count change."""
        if self.m2 is not None and self.count:
            self.m2.add_(self.total.square() / self.count * (count / (self.count + count)))

    def update(self, values: torch.Tensor) -> None:
        """Fold in a batch of samples `[n, *shape]`."""
        count, total, m2 = batch_moments(values)
        self.merge_moments(count, total, m2 if self.m2 is not None else None)

    def merge(self, other: Welford) -> None:
        """Fold in another state of the same shape (e.g. another shard)."""
        self.merge_moments(other.count, other.total, other.m2)
