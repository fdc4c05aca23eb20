"""The pair engine: blocked pair matrices against brute force, and one read per stored array."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from fisher_pipeline import sample_pairs
from fisher_pipeline.errors import StoreMismatchError
from fisher_pipeline.layout import GroupSpec
from fisher_pipeline.sample_pairs import cosine_matrix, pair_matrices, pair_matrix
from fisher_pipeline.store import FisherStore
from store_factory import llama_layout, make_store

MAPS = {"identity": lambda x: x, "square": np.square, "abs": np.abs}
Q_PROJ, K_PROJ, O_PROJ = (f"model.layers.1.self_attn.{m}_proj.weight" for m in ("q", "k", "o"))
UP_PROJ = "model.layers.1.mlp.up_proj.weight"  # no heads: its whole-parameter matrix is one product
PER_SAMPLE = (Q_PROJ, K_PROJ, O_PROJ, UP_PROJ)


def brute(a, b, f="identity", h="identity", weight=None):
    """Explicit triple loop in float64 over i, j, k."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.ones(a.shape[1]) if weight is None else np.asarray(weight, np.float64)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = sum(MAPS[f](a[i, k]) * w[k] * MAPS[h](b[j, k]) for k in range(a.shape[1]))
    return out


def brute_cosine(a, b, weight=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.ones(a.shape[1]) if weight is None else np.asarray(weight, np.float64)
    norm_a, norm_b = (np.sqrt(np.sum(x * x * w, axis=1)) for x in (a, b))
    return brute(a, b, weight=w) / np.outer(norm_a, norm_b)


#: Agreement with float64 brute force, relative to the largest entry: float64 compute is
#: exact to rounding; float32 compute to ~1e-6 (module docstring of `sample_pairs`).
TOLERANCE = {"float64": 1e-12, "float32": 2e-6}


def assert_close(got, expected, dtype, scale=None):
    """Cosines pass `scale=1` (their natural unit) where the expected value itself may be ~0."""
    if scale is None:
        scale = np.nanmax(np.abs(expected)) if np.size(expected) else 1.0
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("f,h,weighted", list(itertools.product(MAPS, MAPS, (False, True))))
def test_pair_matrix_matches_brute_force(f, h, weighted, dtype):
    rng = np.random.default_rng()  # fresh inputs every run
    a, b = rng.normal(size=(6, 11)), rng.normal(size=(4, 11))
    weight = rng.uniform(0.1, 3, size=11) if weighted else None
    assert_close(pair_matrix(a, b, f, h, weight, dtype=dtype), brute(a, b, f, h, weight), dtype)
    # blocks that do not divide N (10 rows by 3, 7 by 3 and 4)
    a, b = rng.normal(size=(10, 13)), rng.normal(size=(7, 13))
    weight = rng.uniform(0.1, 3, size=13) if weighted else None
    expected = brute(a, b, f, h, weight)
    for rows in (1, 3, 4, 10**6):
        assert_close(pair_matrix(a, b, f, h, weight, block_rows=rows, dtype=dtype), expected, dtype)


#: bfloat16 keeps 8 significant bits: each operand rounds by at most 2^-8 of itself, so each
#: term f(a_k) w_k h(b_k) by ~2^-7; the float32 sum adds ~S 2^-24, the bfloat16 result 2^-8 of
#: itself. A cosine (rows of norm 1 in the metric) is therefore off by at most 3 * 2^-8.
BF16_TERMS, BF16_RESULT = 2.0**-7 + 2.0**-12, 2.0**-8


def assert_bfloat16_bound(got, a, b, f="identity", h="identity", weight=None):
    """`got` within the bfloat16 rounding bound of the float64 brute force, and not float32's result
    (the products really ran in bfloat16)."""
    expected = brute(a, b, f, h, weight)
    terms = brute(np.abs(MAPS[f](np.asarray(a, np.float64))), np.abs(MAPS[h](np.asarray(b, np.float64))),
                  weight=weight)  # sum_k |f(a_k) w_k h(b_k)|
    error = np.abs(got - expected)
    assert np.all(error <= BF16_TERMS * terms + BF16_RESULT * np.abs(expected)), np.max(error / terms)
    return expected


@pytest.mark.parametrize("f,h,weighted", list(itertools.product(MAPS, MAPS, (False, True))))
def test_bfloat16_products_within_their_rounding_bound(f, h, weighted):
    rng = np.random.default_rng()  # fresh inputs every run
    a, b = rng.normal(size=(10, 300)), rng.normal(size=(7, 300))
    weight = rng.uniform(0.1, 3, size=300) if weighted else None
    for rows in (3, 10**6):
        got = pair_matrix(a, b, f, h, weight, block_rows=rows, dtype="bfloat16")
        expected = assert_bfloat16_bound(got, a, b, f, h, weight)
        # the products really ran in bfloat16: its errors are ~1e-3 of the largest entry, float32's ~1e-7
        assert np.max(np.abs(got - expected)) > 50 * TOLERANCE["float32"] * np.max(np.abs(expected))


def test_bfloat16_pair_matrices_keep_every_sum_in_float32(stores):
    """Through the blocked engine: raw products and cosines within the bfloat16 bound, while the
    O(N S) outputs (norms, within-task baselines, marginals) keep float32's accuracy."""
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = [(Q_PROJ, None, None), (Q_PROJ, "q", 2), (O_PROJ, "o", 0), (UP_PROJ, None, None)]
    weights = {p: 1.0 / (store_a.fisher(p) + 0.1) for p in PER_SAMPLE}
    got = pair_matrices(store_a, store_b, groups, "square", "abs", weights, within=True, sample_block=3,
                        dtype="bfloat16", products={"signed": ("identity", "identity")},
                        marginals={"unsigned": ("square", "abs")})
    exact = pair_matrices(store_a, store_b, groups, "square", "abs", weights, within=True, sample_block=3,
                          dtype="float64", marginals={"unsigned": ("square", "abs")})
    cosines = pair_matrices(store_a, store_b, groups, weights=weights, cosine=True, within=True, sample_block=3,
                            dtype="bfloat16")
    for group in groups:
        w = groups_and_weight(weights[group[0]], group)
        a, b = slices_a[group], slices_b[group]
        assert_bfloat16_bound(got[group], a, b, "square", "abs", w)
        signed = assert_bfloat16_bound(got.products["signed"][group], a, b, weight=w)
        assert np.max(np.abs(got.products["signed"][group] - signed)) > 10 * TOLERANCE["float32"] * np.max(
            np.abs(signed))  # the products really ran in bfloat16
        for mine, theirs in zip(got.marginals["unsigned"][group], exact.marginals["unsigned"][group], strict=True):
            assert_close(mine, theirs, "float32")
        assert_close(got.within_a[group], exact.within_a[group], "float32", scale=abs(exact.within_a[group]))
        cosine = brute_cosine(a, b, w)
        assert np.all(np.abs(cosines[group] - cosine) <= BF16_TERMS + BF16_RESULT * np.abs(cosine))
        assert_close(cosines.within_b[group], off_diagonal_mean(brute_cosine(b, b, w)), "float32", scale=1)


def test_float16_is_upcast_before_the_product():
    rng = np.random.default_rng(1)
    # values whose squares underflow / lose precision in float16 if not upcast first
    a = (rng.normal(size=(5, 40)) * 3e-3).astype(np.float16)
    b = (rng.normal(size=(3, 40)) * 3e-3).astype(np.float16)
    weight = rng.uniform(100, 300, size=40)
    for f, h in (("square", "abs"), ("identity", "identity"), ("abs", "square")):
        got = pair_matrix(a, b, f, h, weight, block_rows=2)
        assert got.dtype == np.float64
        expected = brute(a.astype(np.float64), b.astype(np.float64), f, h, weight)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(cosine_matrix(a, b, block_rows=2), brute_cosine(a, b), rtol=1e-6)
    weight = rng.uniform(0.5, 2, size=40)
    np.testing.assert_allclose(cosine_matrix(a, b, block_rows=2, weight=weight), brute_cosine(a, b, weight),
                               rtol=1e-6)


def test_cosine_matrix_and_zero_norm_samples():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 9)), rng.normal(size=(5, 9))
    np.testing.assert_allclose(cosine_matrix(a, b, block_rows=3, dtype="float64"), brute_cosine(a, b), rtol=1e-12)
    a[2] = 0
    b[4] = 0
    got = cosine_matrix(a, b, block_rows=3, dtype="float64")
    assert np.isnan(got[2]).all() and np.isnan(got[:, 4]).all()
    keep = np.isfinite(got)
    assert keep.sum() == 6 * 4
    np.testing.assert_allclose(got[keep], brute_cosine(np.delete(a, 2, 0), np.delete(b, 4, 0)).ravel(), rtol=1e-12)


def test_pair_matrix_rejects_bad_inputs():
    a = np.ones((2, 3))
    with pytest.raises(ValueError, match="same slice length"):
        pair_matrix(a, np.ones((2, 4)))
    with pytest.raises(ValueError, match="weight"):
        pair_matrix(a, a, weight=np.ones(4))
    with pytest.raises(ValueError, match="unknown transform"):
        pair_matrix(a, a, f="cube")
    with pytest.raises(ValueError, match="compute dtype"):
        pair_matrix(a, a, dtype="float16")
    assert pair_matrix(np.ones((0, 3)), a).shape == (0, 2)


# --- stores --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["float32", "float16"])
def stores(tmp_path_factory, request):
    """Stores of 7 and 5 samples, per-sample arrays stored in float32 or float16."""
    root = tmp_path_factory.mktemp("pairs")
    seeds = np.random.default_rng().integers(2**31, size=2)  # fresh data every run
    a = make_store(root / "a.zarr", n_samples=7, seed=seeds[0], task="a", per_sample=PER_SAMPLE, batch_size=3,
                   per_sample_dtype=request.param)
    b = make_store(root / "b.zarr", n_samples=5, seed=seeds[1], task="b", per_sample=PER_SAMPLE, batch_size=3,
                   per_sample_dtype=request.param)
    return FisherStore(a), FisherStore(b)


def head_slice(data, rows=None, cols=None):
    """Brute-force head slice, written independently of the engine: rows (q, k) or columns (o)."""
    part = data[:, rows, :] if rows is not None else data[:, :, cols]
    return part.reshape(len(data), -1)


def groups_and_slices(store):
    """Every whole-param and per-head group, with its slice computed by hand (head_dim 2)."""
    geometry = store.geometry
    attention = geometry.attention
    d = attention.head_dim
    out = {}
    for param in PER_SAMPLE:
        data = store.per_sample(param).astype(np.float64)
        out[(param, None, None)] = data.reshape(len(data), -1)
    q, k, o = (store.per_sample(p).astype(np.float64) for p in (Q_PROJ, K_PROJ, O_PROJ))
    for head in range(attention.n_heads):
        out[(Q_PROJ, "q", head)] = head_slice(q, rows=slice(head * d, (head + 1) * d))
        out[(O_PROJ, "o", head)] = head_slice(o, cols=slice(head * d, (head + 1) * d))
    for kv in range(attention.n_kv_heads):
        out[(K_PROJ, "k", kv)] = head_slice(k, rows=slice(kv * d, (kv + 1) * d))
    # the geometry agrees with the hand-written slices
    assert np.array_equal(geometry[O_PROJ].positions("o")[1], [2, 3]) and geometry[O_PROJ].groups.dim == 1
    return out


def count_reads(monkeypatch):
    calls = []
    original = FisherStore.per_sample

    def counting(self, name, ids=None, rows=None):
        calls.append((str(self.path), name, None if rows is None else (rows.start, rows.stop)))
        return original(self, name, ids=ids, rows=rows)

    monkeypatch.setattr(FisherStore, "per_sample", counting)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sample_block", [3, 100])
@pytest.mark.parametrize("f,h,weighted", [("identity", "identity", False), ("square", "abs", True),
                                          ("abs", "abs", True), ("identity", "identity", True)])
def test_pair_matrices_match_brute_force_and_read_once(stores, monkeypatch, f, h, weighted, sample_block, dtype):
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = list(slices_a)
    fisher = {p: store_a.fisher(p) for p in PER_SAMPLE}
    weights = {p: 1.0 / (fisher[p] + 0.1) for p in PER_SAMPLE} if weighted else None
    flat_weights = {}
    for group in groups:
        param, block, head = group
        w = weights[param] if weighted else np.ones(store_a.geometry[param].shape)
        flat_weights[group] = groups_and_weight(w, group)
    calls = count_reads(monkeypatch)
    got = pair_matrices(store_a, store_b, groups, f, h, weights, sample_block=sample_block, dtype=dtype)
    # A's arrays read once, in disjoint sample blocks; B's in blocks too: once when B is one
    # block (held across A's blocks), else once per block of A (memory bounded by the blocks)
    blocks_a, blocks_b = -(-7 // sample_block), -(-5 // sample_block)
    for store, n, repeats in ((store_a, 7, 1), (store_b, 5, 1 if blocks_b == 1 else blocks_a)):
        for param in PER_SAMPLE:
            reads = [c[2] for c in calls if c[0] == str(store.path) and c[1] == param]
            spans = [(0, n) if r is None else (r[0], min(r[1], n)) for r in reads]
            assert all(hi - lo <= sample_block for lo, hi in spans)
            assert set(collections.Counter(spans).values()) == {repeats}
            assert sorted(i for lo, hi in set(spans) for i in range(lo, hi)) == list(range(n))
    assert len([c for c in calls if c[0] == str(store_a.path)]) == len(PER_SAMPLE) * blocks_a
    assert len([c for c in calls if c[0] == str(store_b.path)]) == len(PER_SAMPLE) * blocks_b * (
        1 if blocks_b == 1 else blocks_a)
    assert set(got) == set(groups)
    for group in groups:
        w = flat_weights[group]
        a, b = slices_a[group], slices_b[group]
        assert_close(got[group], np.einsum("ik,k,jk->ij", MAPS[f](a), w, MAPS[h](b)), dtype)
    # one head and one whole parameter (the sum of its heads) checked by the explicit loop too
    for group in ((O_PROJ, "o", 3), (O_PROJ, None, None)):
        assert_close(got[group], brute(slices_a[group], slices_b[group], f, h, flat_weights[group]), dtype)


def groups_and_weight(weight, group):
    """A parameter-shaped weight sliced by hand like `groups_and_slices` (head_dim 2)."""
    param, block, head = group
    w = np.asarray(weight, np.float64)[None]
    if block is None:
        return w.reshape(-1)
    if block == "o":
        return head_slice(w, cols=slice(2 * head, 2 * head + 2))[0]
    return head_slice(w, rows=slice(2 * head, 2 * head + 2))[0]


def test_pair_matrices_cosine(stores):
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = [(Q_PROJ, None, None), (Q_PROJ, "q", 2), (K_PROJ, "k", 1), (O_PROJ, "o", 0)]
    weights = {p: 1.0 / (store_a.fisher(p) + store_b.fisher(p) + 0.1) for p in PER_SAMPLE}
    for weighted, dtype in itertools.product((False, True), ("float32", "float64")):
        got = pair_matrices(store_a, store_b, groups, weights=weights if weighted else None, cosine=True,
                            within=True, sample_block=2, dtype=dtype)
        for group in groups:
            a, b = slices_a[group], slices_b[group]
            w = groups_and_weight(weights[group[0]], group) if weighted else None
            assert_close(got[group], brute_cosine(a, b, w), dtype)
            assert_close(got.within_a[group], off_diagonal_mean(brute_cosine(a, a, w)), dtype, scale=1)
            assert_close(got.within_b[group], off_diagonal_mean(brute_cosine(b, b, w)), dtype, scale=1)
    with pytest.raises(ValueError, match="cosine"):
        pair_matrices(store_a, store_b, groups, f="square", cosine=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_within_raw_products_in_the_weights_metric(stores, dtype):
    """Without `cosine`, the within-task baselines are the mean raw product of distinct pairs,
    `<g_i, g_j>_w` (phase 6's signed score of a task with itself), against an explicit loop, for
    heads and a whole parameter, with and without a weight, A read in blocks of 2 samples; the
    transform asked for (`square` here) does not change them."""
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = [(Q_PROJ, None, None), (Q_PROJ, "q", 2), (K_PROJ, "k", 1), (O_PROJ, "o", 0), (O_PROJ, None, None)]
    weights = {p: 1.0 / (store_a.fisher(p) + 0.1) for p in PER_SAMPLE}
    for weighted in (False, True):
        got = pair_matrices(store_a, store_b, groups, "square", "abs", weights=weights if weighted else None,
                            within=True, sample_block=2, dtype=dtype)
        for group in groups:
            w = groups_and_weight(weights[group[0]], group) if weighted else None
            for sample, within in ((slices_a[group], got.within_a), (slices_b[group], got.within_b)):
                expected = off_diagonal_mean(brute(sample, sample, weight=w))
                scale = off_diagonal_mean(np.abs(brute(sample, sample, weight=w)))
                assert_close(within[group], expected, dtype, scale=scale)


def off_diagonal_mean(matrix):
    """Mean over i != j, by an explicit loop."""
    n = len(matrix)
    return np.mean([matrix[i, j] for i in range(n) for j in range(n) if i != j])


def test_within_baselines_skip_zero_samples(tmp_path):
    shapes, specs = llama_layout()
    grads = {Q_PROJ: np.random.default_rng().normal(size=(6, *shapes[Q_PROJ]))}
    grads[Q_PROJ][2] = 0.0  # no direction anywhere in q_proj
    grads[Q_PROJ][4, :2] = 0.0  # none in query head 0 only
    store = FisherStore(make_store(tmp_path / "z.zarr", n_samples=6, task="z", grads=grads, per_sample=(Q_PROJ,)))
    got = pair_matrices(store, store, [(Q_PROJ, None, None), (Q_PROJ, "q", 0), (Q_PROJ, "q", 1)], cosine=True,
                        within=True, dtype="float64")
    data = store.per_sample(Q_PROJ).astype(np.float64)
    for group, keep, part in (((Q_PROJ, None, None), [0, 1, 3, 4, 5], data.reshape(6, -1)),
                              ((Q_PROJ, "q", 0), [0, 1, 3, 5], data[:, :2].reshape(6, -1)),
                              ((Q_PROJ, "q", 1), [0, 1, 3, 4, 5], data[:, 2:4].reshape(6, -1))):
        assert_close(got.within_a[group], off_diagonal_mean(brute_cosine(part[keep], part[keep])), "float64")
        assert np.isnan(got[group][2]).all()


def test_iter_pair_inputs_reads_each_param_once(stores, monkeypatch):
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    calls = count_reads(monkeypatch)
    seen = {group: (a, b) for group, a, b in sample_pairs.iter_pair_inputs(store_a, store_b, list(slices_a))}
    assert len(calls) == 2 * len(PER_SAMPLE)
    assert set(seen) == set(slices_a)
    for group, (a, b) in seen.items():
        np.testing.assert_array_equal(a, slices_a[group])
        np.testing.assert_array_equal(b, slices_b[group])


def test_mismatched_stores_and_groups(stores, tmp_path):
    store_a, store_b = stores
    other = FisherStore(make_store(tmp_path / "c.zarr", n_samples=4, seed=3, task="c", per_sample=(Q_PROJ,)))
    with pytest.raises(StoreMismatchError, match="per_sample_params") as err:
        pair_matrices(store_a, other, [(Q_PROJ, None, None)])
    assert str(store_a.path) in str(err.value) and str(other.path) in str(err.value)
    stranger = FisherStore(make_store(tmp_path / "d.zarr", n_samples=4, task="d", per_sample=PER_SAMPLE,
                                      weights_hash="other-model"))
    with pytest.raises(StoreMismatchError, match="weights_hash"):
        pair_matrices(store_a, stranger, [(Q_PROJ, None, None)])
    missing = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(StoreMismatchError, match=f"per_sample/{missing}") as err:
        pair_matrices(store_a, store_b, [(missing, None, None)])
    assert str(store_a.path) in str(err.value) and str(store_b.path) in str(err.value)
    with pytest.raises(ValueError, match="heads"):
        pair_matrices(store_a, store_b, [(K_PROJ, "k", 2)])  # 2 KV heads only
    with pytest.raises(ValueError, match="block"):
        pair_matrices(store_a, store_b, [(Q_PROJ, None, 1)])


def test_fused_qkv_whole_is_the_sum_of_three_blocks(tmp_path):
    """A fused Q|K|V parameter (Phi-3 layout): its whole matrix sums heads of three blocks."""
    fused = "model.layers.0.self_attn.qkv_proj.weight"
    shapes = {fused: (16, 6), "model.norm.weight": (6,)}
    specs = {fused: GroupSpec.heads(0, ("q", 4, 2), ("k", 2, 2), ("v", 2, 2))}
    seeds = np.random.default_rng().integers(2**31, size=2)
    store_a, store_b = (FisherStore(make_store(tmp_path / f"{t}.zarr", n_samples=n, seed=s, task=t, shapes=shapes,
                                               specs=specs, per_sample=(fused,)))
                        for t, n, s in (("a", 6, seeds[0]), ("b", 4, seeds[1])))
    a, b = (s.per_sample(fused).astype(np.float64) for s in (store_a, store_b))
    groups = [(fused, None, None), (fused, "q", 3), (fused, "k", 0), (fused, "v", 1)]
    rows = {(fused, None, None): slice(0, 16), (fused, "q", 3): slice(6, 8), (fused, "k", 0): slice(8, 10),
            (fused, "v", 1): slice(14, 16)}
    got = pair_matrices(store_a, store_b, groups, f="square", h="abs", dtype="float64")
    cosines = pair_matrices(store_a, store_b, groups, cosine=True, within=True, dtype="float64")
    for group in groups:
        sa, sb = a[:, rows[group]].reshape(len(a), -1), b[:, rows[group]].reshape(len(b), -1)
        assert_close(got[group], brute(sa, sb, "square", "abs"), "float64")
        assert_close(cosines[group], brute_cosine(sa, sb), "float64")
        assert_close(cosines.within_a[group], off_diagonal_mean(brute_cosine(sa, sa)), "float64")


def test_products_come_from_the_same_reads(stores, monkeypatch):
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = list(slices_a)
    weights = {p: 1.0 / (store_a.fisher(p) + 0.1) for p in PER_SAMPLE}
    calls = count_reads(monkeypatch)
    got = pair_matrices(store_a, store_b, groups, "abs", "abs", weights, dtype="float64",
                        products={"unsigned": ("square", "abs"), "signed": ("identity", "identity")})
    assert len(calls) == 2 * len(PER_SAMPLE)  # one read per array and store, whatever the products
    for group in groups:
        w = groups_and_weight(weights[group[0]], group)
        a, b = slices_a[group], slices_b[group]
        assert_close(got[group], np.einsum("ik,k,jk->ij", np.abs(a), w, np.abs(b)), "float64")
        assert_close(got.products["unsigned"][group], np.einsum("ik,k,jk->ij", a * a, w, np.abs(b)), "float64")
        assert_close(got.products["signed"][group], np.einsum("ik,k,jk->ij", a, w, b), "float64")
    with pytest.raises(ValueError, match="not with cosine"):
        pair_matrices(store_a, store_b, groups, cosine=True, products={"x": ("square", "abs")})


@pytest.mark.parametrize("sample_block", [2, 3, 100])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_marginals_are_the_row_and_column_sums_of_the_matrix_never_formed(stores, monkeypatch, sample_block, dtype):
    """`marginals={name: (f, h)}` gives `M.sum(1)` and `M.sum(0)` of `M = f(a) w h(b)^T` for heads
    and whole parameters, with A and B both in several blocks (2, 3) or one (100), from the
    same reads as the product asked for."""
    store_a, store_b = stores
    slices_a, slices_b = groups_and_slices(store_a), groups_and_slices(store_b)
    groups = list(slices_a)
    weights = {p: 1.0 / (store_a.fisher(p) + 0.1) for p in PER_SAMPLE}
    calls = count_reads(monkeypatch)
    got = pair_matrices(store_a, store_b, groups, weights=weights, sample_block=sample_block, dtype=dtype,
                        marginals={"unsigned": ("square", "abs"), "symmetric": ("abs", "abs")})
    reads = len(calls)
    plain = pair_matrices(store_a, store_b, groups, weights=weights, sample_block=sample_block, dtype=dtype)
    assert len(calls) == 2 * reads  # the same reads with or without them
    for group in groups:
        w = groups_and_weight(weights[group[0]], group)
        a, b = slices_a[group], slices_b[group]
        for name, (f, h) in (("unsigned", ("square", "abs")), ("symmetric", ("abs", "abs"))):
            matrix = brute(a, b, f, h, w)
            rows, cols = got.marginals[name][group]
            assert rows.shape == (7,) and cols.shape == (5,)
            assert_close(rows, matrix.sum(1), dtype, scale=np.abs(matrix).sum(1).max())
            assert_close(cols, matrix.sum(0), dtype, scale=np.abs(matrix).sum(0).max())
        assert_close(got[group], plain[group], dtype)  # the product itself is unchanged
    with pytest.raises(ValueError, match="not with cosine"):
        pair_matrices(store_a, store_b, groups, cosine=True, marginals={"x": ("square", "abs")})


def test_pair_device_names_the_setting_and_the_fix(monkeypatch):
    import torch

    from fisher_pipeline.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sample_pairs.pair_device("auto").type == "cpu"
    assert sample_pairs.pair_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"qkov.device = cuda, but no CUDA device is visible.*set qkov.device to "
                                          r"cpu or auto"):
        sample_pairs.pair_device("cuda", "qkov.device")
    with pytest.raises(ConfigError, match="'tpu': use cpu, cuda or auto"):
        sample_pairs.pair_device("tpu")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_visible(), reason="no CUDA device visible: the pair engine's GPU path is checked on a "
                                                "machine with one (the CPU path is the reference)")
@pytest.mark.parametrize("cosine", [False, True])
def test_cuda_matches_the_cpu(stores, cosine):
    store_a, store_b = stores
    groups = list(groups_and_slices(store_a))
    weights = {p: 1.0 / (store_a.fisher(p) + 0.1) for p in PER_SAMPLE}
    extra = {} if cosine else {"products": {"unsigned": ("square", "abs")}, "marginals": {"u": ("square", "abs")}}
    runs = [pair_matrices(store_a, store_b, groups, weights=weights, cosine=cosine, within=True, sample_block=3,
                          device=device, **extra) for device in ("cpu", "cuda")]
    for group in groups:
        assert_close(runs[1][group], runs[0][group], "float32")
        assert_close(runs[1].within_a[group], runs[0].within_a[group], "float32", scale=1)
        if not cosine:
            assert_close(runs[1].products["unsigned"][group], runs[0].products["unsigned"][group], "float32")
            for got, expected in zip(runs[1].marginals["u"][group], runs[0].marginals["u"][group], strict=True):
                assert_close(got, expected, "float32")
