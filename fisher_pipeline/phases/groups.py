"""Group layouts (heads, neurons) of stored parameters, rebuilt from store metadata only.

A store's `group/<param>` array carries attrs `names`, `dim` and `sizes` (elements per
group). Which positions along `dim` belong to which group is read from the attr
`labels` (or an int array `group_labels/<param>`) when the store has it. Older stores
lack both; the layout is then rebuilt assuming every group is one contiguous block
along `dim`, in name order. That holds for head blocks and per-neuron groups of the
Llama, GPT-2 and GPT-NeoX adapters, but not for a group made of several blocks (Phi-3's
fused `gate_up_proj`, where neuron n owns rows n and I + n). A rebuilt layout is
therefore checked against the stored group sums (`verify_layout`) before it is used.
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
        rebuilt: True when `labels` were inferred (contiguous blocks), not stored.
    """

    param: str
    shape: tuple[int, ...]
    dim: int
    labels: np.ndarray
    names: tuple[str, ...]
    sizes: np.ndarray
    rebuilt: bool

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
    """The group layout of `param` in `store` (stored labels, else contiguous blocks).

    Raises:
        ValueError: the attrs cannot describe contiguous blocks (sizes do not tile `dim`).
    """
    attrs = store.array("group", param).attrs
    shape = tuple(store.array("fisher", param).shape)
    dim, names = int(attrs["dim"]), tuple(attrs["names"])
    sizes = np.asarray(attrs["sizes"], dtype=np.int64)
    labels = _stored_labels(store, param)
    rebuilt = labels is None
    if rebuilt:
        labels = _contiguous_labels(store, param, shape, dim, sizes)
    n_positions = shape[dim] if shape else 1
    if labels.shape != (n_positions,) or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(names):
        raise ValueError(
            f"group labels of {param} in store {store.path} do not match its shape {shape} along dim {dim} "
            f"and its {len(names)} groups: the store is inconsistent, rerun phase 1."
        )
    return GroupLayout(param, shape, dim, labels.astype(np.int64), names, sizes, rebuilt)


def verify_layout(layout: GroupLayout, fisher: np.ndarray, group_sums: np.ndarray, store: FisherStore) -> None:
    """Check a rebuilt layout: the Fisher summed within its groups must equal the stored sums.

    Stored layouts are trusted; a rebuilt one that disagrees means some group is not one
    contiguous block (e.g. Phi-3's fused gate/up neurons).

    Raises:
        ValueError: naming the store and parameter, and what the store needs.
    """
    if not layout.rebuilt:
        return
    scale = max(float(np.abs(group_sums).max(initial=0.0)), np.finfo(np.float32).tiny)
    if not np.allclose(layout.reduce_sum(fisher), group_sums, rtol=1e-3, atol=1e-5 * scale):
        raise ValueError(
            f"the groups of {layout.param} in store {store.path} are not contiguous blocks along dim "
            f"{layout.dim}, and the store does not record which positions belong to which group. "
            "Rewrite the store with a fisher_pipeline that saves group labels (rerun phase 1), or "
            "use element granularity for this parameter."
        )


def _stored_labels(store: FisherStore, param: str) -> np.ndarray | None:
    attrs = store.array("group", param).attrs
    if "labels" in attrs:
        return np.asarray(attrs["labels"], dtype=np.int64)
    key = f"group_labels/{param}"
    if key in store.root:
        return np.asarray(store.root[key][...], dtype=np.int64)
    return None


def _contiguous_labels(store: FisherStore, param: str, shape: tuple[int, ...], dim: int,
                       sizes: np.ndarray) -> np.ndarray:
    n_positions = shape[dim] if shape else 1
    per_position = int(np.prod(shape, dtype=np.int64)) // max(n_positions, 1)
    lengths = sizes // max(per_position, 1)
    if (sizes % max(per_position, 1)).any() or lengths.sum() != n_positions or (lengths < 1).any():
        raise ValueError(
            f"group sizes {sizes.tolist()[:8]}... of {param} in store {store.path} do not tile its shape "
            f"{shape} along dim {dim} as contiguous blocks, and the store records no group labels: "
            "rerun phase 1 with a fisher_pipeline that saves them."
        )
    return np.repeat(np.arange(len(sizes)), lengths)
