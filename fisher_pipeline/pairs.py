"""The pair engine of phases 5 (`conflicts`) and 6 (`qkov`): per-sample pair matrices.

For a slice S of two tasks' per-sample gradients, `a` `[N_A, S]` and `b` `[N_B, S]`,

    M[i, j] = sum_k f(a[i, k]) * w[k] * h(b[j, k])        f, h in {identity, square, abs}

is one matrix product `(f(a) * w) @ h(b).T` (never a Python loop over pairs or elements).
Cosine: f = h = identity, divided by the per-sample norms `sqrt(sum_k w[k] x[k]^2)`, so
with a weight it is the cosine in the metric `w` (phase 5's Fisher-normalised
similarity). The phase 6 unsigned score is f = square, h = abs, w = 1 / Fhat; signed and
symmetric likewise.

Batched heads. All heads of one block of a parameter are one batched product
`[H, n_A, S_h] @ [H, S_h, n_B]` (`torch.bmm`): the stored array is split into heads by
the store's geometry (`ParamGeometry.split_heads`) with one reshape. A whole parameter
whose head blocks partition it (q/k/v/o projections, fused QKV) is the sum of its heads'
matrices, because M is a sum over elements: it costs no extra product. Other parameters
(MLP, norms) are one product over all their elements.

Precision. Stored blocks are converted to the compute dtype (`float32` by default,
`float64` on request) *before* f, w and h are applied, so float16 stores never square or
multiply in float16 (squares of gradients ~1e-4 underflow there). float32 products of
length S carry a relative error of about `sqrt(S) * 6e-8` of `sum_k |f(a_k) w_k h(b_k)|`
(~1e-5 for a 576 x 576 projection): two orders below the 5e-4 rounding of float16
storage, and far below the sampling noise the pair phases test against. Results are
returned in float64 and heads are summed in float64. float64 compute costs ~3x (its
conversion and product), which on CPU is more than reading the stores.

Reading and memory (`pair_matrices`, `iter_param_pairs`). Per parameter, task B's
per-sample array is read once in full and task A's once, in blocks of `sample_block`
samples; all groups (whole parameter and heads) come from those reads, so every stored
array is read once per task pair. Memory is per parameter, not per model: B's array in
the compute dtype (x2 with `within` and f != h), `sample_block` rows of A (all of A
with `within`, for the A-A matrices), and the `N_A x N_B` (and `N_A^2`, `N_B^2`) float64
matrices of the parameter's groups. `iter_param_pairs` yields them one parameter at a
time so a caller can reduce and drop them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import StoreMismatchError
from .layout import HEAD_BLOCKS, ParamGeometry
from .store import FisherStore

#: Elementwise maps applied (in the compute dtype) to one side of the product.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "square": torch.square,
    "abs": torch.abs,
}
#: Compute dtypes of the products (results are always float64).
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_DTYPE = "float32"
#: Default rows of each operand materialised at once by `pair_matrix`.
BLOCK_ROWS = 256
#: Default samples of task A read at once by `pair_matrices`.
SAMPLE_BLOCK = 256

#: A group: (parameter, block, head). `(param, None, None)` is the whole parameter;
#: `(param, "q", 3)` query head 3, `(param, "k", 1)` KV head 1 (k and v are per KV head).
Group = tuple[str, str | None, int | None]


def _transform(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; use one of {sorted(TRANSFORMS)}") from None


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown compute dtype {name!r}; use one of {sorted(DTYPES)}") from None


def _as_2d(x: np.ndarray | Sequence, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, S], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must hold floats, got {x.dtype}")
    return x


def _weight(weight: np.ndarray | None, size: int) -> np.ndarray | None:
    if weight is None:
        return None
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    if w.shape != (size,):
        raise ValueError(f"weight must be [S] = [{size}], got shape {np.shape(weight)}")
    return w


def _tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """`x` `[n, H, S]` (any float dtype) as a contiguous `[H, n, S]` tensor of `dtype`.

    One pass: the conversion and the transpose happen in the same copy.
    """
    x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)
    source = torch.from_numpy(x).transpose(0, 1)
    return torch.empty(source.shape, dtype=dtype).copy_(source)


def _bmm(left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    """`[H, n, S] x [H, m, S] -> float64 [H, n, m]`."""
    return torch.bmm(left, right.transpose(1, 2)).double().numpy()


def pair_matrix(a: np.ndarray, b: np.ndarray, f: str = "identity", h: str = "identity",
                weight: np.ndarray | None = None, block_rows: int = BLOCK_ROWS,
                dtype: str = DEFAULT_DTYPE) -> np.ndarray:
    """`M[i, j] = sum_k f(a[i, k]) * weight[k] * h(b[j, k])` as blocked matrix products.

    Args:
        a: `[N_A, S]`, any float dtype (converted to `dtype` per block, before f).
        b: `[N_B, S]`, likewise.
        f, h: `identity`, `square` or `abs`, applied elementwise to a and b.
        weight: `[S]` or None (all ones).
        block_rows: rows of a and of b converted and multiplied at once; memory is at most
            `block_rows x S` of each operand plus the result.
        dtype: compute dtype, `float32` or `float64` (see the module docstring).

    Returns:
        float64 `[N_A, N_B]`.
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same slice length S, got {a.shape} and {b.shape}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    fa_, hb_, torch_dtype = _transform(f), _transform(h), _dtype(dtype)
    w = _weight(weight, a.shape[1])
    w = None if w is None else torch.from_numpy(w).to(torch_dtype)
    out = np.full((a.shape[0], b.shape[0]), np.nan)  # a block never written shows as NaN
    for i in range(0, a.shape[0], block_rows):
        fa = fa_(_tensor(a[i:i + block_rows, None], torch_dtype))
        if w is not None:
            fa = fa * w
        for j in range(0, b.shape[0], block_rows):
            hb = hb_(_tensor(b[j:j + block_rows, None], torch_dtype))
            out[i:i + block_rows, j:j + block_rows] = _bmm(fa, hb)[0]
    return out


def row_norms(x: np.ndarray, block_rows: int = BLOCK_ROWS, weight: np.ndarray | None = None) -> np.ndarray:
    """Norm `sqrt(sum_k weight[k] x[i, k]^2)` of every row of `x` `[N, S]`, float64 `[N]`, in row blocks."""
    x = _as_2d(x, "x")
    w = _weight(weight, x.shape[1])
    parts = []
    for i in range(0, x.shape[0], block_rows):
        sq = np.square(x[i:i + block_rows].astype(np.float64))
        parts.append(np.sqrt(sq @ w if w is not None else sq.sum(1)))
    return np.concatenate(parts or [np.zeros(0)])


def normalise(matrix: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """`matrix / outer(norms_a, norms_b)` (over the last two axes); zero norms give NaN."""
    na = np.where(norms_a > 0, norms_a, np.nan)
    nb = np.where(norms_b > 0, norms_b, np.nan)
    return matrix / (na[..., :, None] * nb[..., None, :])


def cosine_matrix(a: np.ndarray, b: np.ndarray, block_rows: int = BLOCK_ROWS,
                  weight: np.ndarray | None = None, dtype: str = DEFAULT_DTYPE) -> np.ndarray:
    """Cosine similarity of every row of `a` `[N_A, S]` with every row of `b` `[N_B, S]`.

    With `weight` `[S]` (positive) it is the cosine in that metric:
    `sum_k a_k w_k b_k / sqrt(sum_k w_k a_k^2 * sum_k w_k b_k^2)`.
    A sample whose slice is all zero has no direction: its row (a) or column (b) is NaN,
    never 0, so callers cannot mistake it for orthogonality; drop or count it explicitly.

    Returns:
        float64 `[N_A, N_B]`.
    """
    return normalise(pair_matrix(a, b, weight=weight, block_rows=block_rows, dtype=dtype),
                     row_norms(a, block_rows, weight), row_norms(b, block_rows, weight))


# --- groups of stored per-sample arrays --------------------------------------------------

def group_slice(store: FisherStore, group: Group, data: np.ndarray) -> np.ndarray:
    """The `[n, S]` slice of group `group` from per-sample rows `data` `[n, *shape]` of its param.

    A whole parameter is flattened in C order; a head is narrowed along the parameter's
    group dim to the head's positions (`geometry.positions(block)[head]`), then flattened.
    """
    param, block, head = group
    if block is None:
        return data.reshape(data.shape[0], -1)
    geometry = store.geometry[param]
    positions = geometry.positions(block)[head]
    return np.take(data, positions, axis=geometry.groups.dim + 1).reshape(data.shape[0], -1)


def group_weight(store: FisherStore, group: Group, weight: np.ndarray) -> np.ndarray:
    """Slice a parameter-shaped weight (e.g. `1 / Fhat`) exactly as `group_slice` slices data."""
    return group_slice(store, group, np.asarray(weight)[None])[0]


def check_groups(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group]) -> None:
    """Refuse stores or groups the pair engine cannot combine.

    Raises:
        StoreMismatchError: the stores come from different models or store different
            per-sample parameters or dtypes (naming both paths and the attribute), or a
            group's parameter has no stored per-sample gradients.
        ValueError: a malformed group (unknown block, head out of range, head without block).
    """
    from .phases.common import check_same_model  # here: the phases package imports this module

    check_same_model({"A": store_a, "B": store_b}, per_sample=True)
    stored = set(store_a.per_sample_names) & set(store_b.per_sample_names)
    for group in groups:
        param, block, head = group
        if param not in stored:
            raise StoreMismatchError(
                f"per_sample/{param} is not stored in both stores {store_a.path} and {store_b.path} "
                f"(stored: {sorted(stored)[:6]}): add it to fisher.per_sample_params and rerun phase 1."
            )
        if block is None:
            if head is not None:
                raise ValueError(f"group {group}: a head needs a block (q, k, v or o)")
            continue
        if block not in HEAD_BLOCKS or head is None:
            raise ValueError(f"group {group}: block must be one of {HEAD_BLOCKS} with a head index")
        n_heads = store_a.geometry[param].positions(block).shape[0]  # KeyError if the param lacks block
        if not 0 <= head < n_heads:
            raise ValueError(f"group {group}: {param} has {n_heads} {block!r} heads (0..{n_heads - 1})")


def _by_param(groups: Sequence[Group]) -> dict[str, list[Group]]:
    by_param: dict[str, list[Group]] = defaultdict(list)
    for group in dict.fromkeys(groups):  # de-duplicated, order kept
        by_param[group[0]].append(group)
    return dict(by_param)


def iter_pair_inputs(store_a: FisherStore, store_b: FisherStore,
                     groups: Sequence[Group]) -> Iterator[tuple[Group, np.ndarray, np.ndarray]]:
    """Yield `(group, a [N_A, S], b [N_B, S])` for every group, in stored dtype.

    Each parameter's per-sample array is read once per store (in full), and all its groups
    are sliced from that read; memory is one parameter's arrays of both tasks at a time.
    Use `pair_matrices` for bounded memory over samples.
    """
    groups = list(groups)
    check_groups(store_a, store_b, groups)
    for param, param_groups in _by_param(groups).items():
        data_a, data_b = store_a.per_sample(param), store_b.per_sample(param)
        for group in param_groups:
            yield group, group_slice(store_a, group, data_a), group_slice(store_b, group, data_b)


@dataclass
class PairMatrices:
    """Pair matrices per group, float64.

    Attributes:
        cross: group -> `[N_A, N_B]` (A's sample i against B's sample j).
        within_a: group -> `[N_A, N_A]` (empty unless asked for). The diagonal i == i (a
            sample with itself) is kept; a baseline over distinct pairs must exclude it.
        within_b: group -> `[N_B, N_B]`, likewise.
    """

    cross: dict[Group, np.ndarray] = field(default_factory=dict)
    within_a: dict[Group, np.ndarray] = field(default_factory=dict)
    within_b: dict[Group, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, group: Group) -> np.ndarray:
        return self.cross[group]

    def __len__(self) -> int:
        return len(self.cross)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.cross)

    def keys(self):
        return self.cross.keys()

    def items(self):
        return self.cross.items()

    def update(self, other: PairMatrices) -> None:
        self.cross.update(other.cross)
        self.within_a.update(other.within_a)
        self.within_b.update(other.within_b)


def heads_partition(geometry: ParamGeometry) -> bool:
    """True when the parameter's head blocks together cover its group dim exactly once.

    Then every element belongs to exactly one head, and any pair matrix of the whole
    parameter is the sum of its heads' matrices.
    """
    blocks = geometry.head_blocks()
    if not blocks:
        return False
    positions = np.concatenate([geometry.positions(block).ravel() for block in blocks])
    return np.array_equal(np.sort(positions), np.arange(geometry.shape[geometry.groups.dim]))


class _Units:
    """How one parameter's stored rows become batched operands `[H, n, S_h]`.

    A unit is a head block (all its heads at once) or None (the whole parameter, H = 1).
    """

    def __init__(self, geometry: ParamGeometry, groups: Sequence[Group]):
        self.geometry = geometry
        blocks = {block for _, block, _ in groups if block is not None}
        wants_whole = any(block is None for _, block, _ in groups)
        self.whole_from_heads = wants_whole and heads_partition(geometry)
        if self.whole_from_heads:
            blocks |= set(geometry.head_blocks())
        ordered = [b for b in geometry.head_blocks() if b in blocks]
        self.units: list[str | None] = [*ordered, *([None] if wants_whole and not self.whole_from_heads else [])]

    def split(self, data: np.ndarray, unit: str | None) -> np.ndarray:
        """`[n, *shape]` -> `[n, H, S_h]` (no copy for a whole parameter)."""
        if unit is None:
            return data.reshape(data.shape[0], 1, -1)
        heads = self.geometry.split_heads(data, unit, batch_dims=1)
        return heads.reshape(heads.shape[0], heads.shape[1], -1)

    def matrix(self, per_unit: Mapping[str | None, np.ndarray], group: Group) -> np.ndarray:
        """Group `group`'s matrix `[..., n, m]` from per-unit stacks `[H, ..., n, m]`."""
        _, block, head = group
        if block is not None:
            return per_unit[block][head]
        if self.whole_from_heads:
            return sum(per_unit[unit].sum(axis=0) for unit in self.units)
        return per_unit[None][0]


def iter_param_pairs(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group],
                     f: str = "identity", h: str = "identity",
                     weights: Mapping[str, np.ndarray] | None = None, *, cosine: bool = False,
                     within: bool = False, sample_block: int = SAMPLE_BLOCK,
                     dtype: str = DEFAULT_DTYPE) -> Iterator[tuple[str, PairMatrices]]:
    """Like `pair_matrices`, one parameter at a time: yields `(param, PairMatrices of its groups)`.

    Memory is one parameter's operands and matrices (module docstring); a caller that
    reduces each parameter's matrices and drops them holds no more.
    """
    if cosine and (f != "identity" or h != "identity"):
        raise ValueError("cosine=True needs f = h = 'identity' (a weight gives the cosine in that metric)")
    if sample_block < 1:
        raise ValueError(f"sample_block must be >= 1, got {sample_block}")
    f_, h_, torch_dtype = _transform(f), _transform(h), _dtype(dtype)
    groups = list(groups)
    check_groups(store_a, store_b, groups)
    n_a, n_b = store_a.n_samples, store_b.n_samples
    for param, param_groups in _by_param(groups).items():
        units = _Units(store_a.geometry[param], param_groups)
        data_b = store_b.per_sample(param)
        if data_b.shape[0] != n_b:
            raise StoreMismatchError(f"per_sample/{param} of {store_b.path} holds {data_b.shape[0]} rows, "
                                     f"the store {n_b} samples: the store is incomplete; rerun phase 1")
        param_weight = None if weights is None else weights.get(param)
        w, hb, fb = {}, {}, {}
        for unit in units.units:
            w[unit] = None if param_weight is None else _tensor(
                units.split(np.asarray(param_weight, dtype=np.float64)[None], unit), torch_dtype)
            raw = _tensor(units.split(data_b, unit), torch_dtype)
            hb[unit] = h_(raw)
            if within or cosine:
                fb[unit] = _weighted(f_(raw), w[unit])
        del data_b
        cross = {u: np.full((hb[u].shape[0], n_a, n_b), np.nan) for u in units.units}
        sq_a = {u: np.zeros((hb[u].shape[0], n_a)) for u in units.units}
        kept_a: dict[str | None, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        within_a = {u: np.full((hb[u].shape[0], n_a, n_a), np.nan) for u in units.units} if within else {}
        for lo in range(0, n_a, sample_block):
            hi = min(lo + sample_block, n_a)
            data_a = store_a.per_sample(param, rows=slice(lo, hi))
            for unit in units.units:
                raw = _tensor(units.split(data_a, unit), torch_dtype)
                fa = _weighted(f_(raw), w[unit])
                cross[unit][:, lo:hi] = _bmm(fa, hb[unit])
                if cosine:
                    sq_a[unit][:, lo:hi] = (fa * raw).sum(-1).double().numpy()
                if within:
                    kept_a[unit].append((lo, raw))
                    for plo, prev in kept_a[unit]:
                        phi = plo + prev.shape[1]
                        within_a[unit][:, lo:hi, plo:phi] = _bmm(fa, h_(prev))
                        if plo != lo:
                            within_a[unit][:, plo:phi, lo:hi] = _bmm(_weighted(f_(prev), w[unit]), h_(raw))
            del data_a
        within_b = {u: _bmm(fb[u], hb[u]) for u in units.units} if within else {}
        sq_b = {u: (fb[u] * hb[u]).sum(-1).double().numpy() for u in units.units} if cosine else {}
        result = PairMatrices()
        for group in param_groups:
            result.cross[group] = units.matrix(cross, group)
            if within:
                result.within_a[group] = units.matrix(within_a, group)
                result.within_b[group] = units.matrix(within_b, group)
            if cosine:
                norm_a, norm_b = np.sqrt(units.matrix(sq_a, group)), np.sqrt(units.matrix(sq_b, group))
                result.cross[group] = normalise(result.cross[group], norm_a, norm_b)
                if within:
                    result.within_a[group] = normalise(result.within_a[group], norm_a, norm_a)
                    result.within_b[group] = normalise(result.within_b[group], norm_b, norm_b)
        yield param, result


def _weighted(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return x if w is None else x * w


def pair_matrices(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group],
                  f: str = "identity", h: str = "identity",
                  weights: Mapping[str, np.ndarray] | None = None, *, cosine: bool = False,
                  within: bool = False, sample_block: int = SAMPLE_BLOCK,
                  dtype: str = DEFAULT_DTYPE) -> PairMatrices:
    """Pair matrices of many groups of two stores, each stored per-sample array read once.

    Per parameter: B's per-sample array is read once in full; A's once, in blocks of
    `sample_block` samples (`store.per_sample(param, rows=slice(lo, hi))`). All heads of
    a block are one batched product; a whole q/k/v/o parameter is the sum of its heads
    (module docstring). Use `iter_param_pairs` to hold one parameter's matrices at a time.

    Args:
        store_a, store_b: opened stores of tasks A and B (the same model and per-sample
            selection).
        groups: `(param, block, head)` tuples (see `Group`); duplicates are computed once.
        f, h: transforms of A's and B's values (`identity`, `square`, `abs`).
        weights: parameter -> weight of the parameter's full shape (e.g. `1 / Fhat`), sliced
            like the data; a parameter absent here gets weight 1. None: all ones.
        cosine: divide by the per-sample norms of the group slice, in the metric of the
            weight when there is one (requires f = h = identity); zero-norm samples give
            NaN rows / columns (see `cosine_matrix`).
        within: also compute the A-A and B-B matrices (same f, h, weight) for baselines;
            their diagonals (a sample with itself) are kept, callers exclude them.
        sample_block: samples of A read at once.
        dtype: compute dtype, `float32` or `float64` (results are float64).

    Raises:
        StoreMismatchError: see `check_groups`.
    """
    result = PairMatrices()
    for _, part in iter_param_pairs(store_a, store_b, groups, f, h, weights, cosine=cosine, within=within,
                                    sample_block=sample_block, dtype=dtype):
        result.update(part)
    return result
