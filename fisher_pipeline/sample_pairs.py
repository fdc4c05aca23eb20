"""The sample-pair engine of phases 5 (`conflicts`) and 6 (`qkov`): per-sample pair matrices.

For a slice S of two tasks' per-sample gradients, `a` `[N_A, S]` and `b` `[N_B, S]`,

    M[i, j] = sum_k f(a[i, k]) * w[k] * h(b[j, k])        f, h in {identity, square, abs}

is one matrix product `(f(a) * w) @ h(b).T` (never a Python loop over pairs or elements).
Cosine: f = h = identity, divided by the per-sample norms `sqrt(sum_k w[k] x[k]^2)`, so
with a weight it is the cosine in the metric `w` (phase 5's Fisher-normalised
similarity). The phase 6 unsigned score is f = square, h = abs, w = 1 / Fhat; signed and
symmetric likewise.

Batched heads. All heads of one block of a parameter are one batched product
`[H, n_A, S_h] @ [H, S_h, n_B]` (`torch.bmm`): the heads are cut from the stored array
as a strided view at the positions the store's geometry gives, and converted in one copy
into a buffer reused across parameters (a fresh buffer would cost a page fault per 4 kB,
10x the conversion itself). A whole parameter
whose head blocks partition it (q/k/v/o projections, fused QKV) is the sum of its heads'
matrices, because M is a sum over elements: it costs no extra product. Other parameters
(MLP, norms) are one product over all their elements.

Precision. Stored blocks are converted to the compute dtype (`float32` by default,
`float64` on request) *before* f, w and h are applied, so float16 stores never square or
multiply in float16 (squares of gradients ~1e-4 underflow there). float32 products of
length S carry a relative error of about `sqrt(S) * 6e-8` of `sum_k |f(a_k) w_k h(b_k)|`
(~3e-5 for a 576 x 576 projection): two orders below the 5e-4 rounding of float16
storage, and far below the sampling noise the pair phases test against. Results are
returned in float64 and heads are summed in float64. float64 compute costs ~3x (its
conversion and product), which on CPU is more than reading the stores. `bfloat16` keeps
the operands and every O(N S) pass in float32 and runs only the N x N products in bfloat16
(float32 accumulation, a bfloat16 result): each operand rounds by up to 2^-8, so an entry
moves by up to 2^-7 of its sum of |terms| plus 2^-8 of itself (a cosine by 3 x 2^-8), for
products ~3x faster on CPUs with AVX512-BF16 and on GPUs (docs/benchmarks.md).

Reading and memory (`pair_matrices`, `iter_param_pairs`). Per parameter, both tasks'
per-sample arrays are read in blocks of `sample_block` samples: for each block of A, every
block of B. When B fits in one block (N_B <= sample_block) it is read once and kept, so
each stored array is read once per task pair; beyond, B's array is read once per block of
A. All groups (whole parameter and heads) come from those reads. Memory is bounded by the
blocks, not by N: a few `sample_block x S` operand copies of each task in the compute dtype,
plus the `N_A x N_B` float64 matrices of the parameter's groups. `iter_param_pairs` yields
them one parameter at a time so a caller can reduce and drop them. Within-task baselines
(mean cosine or raw product of distinct pairs of one task) come from O(N S) sums, not N x N
matrices, and so do `marginals`: the row and column sums of a pair matrix that is never
formed (phase 6's unsigned score needs only those).

Device. `device="cuda"` converts the blocks into buffers on the GPU and runs every product
and sum there; stores are read on the host and results come back as float64 numpy arrays.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError, StoreMismatchError
from .layout import HEAD_BLOCKS, ParamGeometry
from .store import FisherStore, check_same_model

#: Elementwise maps applied (in the compute dtype) to one side of the product.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "square": torch.square,
    "abs": torch.abs,
}
#: Compute dtypes: name -> (dtype of the operands and every O(N S) pass, dtype of the
#: N x N products). Results are always float64.
DTYPES = {"float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64),
          "bfloat16": (torch.float32, torch.bfloat16)}
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


def _dtypes(name: str) -> tuple[torch.dtype, torch.dtype]:
    """(operand dtype, product dtype) of compute dtype `name` (see `DTYPES`)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown compute dtype {name!r}; use one of {sorted(DTYPES)}") from None


def pair_device(name: str, key: str = "device") -> torch.device:
    """The torch device of a pair phase's `device` setting (`cpu`, `cuda`, `auto`).

    Raises:
        ConfigError: `cuda` where no CUDA device is visible, or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = cuda, but no CUDA device is visible to this process (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): set {key} to cpu or auto, "
                          "or run on a GPU node")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"{key} = {name!r}: use cpu, cuda or auto")
    return torch.device(name)


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
    return torch.bmm(left, right.transpose(1, 2)).double().cpu().numpy()


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
        dtype: compute dtype, `float32`, `float64` or `bfloat16` (see the module docstring).

    Returns:
        float64 `[N_A, N_B]`.
    """
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same slice length S, got {a.shape} and {b.shape}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    (fa_, hb_), (torch_dtype, product_dtype) = (_transform(f), _transform(h)), _dtypes(dtype)
    w = _weight(weight, a.shape[1])
    w = None if w is None else torch.from_numpy(w).to(torch_dtype)
    out = np.full((a.shape[0], b.shape[0]), np.nan)  # a block never written shows as NaN
    for i in range(0, a.shape[0], block_rows):
        fa = fa_(_tensor(a[i:i + block_rows, None], torch_dtype))
        if w is not None:
            fa = fa * w
        for j in range(0, b.shape[0], block_rows):
            hb = hb_(_tensor(b[j:j + block_rows, None], torch_dtype))
            out[i:i + block_rows, j:j + block_rows] = _bmm(fa.to(product_dtype), hb.to(product_dtype))[0]
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


class LazyWeights(Mapping):
    """Parameter -> weight (float64, the parameter's shape), made by `make(param)` when the
    pair engine asks for it (once per parameter): one parameter's weight in memory at a time,
    not the model's."""

    def __init__(self, params: Sequence[str], make: Callable[[str], np.ndarray]) -> None:
        self.params, self._make = list(params), make

    def __getitem__(self, param: str) -> np.ndarray:
        if param not in self.params:
            raise KeyError(param)
        return self._make(param)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class PairMatrices:
    """Pair matrices per group, float64, and within-task baselines.

    Attributes:
        cross: group -> `[N_A, N_B]` (A's sample i against B's sample j).
        within_a: group -> mean similarity of distinct pairs (i != j) of A's samples
            (`within=True`): with `cosine`, the mean cosine over the samples with a non-zero
            gradient in the group; otherwise the mean raw product `<g_i, g_j>_w` of the
            identity transform in the weight's metric, an unbiased estimate of `|E g|_w^2`
            (NaN with fewer than two samples).
        within_b: group -> the same for B.
        products: name -> group -> `[N_A, N_B]` of each extra product asked for
            (`products={name: (f, h)}`, same weight), from the same reads.
        marginals: name -> group -> `(row_sums [N_A], col_sums [N_B])` of a pair matrix
            never formed (`marginals={name: (f, h)}`, same weight): `sum_j M[i, j] =
            f(a_i) w . sum_j h(b_j)`, O(N S) where the matrix costs O(N_A N_B S).
    """

    cross: dict[Group, np.ndarray] = field(default_factory=dict)
    within_a: dict[Group, float] = field(default_factory=dict)
    within_b: dict[Group, float] = field(default_factory=dict)
    products: dict[str, dict[Group, np.ndarray]] = field(default_factory=dict)
    marginals: dict[str, dict[Group, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

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
        for name, matrices in other.products.items():
            self.products.setdefault(name, {}).update(matrices)
        for name, sums in other.marginals.items():
            self.marginals.setdefault(name, {}).update(sums)


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
        self.wants_whole = any(block is None for _, block, _ in groups)
        self.whole_from_heads = self.wants_whole and heads_partition(geometry)
        if self.whole_from_heads:
            blocks |= set(geometry.head_blocks())
        ordered = [b for b in geometry.head_blocks() if b in blocks]
        self.units: list[str | None] = [*ordered, *([None] if self.wants_whole and not self.whole_from_heads else [])]

    def tensor(self, data: np.ndarray, unit: str | None, dtype: torch.dtype,
               scratch: _Scratch | None = None, slot: str = "", scale: torch.Tensor | None = None) -> torch.Tensor:
        """`[n, *shape]` stored rows -> `[H, n, S_h]` of `dtype`, in one converting copy
        (times `scale` `[H, 1, S_h]` in the same pass when given).

        The heads are cut from the stored array as a strided view (an index copy only for
        non-contiguous layouts such as NeoX's interleaved heads) and copied into a
        `scratch` buffer of `dtype` reused across parameters of the same shape.
        """
        view = self.view(data, unit)
        out = (scratch or _Scratch()).take(slot, tuple(view.shape), dtype)
        if scale is None:
            out.copy_(view)
        else:
            torch.mul(view, scale.view(scale.shape[0], 1, *view.shape[2:]), out=out)
        return out.view(out.shape[0], out.shape[1], -1)

    def view(self, data: np.ndarray, unit: str | None) -> torch.Tensor:
        """`[n, *shape]` stored rows -> a view `[H, n, ...]` of the unit's heads, in the stored dtype
        (a copy only for non-contiguous layouts); `.reshape(H, n, -1)` of a copy is `[H, n, S_h]`."""
        source = _from_numpy(data)
        if unit is None:
            view = source.reshape(1, source.shape[0], -1)
        else:
            positions = self.geometry.positions(unit)  # [H, d]
            n_heads, size = positions.shape
            dim = 1 + self.geometry.groups.dim
            flat = positions.ravel()
            start = int(flat[0])
            if np.array_equal(flat, np.arange(start, start + flat.size)):
                view = source.narrow(dim, start, flat.size)
            else:
                view = source.index_select(dim, torch.from_numpy(flat))
            view = view.unflatten(dim, (n_heads, size)).movedim(dim, 0)  # [H, n, ..., d, ...]
        return view

    def n_heads(self, unit: str | None) -> int:
        """H of a unit: its block's heads, 1 for the whole parameter."""
        return 1 if unit is None else int(self.geometry.positions(unit).shape[0])

    def whole(self, per_unit: Mapping[str | None, np.ndarray]) -> np.ndarray:
        """The whole parameter's value from per-unit stacks `[H, ...]`."""
        if self.whole_from_heads:
            return sum(per_unit[unit].sum(axis=0) for unit in self.units)
        return per_unit[None][0]

    def matrix(self, per_unit: Mapping[str | None, np.ndarray], group: Group) -> np.ndarray:
        """Group `group`'s value from per-unit stacks `[H, ...]`."""
        _, block, head = group
        return per_unit[block][head] if block is not None else self.whole(per_unit)


class _Scratch:
    """Operand buffers reused across blocks and parameters, one per slot.

    A fresh tensor of tens of MB is new memory, and touching it costs a page fault per
    4 kB: about 1 ns per element on CPU, ten times the float16 -> float32 conversion
    itself (0.1 ns). A slot (the operand's role and the unit's position in its parameter)
    holds one flat buffer, grown to the largest request and viewed in each shape, so memory
    is one set of operands of the largest parameter, however many shapes the model has.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A `shape` tensor of `dtype` in slot `slot` (its contents are whatever was there)."""
        key, size = (slot, dtype), math.prod(shape)
        if key not in self._buffers or self._buffers[key].numel() < size:
            self._buffers.pop(key, None)  # release the smaller buffer first
            self._buffers[key] = torch.empty(size, dtype=dtype, device=self.device)
        return self._buffers[key][:size].view(shape)


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x if x.flags.writeable else np.array(x))


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    """`[lo, hi)` row ranges of `size` covering `0..n`."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _read_rows(store: FisherStore, param: str, lo: int, hi: int) -> np.ndarray:
    """Rows `lo..hi` of `per_sample/param`, refusing an array shorter than the store's samples."""
    data = store.per_sample(param, rows=slice(lo, hi))
    if data.shape[0] != hi - lo:
        raise StoreMismatchError(f"per_sample/{param} of {store.path} holds fewer rows than the store's "
                                 f"{store.n_samples} samples (rows {lo}..{hi} asked, {data.shape[0]} read): the "
                                 "store is incomplete; rerun phase 1")
    return data


class _ReadAhead:
    """Block reads in the engine's order, the next one read in a background thread while the
    current one is computed on (one block in flight: memory grows by one stored block).

    On the CPU the products are compute-bound at large N while a read is mostly copying, so
    the two overlap; a read's error is raised where that block is used.
    """

    def __init__(self, requests: list[tuple[FisherStore, str, int, int]]):
        from concurrent.futures import ThreadPoolExecutor

        self._requests = iter(requests)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pair-reads")
        self._next = self._submit()

    def _submit(self):
        request = next(self._requests, None)
        return None if request is None else (request, self._pool.submit(_read_rows, *request))

    def read(self, store: FisherStore, param: str, lo: int, hi: int) -> np.ndarray:
        """Rows `lo..hi` of `per_sample/param` of `store`: the block read ahead, if it is this one."""
        pending, self._next = self._next, None
        if pending is None or pending[0] != (store, param, lo, hi):  # out of order: read it now
            if pending is not None:
                pending[1].cancel()
            return _read_rows(store, param, lo, hi)
        self._next = self._submit()
        return pending[1].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _read_order(store_a: FisherStore, store_b: FisherStore, params: Sequence[str], blocks_a: list[tuple[int, int]],
                blocks_b: list[tuple[int, int]]) -> list[tuple[FisherStore, str, int, int]]:
    """Every block read of `iter_param_pairs`, in its order: per parameter, each block of A, then
    every block of B (B only after A's first block when B is one block, held after)."""
    order = []
    for param in params:
        for index, (lo_a, hi_a) in enumerate(blocks_a):
            order.append((store_a, param, lo_a, hi_a))
            if index == 0 or len(blocks_b) > 1:
                order += [(store_b, param, lo_b, hi_b) for lo_b, hi_b in blocks_b]
    return order


def _host(x: torch.Tensor) -> np.ndarray:
    """A tensor on any device as a float64 numpy array on the host."""
    return x.double().cpu().numpy()


class _Within:
    """Streamed sums for the mean product of distinct pairs within one task, per unit.

    `normalise=True` (cosines): with `u_i = x_i / |x_i|` (0 for a zero vector) over n_ok
    non-zero samples, `sum_{i != j} cos(x_i, x_j) = |sum_i u_i|^2 - n_ok`.
    `normalise=False` (raw products in the metric of `weights`): over all n samples,
    `sum_{i != j} <x_i, x_j>_w = sum_k w_k (sum_i x_ik)^2 - sum_k sum_i w_k x_ik^2`, so the
    mean is an unbiased estimate of `|E x|_w^2`, from two column sums of the rows
    (`add_columns`; the caller has `x^2 w` at hand). Either way O(N S), no N x N matrix.
    """

    def __init__(self, units: _Units, normalise: bool = True,
                 weights: Mapping[str | None, torch.Tensor | None] | None = None):
        self.units = units
        self.normalise = normalise
        self.weights = weights or {}  # unit -> [H, 1, S] metric of the raw products (None: ones)
        self.heads: dict[str | None, torch.Tensor] = {}  # unit -> [H, S] sum of (head-normalised) rows
        self.whole: dict[str | None, torch.Tensor] = {}  # unit -> [H, S] sum of rows normalised by the whole
        self.n_heads: dict[str | None, np.ndarray] = {}  # unit -> [H] samples counted per head
        self.squares: dict[str | None, torch.Tensor] = {}  # unit -> [H, S] sum of w x^2 over rows (raw products)
        self.n_whole = 0

    def add_columns(self, unit: str | None, rows: torch.Tensor, squares: torch.Tensor, n: int,
                    weighted_rows: bool = False) -> None:
        """Raw products: one block of n rows of `unit` as `sum_i x_i` (`sum_i w x_i` if `weighted_rows`)
        and `sum_i w x_i^2`, each `[H, S]`."""
        if weighted_rows:
            rows = rows.double() / self.weights[unit][:, 0].double()
        self._accumulate(self.heads, unit, rows)
        self._accumulate(self.squares, unit, squares)
        self.n_heads[unit] = self.n_heads.get(unit, 0) + np.full(rows.shape[0], n)
        if unit == self.units.units[0]:
            self.n_whole += n

    def add(self, raw: Mapping[str | None, torch.Tensor], sq: Mapping[str | None, torch.Tensor]) -> None:
        """Cosines: one block of rows `raw[unit]` `[H, n, S]` and their squared norms `sq[unit]` `[H, n]`."""
        whole_sq = sum(s.sum(0) for s in sq.values()) if self.units.whole_from_heads else None
        for unit, x in raw.items():
            # one pass over x: sum_i x_i / |x_i|_head and, for a whole made of heads, / |x_i|_whole
            coefficients = [_inverse_norm(sq[unit])]  # [H, n]
            if whole_sq is not None:
                coefficients.append(_inverse_norm(whole_sq)[None].expand(x.shape[0], -1))
            sums = torch.bmm(torch.stack(coefficients, 1).to(x.dtype), x)  # [H, 1 or 2, S]
            self._accumulate(self.heads, unit, sums[:, 0])
            if whole_sq is not None:
                self._accumulate(self.whole, unit, sums[:, 1])
            self.n_heads[unit] = self.n_heads.get(unit, 0) + (sq[unit] > 0).sum(1).cpu().numpy()
        if whole_sq is not None:
            self.n_whole += int((whole_sq > 0).sum())

    @staticmethod
    def _accumulate(target: dict, unit: str | None, value: torch.Tensor) -> None:
        value = value.double()
        target[unit] = target[unit] + value if unit in target else value

    def _raw(self, unit: str | None, index: int | slice) -> tuple[float, float]:
        """`(sum_k w_k (sum_i x_ik)^2, sum_k sum_i w_k x_ik^2)` of head(s) `index` of `unit`."""
        weight = self.weights.get(unit)
        weight = 1.0 if weight is None else weight[:, 0].double()[index]
        return float(torch.sum(weight * self.heads[unit][index] ** 2)), float(torch.sum(self.squares[unit][index]))

    def mean(self, group: Group) -> float:
        _, block, head = group
        if block is not None or not self.units.whole_from_heads:
            unit, index = (block, head) if block is not None else (None, 0)
            n = int(self.n_heads[unit][index])
            total, diagonal = (float(torch.sum(self.heads[unit][index] ** 2)), n) if self.normalise else \
                self._raw(unit, index)
        elif self.normalise:
            total, n = sum(float(torch.sum(s ** 2)) for s in self.whole.values()), self.n_whole
            diagonal = n
        else:  # the whole is the sum of its heads: squared sums and diagonals add up
            parts = [self._raw(unit, slice(None)) for unit in self.heads]
            total, diagonal, n = sum(t for t, _ in parts), sum(d for _, d in parts), self.n_whole
        return (total - diagonal) / (n * (n - 1)) if n > 1 else math.nan


def _inverse_norm(sq: torch.Tensor) -> torch.Tensor:
    return torch.where(sq > 0, sq.clamp_min(1e-300).rsqrt(), torch.zeros((), dtype=sq.dtype))


def iter_param_pairs(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group],
                     f: str = "identity", h: str = "identity",
                     weights: Mapping[str, np.ndarray] | None = None, *, cosine: bool = False,
                     within: bool = False, sample_block: int = SAMPLE_BLOCK,
                     dtype: str = DEFAULT_DTYPE,
                     products: Mapping[str, tuple[str, str]] | None = None,
                     marginals: Mapping[str, tuple[str, str]] | None = None,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, PairMatrices]]:
    """Like `pair_matrices`, one parameter at a time: yields `(param, PairMatrices of its groups)`.

    Memory is one parameter's operand blocks and matrices (module docstring);
    a caller that reduces each parameter's matrices and drops them holds no more.
    """
    if cosine and (f != "identity" or h != "identity"):
        raise ValueError("cosine=True needs f = h = 'identity' (a weight gives the cosine in that metric)")
    if (products or marginals) and cosine:
        raise ValueError("products and marginals are raw (un-normalised) matrices: not with cosine=True")
    specs = {"": (f, h)} | dict(products or {})  # product name -> (f, h) transform names
    margin_specs = dict(marginals or {})
    for f_name, h_name in [*specs.values(), *margin_specs.values()]:
        _transform(f_name), _transform(h_name)  # an unknown name fails here, before any read
    if sample_block < 1:
        raise ValueError(f"sample_block must be >= 1, got {sample_block}")
    torch_dtype, product_dtype = _dtypes(dtype)
    torch_device = torch.device(device)
    groups = list(groups)
    check_groups(store_a, store_b, groups)
    n_a, n_b = store_a.n_samples, store_b.n_samples
    blocks_a, blocks_b = _blocks(n_a, sample_block), _blocks(n_b, sample_block)
    f_names = {f_name for f_name, _ in [*specs.values(), *margin_specs.values()]}
    h_names = {h_name for _, h_name in [*specs.values(), *margin_specs.values()]}
    scratch = _Scratch(torch_device)
    by_param = _by_param(groups)
    reads = _ReadAhead(_read_order(store_a, store_b, list(by_param), blocks_a, blocks_b))
    try:
        yield from _param_pairs(store_a, store_b, by_param, specs, margin_specs, weights, cosine, within, blocks_a,
                                blocks_b, torch_dtype, product_dtype, f_names, h_names, scratch, reads)
    finally:
        reads.close()


def _param_pairs(store_a, store_b, by_param, specs, margin_specs, weights, cosine, within, blocks_a, blocks_b,
                 torch_dtype, product_dtype, f_names, h_names, scratch, reads) -> Iterator[tuple[str, PairMatrices]]:
    """The body of `iter_param_pairs`, one parameter at a time (module docstring)."""
    torch_device = scratch.device
    product_f, product_h = {f for f, _ in specs.values()}, {h for _, h in specs.values()}
    n_a, n_b = store_a.n_samples, store_b.n_samples
    for param, param_groups in by_param.items():
        units = _Units(store_a.geometry[param], param_groups)
        param_weight = None if weights is None else weights.get(param)
        # cosine in the metric w: scale both sides by sqrt(w); otherwise w multiplies f(a)
        if param_weight is not None:
            param_weight = np.asarray(param_weight, dtype=np.float64)
            param_weight = np.sqrt(param_weight) if cosine else param_weight
        scale = {u: None if param_weight is None else units.tensor(param_weight[None], u, torch_dtype).to(torch_device)
                 for u in units.units}  # no scratch: small, and alive with the operands
        n_heads = {u: units.n_heads(u) for u in units.units}
        cross = {name: {u: np.full((n_heads[u], n_a, n_b), np.nan) for u in units.units} for name in specs}
        margin = {name: {u: (np.zeros((n_heads[u], n_a)), np.zeros((n_heads[u], n_b))) for u in units.units}
                  for name in margin_specs}
        sq_a = {u: np.zeros((n_heads[u], n_a)) for u in units.units}
        sq_b = {u: np.zeros((n_heads[u], n_b)) for u in units.units}
        # raw within-task products in the weight's metric (cosines: rows already scaled by its root)
        within_a, within_b = ((_Within(units, cosine, None if cosine else scale),
                               _Within(units, cosine, None if cosine else scale)) if within else (None, None))
        held_b = None  # B's converted operands, kept across A's blocks when B is one block
        for index_a, (lo_a, hi_a) in enumerate(blocks_a):
            data_a = reads.read(store_a, param, lo_a, hi_a)
            if not cosine:
                fa, f_sums = _a_operands(data_a, units, scale, f_names, {f for f, _ in margin_specs.values()},
                                         torch_dtype, scratch, within_a)
            raw = {u: units.tensor(data_a, u, torch_dtype, scratch, f"a{index}", scale[u])
                   for index, u in enumerate(units.units)} if cosine else {}
            del data_a
            if cosine:
                sq = {u: _squares(x) for u, x in raw.items()}
                for u in units.units:
                    sq_a[u][:, lo_a:hi_a] = sq[u].cpu().numpy()
                if within_a is not None:
                    within_a.add(raw, sq)
                fa = {"identity": raw}
            fa_product = _in_product_dtype(fa, product_f, product_dtype, scratch, "pa")
            for lo_b, hi_b in blocks_b:
                if held_b is None:
                    first = index_a == 0  # B's norms and within sums: once, with A's first block
                    hb = _b_operands(reads.read(store_b, param, lo_b, hi_b), (lo_b, hi_b), units, torch_dtype,
                                     scratch, h_names,
                                     {h for _, h in margin_specs.values()}, scale, cosine, sq_b if first else None,
                                     within_b if first else None)
                    hb_product = _in_product_dtype(hb, product_h, product_dtype, scratch, "pb")
                    if len(blocks_b) == 1:
                        held_b = hb, hb_product
                else:
                    hb, hb_product = held_b
                for name, (f_name, h_name) in specs.items():
                    for u in units.units:
                        cross[name][u][:, lo_a:hi_a, lo_b:hi_b] = _bmm(fa_product[f_name][u], hb_product[h_name][u])
                for name, (f_name, h_name) in margin_specs.items():
                    for u in units.units:
                        rows, cols = margin[name][u]
                        h_sum = hb[f"sum {h_name}"][u]  # [H, S] this block of B, summed
                        rows[:, lo_a:hi_a] += _host(torch.bmm(fa[f_name][u], h_sum[:, :, None])[..., 0])
                        cols[:, lo_b:hi_b] += _host(torch.bmm(hb[h_name][u], f_sums[f_name][u][:, :, None])[..., 0])
            del raw, fa, fa_product
        yield param, _param_result(units, param_groups, cross, margin, sq_a, sq_b, within_a, within_b, cosine)


def _in_product_dtype(operands: Mapping[str, Mapping], names: set[str], dtype: torch.dtype, scratch: _Scratch,
                      side: str) -> Mapping[str, Mapping]:
    """The operands `names` (`{name: {unit: [H, n, S]}}`) as the N x N products take them: the
    same tensors where they already have `dtype`, else converted into scratch slots `side...`.

    bfloat16 products (float32 accumulation, a bfloat16 result) run ~3x faster than float32
    ones where the CPU has AVX512-BF16 (or on a GPU); every O(N S) pass stays in float32.
    """
    if all(x.dtype == dtype for name in names for x in operands[name].values()):
        return operands
    return {name: {u: scratch.take(f"{side}{name}{index}", tuple(x.shape), dtype).copy_(x)
                   for index, (u, x) in enumerate(operands[name].items())} for name in names}


def _a_operands(data: np.ndarray, units: _Units, scale: Mapping[str | None, torch.Tensor | None],
                f_names: set[str], margin_f: set[str], dtype: torch.dtype, scratch: _Scratch,
                within_a: _Within | None) -> tuple[dict[str, dict], dict[str, dict]]:
    """A block of A's stored rows `[n, *shape]` -> `({f: {unit: f(x) w}}, {f: {unit: sum_i f(x_i) w}})`
    for the transforms `f_names` (sums for `margin_f`), adding the block to `within_a`.

    Passes over the rows are shared: the conversion, `x w`, then `x^2 w = (x w) x`, both the
    `square` operand and, summed over rows, the within-task diagonal, and `|x| w = |x w|`
    (w > 0). (Multiplying the stored float16 rows directly, without the conversion, is
    slower: torch's mixed-dtype products are not vectorised.)
    """
    fa: dict[str, dict] = {f_name: {} for f_name in f_names}
    sums: dict[str, dict] = {f_name: {} for f_name in margin_f}
    for u in units.units:
        x, w = units.tensor(data, u, dtype, scratch, f"a{units.units.index(u)}"), scale[u]  # [H, n, S]
        shape, n = tuple(x.shape), x.shape[1]
        weighted = x if w is None else torch.mul(x, w, out=scratch.take(f"fi{units.units.index(u)}", shape, dtype))
        if "identity" in f_names:
            fa["identity"][u] = weighted
        if "square" in f_names or within_a is not None:
            square = torch.mul(weighted, x, out=scratch.take(f"fs{units.units.index(u)}", shape, dtype))
            square_sum = square.sum(1)
            if "square" in f_names:
                fa["square"][u] = square
                if "square" in margin_f:
                    sums["square"][u] = square_sum
            if within_a is not None:
                within_a.add_columns(u, weighted.sum(1), square_sum, n, weighted_rows=w is not None)
        if "abs" in f_names:
            fa["abs"][u] = torch.abs(weighted, out=scratch.take(f"fa{units.units.index(u)}", shape, dtype))
        for f_name in margin_f - {"square"}:
            sums[f_name][u] = fa[f_name][u].sum(1)
    return fa, sums


def _b_operands(data: np.ndarray, lo_hi: tuple[int, int], units: _Units, dtype: torch.dtype,
                scratch: _Scratch, h_names: set[str], margin_h: set[str],
                scale: Mapping[str | None, torch.Tensor | None], cosine: bool, sq_b: dict | None,
                within_b: _Within | None) -> dict[str, dict]:
    """A block of B's stored rows `[n, *shape]` (rows `lo..hi` of the task): `{h name: {unit: h(rows)
    [H, n, S_h]}}` in scratch buffers,
    and `{"sum " + h name: {unit: sum_j h(rows_j) [H, S_h]}}` for the names in `margin_h`.

    With `cosine` the rows are scaled by `scale` (the root of the metric) as they are
    converted; with `sq_b` their squared norms are written there; with `within_b` they are
    added to B's within-task sums (raw products: in the metric `scale`).
    """
    lo, hi = lo_hi
    raw = {u: units.tensor(data, u, dtype, scratch, f"b{index}", scale[u] if cosine else None)
           for index, u in enumerate(units.units)}
    del data
    out: dict[str, dict] = {h_name: {} for h_name in h_names} | {f"sum {h_name}": {} for h_name in margin_h}
    for u, x in raw.items():
        if cosine:
            out["identity"][u] = x
            continue
        if "square" in h_names or within_b is not None:
            square = torch.mul(x, x, out=scratch.take(f"hs{units.units.index(u)}", tuple(x.shape), x.dtype))
            if "square" in h_names:
                out["square"][u] = square
            if within_b is not None:
                w = scale[u]
                square_sum = square.sum(1)
                within_b.add_columns(u, x.sum(1), square_sum if w is None else square_sum * w[:, 0], hi - lo)
        if "identity" in h_names:
            out["identity"][u] = x
        if "abs" in h_names:
            out["abs"][u] = torch.abs(x, out=scratch.take(f"ha{units.units.index(u)}", tuple(x.shape), x.dtype))
        for h_name in margin_h:
            out[f"sum {h_name}"][u] = out[h_name][u].sum(1)
    if cosine and (sq_b is not None or within_b is not None):
        sq = {u: _squares(x) for u, x in raw.items()}
        if sq_b is not None:
            for u in units.units:
                sq_b[u][:, lo:hi] = sq[u].cpu().numpy()
        if within_b is not None:
            within_b.add(raw, sq)
    return out


def _param_result(units: _Units, groups: Sequence[Group], cross: dict, margin: dict, sq_a: dict, sq_b: dict,
                  within_a: _Within | None, within_b: _Within | None, cosine: bool) -> PairMatrices:
    """One parameter's per-unit stacks -> its groups' matrices, marginals and baselines."""
    result = PairMatrices()
    whole_sq_a = units.whole(sq_a) if cosine and units.wants_whole else None
    whole_sq_b = units.whole(sq_b) if cosine and units.wants_whole else None
    for group in groups:
        matrix = units.matrix(cross[""], group)
        for name in cross.keys() - {""}:
            result.products.setdefault(name, {})[group] = units.matrix(cross[name], group)
        for name, per_unit in margin.items():
            rows = units.matrix({u: sums[0] for u, sums in per_unit.items()}, group)
            cols = units.matrix({u: sums[1] for u, sums in per_unit.items()}, group)
            result.marginals.setdefault(name, {})[group] = (rows, cols)
        if cosine:
            if group[1] is None:
                norm_a, norm_b = np.sqrt(whole_sq_a), np.sqrt(whole_sq_b)
            else:
                norm_a, norm_b = np.sqrt(sq_a[group[1]][group[2]]), np.sqrt(sq_b[group[1]][group[2]])
            matrix = normalise(matrix, norm_a, norm_b)
        result.cross[group] = matrix
        if within_a is not None:
            result.within_a[group] = within_a.mean(group)
            result.within_b[group] = within_b.mean(group)
    return result


def _squares(x: torch.Tensor) -> torch.Tensor:
    """Squared norms of the rows, `[H, n, S] -> [H, n]` float64."""
    return torch.linalg.vector_norm(x, dim=-1).double() ** 2


def pair_matrices(store_a: FisherStore, store_b: FisherStore, groups: Sequence[Group],
                  f: str = "identity", h: str = "identity",
                  weights: Mapping[str, np.ndarray] | None = None, *, cosine: bool = False,
                  within: bool = False, sample_block: int = SAMPLE_BLOCK,
                  dtype: str = DEFAULT_DTYPE,
                  products: Mapping[str, tuple[str, str]] | None = None,
                  marginals: Mapping[str, tuple[str, str]] | None = None,
                  device: str | torch.device = "cpu") -> PairMatrices:
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
        within: also the within-task baselines `within_a`, `within_b` (mean cosine, or mean
            raw product without `cosine`, of distinct sample pairs of one task), from O(N S) sums.
        sample_block: samples of A read at once.
        dtype: compute dtype, `float32`, `float64` or `bfloat16` (results are float64).
        products: more products from the same reads, `name -> (f, h)`, each with `weights`
            on A's side (`PairMatrices.products[name]`), e.g. phase 6's signed alignment
            beside its unsigned score. Not with `cosine`.

    Raises:
        StoreMismatchError: see `check_groups`.
    """
    result = PairMatrices()
    for _, part in iter_param_pairs(store_a, store_b, groups, f, h, weights, cosine=cosine, within=within,
                                    sample_block=sample_block, dtype=dtype, products=products,
                                    marginals=marginals, device=device):
        result.update(part)
    return result
