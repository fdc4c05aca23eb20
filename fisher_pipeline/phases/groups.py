"""Group layouts (heads, neurons) of stored parameters, from store metadata only.

A store's `group/<param>` array carries attrs `names`, `dim` and `sizes` (elements per
group), and `group_labels/<param>` says which group each position along `dim` belongs
to (a group may be several blocks, e.g. Phi-3's fused gate/up neurons).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import FisherStore


@dataclass(frozen=True)
class GroupLayout:
    """The partition of one parameter into named groups along one dimension.

    Attributes:
        param: parameter name.
        shape: the parameter's shape.
        dim: dimension along which groups are laid out.
        labels: int64 `[shape[dim]]`, the group of each position along `dim`.
        names: group names, `labels` indexes them.
        sizes: int64 `[G]`, elements per group.
    """

    param: str
    shape: tuple[int, ...]
    dim: int
    labels: np.ndarray
    names: tuple[str, ...]
    sizes: np.ndarray

    @property
    def n_groups(self) -> int:
        return len(self.names)

    def reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum `values` (the parameter's full shape) within each group -> `[G]` float64."""
        along_dim = np.moveaxis(np.atleast_1d(values), self.dim, 0)
        per_position = along_dim.reshape(along_dim.shape[0], -1).sum(1, dtype=np.float64)
        return np.bincount(self.labels, weights=per_position, minlength=self.n_groups)

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast one value per group `[G]` to the parameter's full shape (read-only view)."""
        per_position = np.asarray(per_group)[self.labels]
        if not self.shape:
            return per_position.reshape(())
        view = [1] * len(self.shape)
        view[self.dim] = self.shape[self.dim]
        return np.broadcast_to(per_position.reshape(view), self.shape)


def load_layout(store: FisherStore, param: str) -> GroupLayout:
    """The group layout of `param` as phase 1 stored it (`group/` attrs + `group_labels/`)."""
    spec = store.group_spec(param)
    shape = tuple(store.array("fisher", param).shape)
    return GroupLayout(param, shape, spec.dim, spec.labels.numpy(), spec.names, store.group_sizes(param))
