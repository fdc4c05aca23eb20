"""Phase 6 (`qkov`): scores against a float64 brute force on three head layouts, head
additivity, and how the scores scale with each task's gradients.

The brute force loops over sample pairs and cells in Python and cuts every head out of
the stored per-sample arrays by hand, from the layouts written out below (not from the
store's geometry), so a wrong segment in an adapter, a wrong slice in the pair engine or
a wrong normalisation in `qkov.py` all show. Stores are written by the production
accumulator and store writer (`store_factory.make_store`); the GPT-2 and GPT-NeoX stores
carry the geometry their adapters give for the tiny models of `tiny_models`. Data are
fresh every run; the seeds are in the failure messages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pytest
import torch

from fisher_pipeline.phases.qkov import QkovOptions
from fisher_pipeline.phases.qkov.compute import CELL_COLUMNS, pair_qkov
from fisher_pipeline.sample_pairs import pair_matrices
from fisher_pipeline.store import FisherStore
from store_factory import HEAD_DIM, N_HEADS, N_KV_HEADS, llama_layout, make_store

#: N_B = 3 (not a power of two): a pooled Fisher that forms `n_b * F_B` in float32 (F_B is stored
#: float32) is off by ~4e-8 relative and fails the rel=1e-11 checks; the sum must be float64.
N_A, N_B = 5, 3
VARIANTS = {"unsigned": (np.square, np.abs), "signed": (lambda x: x, lambda x: x), "symmetric": (np.abs, np.abs)}
ENGINE_TRANSFORMS = {"unsigned": ("square", "abs"), "signed": ("identity", "identity"),
                     "symmetric": ("abs", "abs")}
POOLS = ("a", "b", "pooled")
AGGREGATES = ("mean", "sum")
#: eps above a good part of the Fisher values (about 1 here) and a non-zero ridge, so both matter.
EPS, RIDGE = 0.5, 0.25

Take = Callable[[np.ndarray], np.ndarray]  # [N, *shape] -> [N, ...] (the slice, not yet flattened)


def rows(lo: int, hi: int) -> Take:
    """Positions lo..hi-1 along the parameter's dim 0 (rows of a matrix, entries of a bias)."""
    return lambda x: x[:, lo:hi]


def cols(lo: int, hi: int) -> Take:
    """Columns lo..hi-1 of a matrix parameter."""
    return lambda x: x[:, :, lo:hi]


def row_blocks(ranges: list[tuple[int, int]]) -> Take:
    """Several row ranges joined (e.g. the q rows of every NeoX head)."""
    return lambda x: np.concatenate([x[:, lo:hi] for lo, hi in ranges], axis=1)


@dataclass
class Hand:
    """A layout written out by hand: per-sample params, head cells and whole blocks."""

    per_sample: tuple[str, ...]
    cells: dict[tuple[str, str, int], tuple[int, Take]]  # (param, block, head) -> (layer, take)
    blocks: dict[tuple[str, str], Take]  # (param, block) -> all heads of the block together


def llama_hand() -> Hand:
    """`store_factory.llama_layout`: q/k/v heads are row blocks (K, V per KV head), o heads column blocks."""
    d, cells, blocks, params = HEAD_DIM, {}, {}, []
    for layer in (0, 1):
        attn = f"model.layers.{layer}.self_attn"
        for block, n_heads in (("q", N_HEADS), ("k", N_KV_HEADS), ("v", N_KV_HEADS)):
            param = f"{attn}.{block}_proj.weight"
            params.append(param)
            cells |= {(param, block, h): (layer, rows(h * d, (h + 1) * d)) for h in range(n_heads)}
            blocks[(param, block)] = lambda x: x  # the whole tensor
        param = f"{attn}.o_proj.weight"
        params.append(param)
        cells |= {(param, "o", h): (layer, cols(h * d, (h + 1) * d)) for h in range(N_HEADS)}
        blocks[(param, "o")] = lambda x: x
    return Hand(tuple(params), cells, blocks)


def gpt2_hand(width: int, n_heads: int) -> Hand:
    """GPT-2 Conv1D: c_attn.weight `[D, 3D]` columns [Q | K | V], heads contiguous within each
    (bias `[3D]` likewise); c_proj.weight `[D, D]` head h = rows h*d..; c_proj.bias has no heads."""
    d, cells, blocks = width // n_heads, {}, {}
    params = []
    for layer, names in ((0, ("c_attn.weight", "c_proj.weight")),
                         (1, ("c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"))):
        for name in names:
            param = f"transformer.h.{layer}.attn.{name}"
            params.append(param)
            if name.startswith("c_attn"):
                cut = cols if name.endswith("weight") else rows
                for index, block in enumerate("qkv"):
                    offset = index * width
                    cells |= {(param, block, h): (layer, cut(offset + h * d, offset + (h + 1) * d))
                              for h in range(n_heads)}
                    blocks[(param, block)] = cut(offset, offset + width)
            elif name == "c_proj.weight":
                cells |= {(param, "o", h): (layer, rows(h * d, (h + 1) * d)) for h in range(n_heads)}
                blocks[(param, "o")] = rows(0, width)
    return Hand(tuple(params), cells, blocks)


def neox_hand(width: int, n_heads: int) -> Hand:
    """GPT-NeoX: query_key_value rows `[H, 3, d]` (head h: q rows 3hd.., k rows 3hd+d.., v rows
    3hd+2d..; bias likewise); dense.weight `[D, D]` head h = columns h*d..; dense.bias has no heads."""
    d, cells, blocks = width // n_heads, {}, {}
    params = []
    for layer, names in ((0, ("query_key_value.weight", "dense.weight")),
                         (1, ("query_key_value.weight", "query_key_value.bias", "dense.weight", "dense.bias"))):
        for name in names:
            param = f"gpt_neox.layers.{layer}.attention.{name}"
            params.append(param)
            if name.startswith("query_key_value"):
                for index, block in enumerate("qkv"):
                    ranges = [(3 * h * d + index * d, 3 * h * d + (index + 1) * d) for h in range(n_heads)]
                    cells |= {(param, block, h): (layer, rows(*ranges[h])) for h in range(n_heads)}
                    blocks[(param, block)] = row_blocks(ranges)
            elif name == "dense.weight":
                cells |= {(param, "o", h): (layer, cols(h * d, (h + 1) * d)) for h in range(n_heads)}
                blocks[(param, "o")] = cols(0, width)
    return Hand(tuple(params), cells, blocks)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny products: torch's thread pool only adds overhead here (10x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    layout: str
    seeds: tuple[int, int]
    hand: Hand
    store_a: FisherStore
    store_b: FisherStore

    def __post_init__(self) -> None:
        self.data = {side: {p: store.per_sample(p).astype(np.float64) for p in self.hand.per_sample}
                     for side, store in (("a", self.store_a), ("b", self.store_b))}
        self.fisher = {side: {p: store.fisher(p).astype(np.float64) for p in self.hand.per_sample}
                       for side, store in (("a", self.store_a), ("b", self.store_b))}

    def cut(self, side: str, param: str, take: Take) -> tuple[np.ndarray, np.ndarray]:
        """(per-sample slice `[N, S]`, Fisher slice `[S]`) of one side, float64."""
        data = take(self.data[side][param])
        return data.reshape(len(data), -1), take(self.fisher[side][param][None]).reshape(-1)

    def weight(self, param: str, take: Take, pool: str, eps: float, ridge: float) -> np.ndarray:
        _, fa = self.cut("a", param, take)
        _, fb = self.cut("b", param, take)
        fisher = {"a": fa, "b": fb, "pooled": (N_A * fa + N_B * fb) / (N_A + N_B)}[pool]
        return 1.0 / (np.maximum(fisher, eps) + ridge)


def brute_matrix(case: Case, param: str, take: Take, variant: str, pool: str, eps: float = EPS,
                 ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Summed score `M[i, j]` by an explicit loop over sample pairs, and `sum_k |terms|` per pair."""
    ga, _ = case.cut("a", param, take)
    gb, _ = case.cut("b", param, take)
    w = case.weight(param, take, pool, eps, ridge)
    fa, hb = VARIANTS[variant]
    score, size = np.empty((len(ga), len(gb))), np.empty((len(ga), len(gb)))
    for i, j in itertools.product(range(len(ga)), range(len(gb))):
        terms = fa(ga[i]) * w * hb(gb[j])
        score[i, j], size[i, j] = terms.sum(), np.abs(terms).sum()
    return score, size


def build_case(root, layout: str, rng: np.random.Generator) -> Case:
    seeds = (int(rng.integers(2**31)), int(rng.integers(2**31)))
    if layout == "llama":
        hand, geometry = llama_hand(), None
    else:
        from fisher_pipeline.models.adapters import adapter_for
        from tiny_models import build_tiny

        model = build_tiny(layout)
        width, n_heads = model.config.hidden_size, model.config.num_attention_heads
        hand = gpt2_hand(width, n_heads) if layout == "gpt2" else neox_hand(width, n_heads)
        geometry = adapter_for(model).geometry()
    paths = [make_store(root / f"{layout}-{task}.zarr", n_samples=n, seed=seed, task=task,
                        per_sample=hand.per_sample, geometry=geometry)
             for task, n, seed in (("a", N_A, seeds[0]), ("b", N_B, seeds[1]))]
    return Case(layout, seeds, hand, FisherStore(paths[0]), FisherStore(paths[1]))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("qkov")
    rng = np.random.default_rng()  # fresh data every run
    made: dict[str, Case] = {}

    def get(layout: str) -> Case:
        if layout not in made:
            made[layout] = build_case(root, layout, rng)
        return made[layout]

    return get


def run(case: Case, **options) -> dict[str, pd.DataFrame]:
    options = {"eps": EPS, "ridge_lambda": RIDGE, "n_bootstrap": 0, "top_k": 3, "sample_block": 2} | options
    return pair_qkov(case.store_a, case.store_b, QkovOptions(**options))


def indexed(cells: pd.DataFrame) -> pd.DataFrame:
    return cells.set_index(["param", "block", "head"]).sort_index()


LAYOUTS = ["llama", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_match_brute_force(cases, layout):
    case = cases(layout)
    where = f"layout {layout}, seeds {case.seeds}"
    brute = {(variant, pool): {cell: brute_matrix(case, cell[0], take, variant, pool)
                               for cell, (_, take) in case.hand.cells.items()}
             for variant, pool in itertools.product(VARIANTS, POOLS)}
    for variant, pool, aggregate in itertools.product(VARIANTS, POOLS, AGGREGATES):
        out = run(case, variant=variant, fisher_pool=pool, aggregate=aggregate, compute_dtype="float64")
        cells = out["cells"]
        assert list(cells.columns) == CELL_COLUMNS
        table = indexed(cells)
        # exactly the heads of the hand layout: every q/k/v/o head, no whole tensor, no headless bias
        assert sorted(table.index) == sorted(case.hand.cells), where
        for cell, (layer, take) in case.hand.cells.items():
            row = table.loc[cell]
            size = case.cut("a", cell[0], take)[0].shape[1]
            assert (row["layer"], row["slice_size"], row["n_a"], row["n_b"]) == (layer, size, N_A, N_B), (where, cell)
            divisor = size if aggregate == "mean" else 1
            score, scale = brute[(variant, pool)][cell]
            signed, signed_scale = brute[("signed", pool)][cell]
            context = (where, variant, pool, aggregate, cell)
            assert row["score_mean"] == pytest.approx(score.mean() / divisor, rel=1e-11,
                                                      abs=1e-12 * scale.mean() / divisor), context
            assert row["signed_mean"] == pytest.approx(signed.mean() / divisor, rel=1e-11,
                                                       abs=1e-12 * signed_scale.mean() / divisor), context
        assert (cells["variant"] == variant).all() and (cells["fisher_pool"] == pool).all()
        assert (cells["aggregate"] == aggregate).all()
        # health: the chosen pool's floored, ridged Fisher over each head's slice
        health = out["health"].set_index(["param", "block", "head"])
        for cell, (_, take) in case.hand.cells.items():
            hat = 1.0 / case.weight(cell[0], take, pool, EPS, RIDGE)
            assert health.loc[cell, "fisher_min"] == pytest.approx(hat.min(), rel=1e-12), (where, pool, cell)
            assert health.loc[cell, "fisher_max"] == pytest.approx(hat.max(), rel=1e-12), (where, pool, cell)
        assert (health["fraction_below_eps"] > 0).any(), "eps floors nothing: the test would not see eps handling"

    # float32 products: about 1e-5 of the sum of |terms|. bfloat16 products: only the signed
    # matrix is a product; each entry is within 2^-7 of its sum of |terms| plus 2^-8 of itself.
    # The unsigned score (float32 marginal sums) keeps float32's accuracy in both.
    for dtype in ("float32", "bfloat16"):
        table = indexed(run(case, variant="unsigned", fisher_pool="pooled", aggregate="mean",
                            compute_dtype=dtype)["cells"])
        for cell, (_, take) in case.hand.cells.items():
            size = case.cut("a", cell[0], take)[0].shape[1]
            score, _ = brute[("unsigned", "pooled")][cell]
            signed, signed_scale = brute[("signed", "pooled")][cell]
            assert table.loc[cell, "score_mean"] == pytest.approx(score.mean() / size, rel=1e-5), (where, dtype, cell)
            bound = (1e-5 * signed_scale.mean() if dtype == "float32" else
                     (2.0**-7 + 2.0**-12) * signed_scale.mean() + 2.0**-8 * np.abs(signed).mean()) / size
            assert abs(table.loc[cell, "signed_mean"] - signed.mean() / size) <= bound, (where, dtype, cell)

    # full pair matrices of a K/V head and an O head from the pair engine
    chosen = [cell for cell in case.hand.cells if cell[1] in ("v", "o") and cell[2] == 1][:3]
    for variant, pool in (("unsigned", "a"), ("signed", "pooled"), ("symmetric", "b")):
        for param, block, head in chosen:
            fa, fb = case.fisher["a"][param], case.fisher["b"][param]  # float64
            fisher = {"a": fa, "b": fb, "pooled": (N_A * fa + N_B * fb) / (N_A + N_B)}[pool]
            weights = {param: 1.0 / (np.maximum(fisher, EPS) + RIDGE)}
            f, h = ENGINE_TRANSFORMS[variant]
            matrix = pair_matrices(case.store_a, case.store_b, [(param, block, head)], f, h, weights,
                                   dtype="float64", sample_block=2)[(param, block, head)]
            expected, scale = brute_matrix(case, param, case.hand.cells[(param, block, head)][1], variant, pool)
            np.testing.assert_allclose(matrix, expected, rtol=1e-11, atol=1e-12 * scale.max(),
                                       err_msg=f"{where} {variant} {pool} {(param, block, head)}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_heads_add_up_to_the_block(cases, layout):
    """aggregate=sum: the heads of a block sum to the block's score computed on its unsliced positions."""
    case = cases(layout)
    where = f"layout {layout}, seeds {case.seeds}"
    out = run(case, variant="unsigned", fisher_pool="pooled", aggregate="sum", compute_dtype="float64")
    table = indexed(out["cells"])
    for (param, block), take in case.hand.blocks.items():
        heads = table.xs((param, block), level=["param", "block"])
        assert sorted(heads.index) == sorted(h for p, b, h in case.hand.cells if (p, b) == (param, block))
        score, scale = brute_matrix(case, param, take, "unsigned", "pooled")
        signed, signed_scale = brute_matrix(case, param, take, "signed", "pooled")
        assert heads["score_mean"].sum() == pytest.approx(score.mean(), rel=1e-11), (where, param, block)
        assert heads["signed_mean"].sum() == pytest.approx(signed.mean(), rel=1e-11,
                                                           abs=1e-12 * signed_scale.mean()), (where, param, block)
    # the whole parameter (every q/k/v/o position of it) from the pair engine, against the
    # unsliced tensor and against the sum of its heads' matrices
    for param in {param for param, _ in case.hand.blocks}:
        fisher = (N_A * case.fisher["a"][param] + N_B * case.fisher["b"][param]) / (N_A + N_B)
        weights = {param: 1.0 / (np.maximum(fisher, EPS) + RIDGE)}
        groups = [(param, None, None), *[cell for cell in case.hand.cells if cell[0] == param]]
        matrices = pair_matrices(case.store_a, case.store_b, groups, "square", "abs", weights, dtype="float64")
        whole, scale = brute_matrix(case, param, lambda x: x, "unsigned", "pooled")
        np.testing.assert_allclose(matrices[(param, None, None)], whole, rtol=1e-11, err_msg=f"{where} {param}")
        np.testing.assert_allclose(sum(matrices[g] for g in groups[1:]), whole, rtol=1e-11,
                                   err_msg=f"{where} {param} heads")


@pytest.fixture(scope="module")
def scaled_stores(tmp_path_factory):
    """Llama-layout stores A, B and copies with A's or B's gradients times c (float32 per-sample arrays)."""
    root = tmp_path_factory.mktemp("qkov-scaled")
    rng = np.random.default_rng()
    seed = int(rng.integers(2**31))
    hand = llama_hand()
    shapes, _ = llama_layout()
    data = np.random.default_rng(seed)
    c = float(data.uniform(2.0, 9.0))
    grads = {}
    for task, n in (("a", N_A), ("b", N_B)):
        grads[task] = {p: (data.normal(size=shapes[p]) * 0.5 + data.normal(size=(n, *shapes[p]))
                           * np.exp(data.normal(size=shapes[p]))).astype(np.float32) for p in hand.per_sample}
    stores = {}
    for name, task, factor in (("a", "a", 1.0), ("b", "b", 1.0), ("ca", "a", c), ("cb", "b", c)):
        n = N_A if task == "a" else N_B
        scaled = {p: (g.astype(np.float64) * factor).astype(np.float32) for p, g in grads[task].items()}
        path = make_store(root / f"{name}.zarr", n_samples=n, seed=seed, task=task, grads=scaled,
                          per_sample=hand.per_sample, per_sample_dtype="float32")
        stores[name] = FisherStore(path)
    return stores, c, seed, hand


def test_scaling_and_pool_a_identity(scaled_stores):
    stores, c, seed, hand = scaled_stores
    where = f"seed {seed}, c {c}"
    for aggregate in AGGREGATES:
        options = QkovOptions(variant="unsigned", fisher_pool="a", aggregate=aggregate, eps=1e-30, ridge_lambda=0.0,
                              n_bootstrap=0, compute_dtype="float64")
        base = indexed(pair_qkov(stores["a"], stores["b"], options)["cells"])
        scaled_a = indexed(pair_qkov(stores["ca"], stores["b"], options)["cells"])
        scaled_b = indexed(pair_qkov(stores["a"], stores["cb"], options)["cells"])
        assert sorted(base.index) == sorted(hand.cells)
        # A's scale cancels against A's Fisher; B's scale comes through linearly
        np.testing.assert_allclose(scaled_a["score_mean"], base["score_mean"], rtol=1e-6, err_msg=where)
        np.testing.assert_allclose(scaled_b["score_mean"], c * base["score_mean"], rtol=1e-6, err_msg=where)
        # the signed score: g_A / F_A scales by 1 / c, g_B by c (to float32 rounding of the
        # scaled gradients, relative to the mean of |terms|: the symmetric score)
        scale = indexed(pair_qkov(stores["a"], stores["b"], replace(options, variant="symmetric"))["cells"])
        np.testing.assert_allclose(scaled_a["signed_mean"], base["signed_mean"] / c, rtol=0,
                                   atol=1e-6 * scale["score_mean"].max() / c, err_msg=where)
        np.testing.assert_allclose(scaled_b["signed_mean"], c * base["signed_mean"], rtol=0,
                                   atol=1e-6 * scale["score_mean"].max() * c, err_msg=where)
        # pool-A identity: mean over pairs of the unsigned M = agg_k mean_j |g_B,j,k| (A cancels)
        data_b = {p: stores["b"].per_sample(p).astype(np.float64) for p in hand.per_sample}
        for cell, (_, take) in hand.cells.items():
            gb = take(data_b[cell[0]]).reshape(N_B, -1)
            expected = np.abs(gb).mean(0).sum() / (gb.shape[1] if aggregate == "mean" else 1)
            assert base.loc[cell, "score_mean"] == pytest.approx(expected, rel=1e-6), (where, aggregate, cell)
    # every pair matrix, too: unchanged under A * c, times c under B * c
    groups = list(hand.cells)

    def matrices(a: str, b: str) -> dict:
        weights = {p: 1.0 / np.maximum(stores[a].fisher(p).astype(np.float64), 1e-30) for p in hand.per_sample}
        return pair_matrices(stores[a], stores[b], groups, "square", "abs", weights, dtype="float64").cross

    base, scaled_a, scaled_b = matrices("a", "b"), matrices("ca", "b"), matrices("a", "cb")
    for cell in groups:
        np.testing.assert_allclose(scaled_a[cell], base[cell], rtol=1e-6, err_msg=f"{where} {cell}")
        np.testing.assert_allclose(scaled_b[cell], c * base[cell], rtol=1e-6, err_msg=f"{where} {cell}")
