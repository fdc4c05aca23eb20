"""The pair engine of phases 5 (`conflicts`) and 6 (`qkov`): per-sample pair matrices.

For a slice S of two tasks' per-sample gradients, `a` `[N_A, S]` and `b` `[N_B, S]`,

    M[i, j] = sum_k f(a[i, k]) * w[k] * h(b[j, k])        f, h in {identity, square, abs}

is one matrix product `(f(a) * w) @ h(b).T`, computed in row blocks (never a Python loop
over pairs or elements). Cosine: f = h = identity, w = 1, divided by the per-sample norms.
The phase 6 unsigned score is f = square, h = abs, w = 1 / Fhat; signed and symmetric
likewise.

Precision: every block is converted to float64 *before* f, w and h are applied and the
product is accumulated in float64. The sums run over up to millions of elements of mixed
sign (signed scores, cosines of nearly orthogonal gradients), where float32 accumulation
loses about `S * 2**-24` relative precision; float64 costs about 2x a float32 matmul on
CPU, which is small next to reading the per-sample arrays. float16 stores are upcast
before any product (float16 squares of gradients ~1e-4 underflow).

Memory: `pair_matrix` holds at most `block_rows x S` float64 of each operand at once (plus
the `N_A x N_B` float64 result), whatever N is.

`pair_matrices` computes many groups (whole parameters and heads) of two stores from one
read of each stored per-sample array: per parameter, task B's array is read once in full
and task A's array is read once in sample blocks of `sample_block` rows; every group of
that parameter is sliced from those reads (see its docstring for the memory bound).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import StoreMismatchError
from .layout import HEAD_BLOCKS
from .phases.common import check_same_model
from .store import FisherStore

#: Elementwise maps applied (in float64) to one side of the product.
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "square": np.square,
    "abs": np.abs,
}
#: Default rows of each operand materialised at once by `pair_matrix`.
BLOCK_ROWS = 256
#: Default samples of task A read at once by `pair_matrices`.
SAMPLE_BLOCK = 64

#: A group: (parameter, block, head). `(param, None, None)` is the whole parameter;
#: `(param, "q", 3)` query head 3, `(param, "k", 1)` KV head 1 (k and v are per KV head).
Group = tuple[str, str | None, int | None]


def _transform(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; use one of {sorted(TRANSFORMS)}") from None


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


def pair_matrix(a: np.ndarray, b: np.ndarray, f: str = "identity", h: str = "identity",
                weight: np.ndarray | None = None, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """`M[i, j] = sum_k f(a[i, k]) * weight[k] * h(b[j, k])` as blocked float64 matrix products.

    Args:
        a: `[N_A, S]`, any float dtype (float16/float32 are upcast to float64 per block,
            before f is applied).
        b: `[N_B, S]`, likewise.
        f, h: `identity`, `square` or `abs`, applied elementwise to a and b.
        weight: `[S]` or None (all ones).
        block_rows: rows of a and of b converted and multiplied at once; memory is at most
            `block_rows x S` float64 per operand plus the result.

    Returns:
        float64 `[N_A, N_B]`.
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same slice length S, got {a.shape} and {b.shape}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    fa_, hb_ = _transform(f), _transform(h)
    w = _weight(weight, a.shape[1])
    out = np.full((a.shape[0], b.shape[0]), np.nan)  # a block never written shows as NaN
    for i in range(0, a.shape[0], block_rows):
        fa = fa_(a[i:i + block_rows].astype(np.float64))
        if w is not None:
            fa *= w
        for j in range(0, b.shape[0], block_rows):
            hb = hb_(b[j:j + block_rows].astype(np.float64))
            out[i:i + block_rows, j:j + block_rows] = fa @ hb.T
    return out


def row_norms(x: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Euclidean norm of every row of `x` `[N, S]`, float64 `[N]`, in row blocks."""
    x = _as_2d(x, "x")
    return np.concatenate([np.sqrt(np.square(x[i:i + block_rows].astype(np.float64)).sum(1))
                           for i in range(0, x.shape[0], block_rows)] or [np.zeros(0)])


def normalise(matrix: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """`matrix / outer(norms_a, norms_b)`; rows / columns of zero-norm samples become NaN."""
    na = np.where(norms_a > 0, norms_a, np.nan)
    nb = np.where(norms_b > 0, norms_b, np.nan)
    return matrix / np.outer(na, nb)


def cosine_matrix(a: np.ndarray, b: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Cosine similarity of every row of `a` `[N_A, S]` with every row of `b` `[N_B, S]`.

    A sample whose slice is all zero has no direction: its row (a) or column (b) is NaN,
    never 0, so callers cannot mistake it for orthogonality; drop or count it explicitly.

    Returns:
        float64 `[N_A, N_B]`.
    """
    return normalise(pair_matrix(a, b, block_rows=block_rows),
                     row_norms(a, block_rows), row_norms(b, block_rows))


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


def pair_matrices(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group],
                  f: str = "identity", h: str = "identity",
                  weights: Mapping[str, np.ndarray] | None = None, *, cosine: bool = False,
                  within: bool = False, sample_block: int = SAMPLE_BLOCK,
                  block_rows: int = BLOCK_ROWS) -> PairMatrices:
    """Pair matrices of many groups of two stores, each stored per-sample array read once.

    Per parameter: B's per-sample array is read once in full (stored dtype); A's is read
    once, in blocks of `sample_block` samples (`store.per_sample(param, rows=slice(lo, hi))`);
    from each A block every group of the parameter is sliced and its rows of the cross
    matrix are computed against B's slice with `pair_matrix` (float64, `block_rows`).

    Memory: `N_B x P` of B's stored array plus `sample_block x P` of A's (P: the
    parameter's size) and the `N_A x N_B` results; with `within=True` A's group slices are
    kept as they arrive (A-A needs every pair), adding about `N_A x P`.

    Args:
        store_a, store_b: opened stores of tasks A and B (the same model and per-sample
            selection).
        groups: `(param, block, head)` tuples (see `Group`); duplicates are computed once.
        f, h: transforms of A's and B's values (`identity`, `square`, `abs`).
        weights: parameter -> weight of the parameter's full shape (e.g. `1 / Fhat`), sliced
            like the data; a parameter absent here gets weight 1. None: all ones.
        cosine: divide by per-sample norms of the group slice (requires f = h = identity and
            no weight); zero-norm samples give NaN rows / columns (see `cosine_matrix`).
        within: also compute the A-A and B-B matrices (same f, h, weight) for baselines;
            their diagonals (a sample with itself) are kept, callers exclude them.
        sample_block: samples of A read at once.
        block_rows: rows per operand in each matrix product.

    Raises:
        StoreMismatchError: see `check_groups`.
    """
    if cosine and (f != "identity" or h != "identity" or weights):
        raise ValueError("cosine=True needs f = h = 'identity' and no weights")
    if sample_block < 1:
        raise ValueError(f"sample_block must be >= 1, got {sample_block}")
    _transform(f), _transform(h)
    groups = list(groups)
    check_groups(store_a, store_b, groups)
    n_a, n_b = store_a.n_samples, store_b.n_samples
    result = PairMatrices()
    for param, param_groups in _by_param(groups).items():
        data_b = store_b.per_sample(param)
        if data_b.shape[0] != n_b:
            raise StoreMismatchError(f"per_sample/{param} of {store_b.path} holds {data_b.shape[0]} rows, "
                                     f"the store {n_b} samples: the store is incomplete; rerun phase 1")
        param_weight = None if weights is None else weights.get(param)
        slices_b, w, norms_b = {}, {}, {}
        for group in param_groups:
            slices_b[group] = group_slice(store_b, group, data_b)
            w[group] = None if param_weight is None else group_weight(store_b, group, param_weight)
            result.cross[group] = np.full((n_a, n_b), np.nan)
            if cosine:
                norms_b[group] = row_norms(slices_b[group], block_rows)
            if within:
                result.within_b[group] = pair_matrix(slices_b[group], slices_b[group], f, h, w[group], block_rows)
                result.within_a[group] = np.full((n_a, n_a), np.nan)
        del data_b
        norms_a: dict[Group, list[np.ndarray]] = defaultdict(list)
        kept_a: dict[Group, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for lo in range(0, n_a, sample_block):
            hi = min(lo + sample_block, n_a)
            data_a = store_a.per_sample(param, rows=slice(lo, hi))
            for group in param_groups:
                part = group_slice(store_a, group, data_a)
                result.cross[group][lo:hi] = pair_matrix(part, slices_b[group], f, h, w[group], block_rows)
                if cosine:
                    norms_a[group].append(row_norms(part, block_rows))
                if within:
                    aa = result.within_a[group]
                    kept_a[group].append((lo, part))
                    for plo, prev in kept_a[group]:
                        aa[lo:hi, plo:plo + len(prev)] = pair_matrix(part, prev, f, h, w[group], block_rows)
                        if plo != lo:
                            aa[plo:plo + len(prev), lo:hi] = pair_matrix(prev, part, f, h, w[group], block_rows)
        if cosine:
            for group in param_groups:
                na = np.concatenate(norms_a[group]) if norms_a[group] else np.zeros(0)
                result.cross[group] = normalise(result.cross[group], na, norms_b[group])
                if within:
                    result.within_a[group] = normalise(result.within_a[group], na, na)
                    result.within_b[group] = normalise(result.within_b[group], norms_b[group], norms_b[group])
    return result
