"""Statistical tests of phase 6 (`fisher_pipeline.phases.qkov`): calibration, power, sample forensics, edge cases.

Every store is written by the production accumulator and store writer (`store_factory.make_store`, or
`write_store_with_ids` below, the same steps with chosen sample ids) and read back with `FisherStore`, so
the phase is tested on exactly what phase 1 writes.

Layout: one layer with a q_proj of 8 query heads, k_proj and v_proj of 4 KV heads (GQA) and an o_proj of
8 heads, head_dim 16 and d_model 32, so every head slice holds 16 x 32 = 512 elements (the default tiny
layout's heads hold 12) and one ordered pair has 8 + 4 + 4 + 8 = 24 cells. The layout also has an MLP
parameter (neuron groups) and a norm, per-sample only where a test says so.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fisher_pipeline.accumulate import FisherAccumulator
from fisher_pipeline.errors import FisherPipelineError, PhaseInputError
from fisher_pipeline.layout import GroupSpec
from fisher_pipeline.phases.qkov import QkovOptions
from fisher_pipeline.phases.qkov.compute import pair_qkov, run_qkov
from fisher_pipeline.store import FisherStore, StoreWriter
from store_factory import make_store, random_weights, tiny_geometry

D_MODEL, HEAD_DIM, N_HEADS, N_KV_HEADS, WIDTH = 32, 16, 8, 4, 8
QP = "model.layers.0.self_attn.q_proj.weight"
KP = "model.layers.0.self_attn.k_proj.weight"
VP = "model.layers.0.self_attn.v_proj.weight"
OP = "model.layers.0.self_attn.o_proj.weight"
MLP = "model.layers.0.mlp.down_proj.weight"
NORM = "model.norm.weight"
SHAPES = {QP: (N_HEADS * HEAD_DIM, D_MODEL), KP: (N_KV_HEADS * HEAD_DIM, D_MODEL),
          VP: (N_KV_HEADS * HEAD_DIM, D_MODEL), OP: (D_MODEL, N_HEADS * HEAD_DIM), MLP: (D_MODEL, WIDTH),
          NORM: (D_MODEL,)}
SPECS = {QP: GroupSpec.heads(0, ("q", N_HEADS, HEAD_DIM)), KP: GroupSpec.heads(0, ("k", N_KV_HEADS, HEAD_DIM)),
         VP: GroupSpec.heads(0, ("v", N_KV_HEADS, HEAD_DIM)), OP: GroupSpec.heads(1, ("o", N_HEADS, HEAD_DIM)),
         MLP: GroupSpec.heads(1, ("neuron", WIDTH, 1))}
PER_SAMPLE = (QP, KP, VP, OP)
#: The attention parameters only: what most tests write (fewer arrays per store, a faster file).
ATTENTION = {param: SHAPES[param] for param in PER_SAMPLE}
PARAM = {"q": QP, "k": KP, "v": VP, "o": OP}
HEAD_AXIS = {QP: 0, KP: 0, VP: 0, OP: 1}  # the dimension along which the parameter's heads lie
SLICE = HEAD_DIM * D_MODEL  # 512 elements per head
#: Every cell (block, head) of one ordered pair, in the phase's order (q, k, v, o; heads ascending).
CELLS = [("q", h) for h in range(N_HEADS)] + [("k", h) for h in range(N_KV_HEADS)] + \
        [("v", h) for h in range(N_KV_HEADS)] + [("o", h) for h in range(N_HEADS)]
ALPHA = 0.05
#: Numeric columns of `cells` that must never hold NaN (untested cells carry finite placeholders; se may be inf).
NUMERIC = ["signed_mean", "signed_se", "signed_p", "signed_q", "df", "score_mean", "score_ci_low", "score_ci_high"]
LOGGER = "fisher_pipeline.phases.qkov.compute"


# --- synthetic per-sample gradients ---------------------------------------------------------

def _along_heads(param: str, values: np.ndarray) -> np.ndarray:
    """Broadcast `values` `[positions along the head axis]` to the parameter's shape."""
    shape = [1] * len(SHAPES[param])
    shape[HEAD_AXIS[param]] = SHAPES[param][HEAD_AXIS[param]]
    return np.broadcast_to(values.reshape(shape), SHAPES[param])


def head_mask(block: str, head: int) -> np.ndarray:
    """True on the elements of head `head` of `block` (its parameter's shape)."""
    param = PARAM[block]
    return _along_heads(param, np.arange(SHAPES[param][HEAD_AXIS[param]]) // HEAD_DIM == head)


def first_half(param: str) -> np.ndarray:
    """True on the first half of every head's slice (positions 0..7 of each head along the head axis)."""
    return _along_heads(param, np.arange(SHAPES[param][HEAD_AXIS[param]]) % HEAD_DIM < HEAD_DIM // 2)


def noise_scales(rng: np.random.Generator, spread: float) -> dict[str, np.ndarray]:
    """Heteroscedastic per-element noise sd `exp(spread * normal)` (a spread of Fisher values)."""
    return {param: np.exp(spread * rng.normal(size=SHAPES[param])) for param in PER_SAMPLE}


def orthogonal_means(rng: np.random.Generator, scales: dict[str, np.ndarray], side: str,
                     magnitude: float) -> dict[str, np.ndarray]:
    """Mean gradients of task `side` ('a' or 'b'), supports disjoint from the other task's in every head.

    A's mean is non-zero only on the first half of each head slice, B's only on the second half,
    with |mean| = `magnitude` x noise sd and random signs.
    """
    means = {}
    for param in PER_SAMPLE:
        support = first_half(param) if side == "a" else ~first_half(param)
        means[param] = magnitude * scales[param] * rng.choice([-1.0, 1.0], size=SHAPES[param]) * support
    return means


def sample(rng: np.random.Generator, n: int, means: dict[str, np.ndarray], scales: dict[str, np.ndarray],
           noise: str = "gauss") -> dict[str, np.ndarray]:
    """Per-sample gradients `[n, *shape]` = mean + sd x (standard normal or Student t(3)), float32."""
    grads = {}
    for param in PER_SAMPLE:
        shape = (n, *SHAPES[param])
        draw = rng.standard_normal(shape) if noise == "gauss" else rng.standard_t(3, shape)
        grads[param] = (means[param] + scales[param] * draw).astype(np.float32)
    return grads


def write_stores(tmp_path, name: str, grads_a: dict, grads_b: dict, seed: int = 0,
                 per_sample: tuple[str, ...] = PER_SAMPLE, task_a: str = "a", task_b: str = "b",
                 shapes: dict[str, tuple[int, ...]] = ATTENTION) -> tuple[FisherStore, FisherStore, dict]:
    """Write tasks A and B with `make_store` (parameters `shapes`); return the opened stores and their paths."""
    n_a = next(iter(grads_a.values())).shape[0] if grads_a else 8
    n_b = next(iter(grads_b.values())).shape[0] if grads_b else 8
    path_a = make_store(tmp_path / f"{name}-{task_a}.zarr", n_samples=n_a, seed=seed, task=task_a, shapes=shapes,
                        specs=SPECS, grads=grads_a, per_sample=per_sample, batch_size=64)
    path_b = make_store(tmp_path / f"{name}-{task_b}.zarr", n_samples=n_b, seed=seed + 1, task=task_b,
                        shapes=shapes, specs=SPECS, grads=grads_b, per_sample=per_sample, batch_size=64)
    return FisherStore(path_a), FisherStore(path_b), {task_a: path_a, task_b: path_b}


def write_store_with_ids(path, task: str, grads: dict[str, np.ndarray], ids: list[str],
                         batch_size: int = 16) -> FisherStore:
    """A store written exactly as `make_store` writes one (accumulator, writer, `tiny_geometry`), but
    with the sample ids `ids` (row r of every array in `grads` is sample `ids[r]`), which `make_store`
    cannot take (it names row r `{task}-{r}`). Attention parameters only, all per sample."""
    n = len(ids)
    data = {name: np.asarray(grads[name], np.float32) for name in ATTENTION}
    specs = {name: SPECS[name] for name in ATTENTION}
    accumulator = FisherAccumulator(ATTENTION, specs, m2_names=set(), per_sample_names=set(PER_SAMPLE),
                                    weights={n: torch.from_numpy(w) for n, w in random_weights(ATTENTION, 0).items()})
    attrs = {"model_id": "tiny-llama", "weights_hash": "tiny-weights", "task": task, "config_hash": "test",
             "fisher_kind": "empirical", "package_version": "test"}
    writer = StoreWriter(path, attrs, tiny_geometry(ATTENTION, specs), PER_SAMPLE, "float32", max_samples=n)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        accumulator.begin(stop - start)
        for name, shape in ATTENTION.items():
            accumulator.add(name, 0, shape[0], torch.tensor(data[name][start:stop]))
        per_sample = accumulator.commit()
        writer.append(ids[start:stop], torch.full((stop - start,), 5), torch.ones(stop - start), per_sample,
                      accumulator.sample_gates)
    return FisherStore(writer.close(accumulator))


def cell_key(row) -> tuple[str, int]:
    return row["block"], int(row["head"])


def assert_no_nan(table: pd.DataFrame, columns: list[str] = NUMERIC) -> None:
    values = table[columns].to_numpy(dtype=float)
    assert not np.isnan(values).any(), table.loc[np.isnan(values).any(axis=1), ["block", "head", *columns]]


def test_layout_has_the_expected_cells(tmp_path):
    """24 cells of 512 elements in q, k, v, o order; the helpers' head masks agree with the store's geometry."""
    rng = np.random.default_rng(0)
    scales = noise_scales(rng, 1.0)
    grads_a = sample(rng, 4, orthogonal_means(rng, scales, "a", 0.3), scales)
    grads_b = sample(rng, 3, orthogonal_means(rng, scales, "b", 0.3), scales)
    store_a, store_b, _ = write_stores(tmp_path, "layout", grads_a, grads_b)
    result = pair_qkov(store_a, store_b, QkovOptions(n_bootstrap=0))
    cells = result["cells"]
    assert [cell_key(row) for _, row in cells.iterrows()] == CELLS
    assert (cells["slice_size"] == SLICE).all() and (cells["layer"] == 0).all()
    assert (cells["n_a"] == 4).all() and (cells["n_b"] == 3).all() and (cells["status"] == "ok").all()
    assert len(result["health"]) == len(CELLS)
    for block, head in CELLS:
        param = PARAM[block]
        positions = store_a.geometry[param].positions(block)[head]
        mask = np.zeros(SHAPES[param][HEAD_AXIS[param]], dtype=bool)
        mask[positions] = True
        assert (head_mask(block, head) == _along_heads(param, mask)).all()
    # signed mean of one cell recomputed from the raw gradients (F from A, mean over the slice)
    a, b = (g[QP][:, head_mask("q", 5)].astype(np.float64) for g in (grads_a, grads_b))
    weight = 1 / np.maximum(np.mean(a ** 2, axis=0), 1e-10)
    expected = ((a * weight) @ b.T / SLICE).mean()
    row = cells[(cells["block"] == "q") & (cells["head"] == 5)].iloc[0]
    np.testing.assert_allclose(row["signed_mean"], expected, rtol=1e-4)


# --- 1. calibration under the null ------------------------------------------------------------

NULL_SEEDS = list(range(20))
NULL_N_A, NULL_N_B = 40, 25
NULL_MAGNITUDE = 0.1


@pytest.mark.parametrize("noise", ["gauss", "t3"])
def test_null_calibration_orthogonal_means(tmp_path, noise):
    """Null hypothesis, in plain words: *through this head, A's and B's gradients are orthogonal in
    the Fisher metric* (`E M_signed[i, j] = 0`).

    Construction (the null holds exactly in every cell). In each head slice A's mean gradient is
    non-zero (|mean| = 0.1 x noise sd, random signs: the small per-coordinate SNR where the
    interaction term of the variance dominates, see `pair_stats`) only on the first half of the
    slice, B's only on the second half. The noise is independent across samples and elements,
    sign-symmetric (Gaussian or Student t with 3 df), with heteroscedastic sd exp(normal) per
    element; N_A = 40, N_B = 25.

    Why `E M_signed[i, j] = 0` although the weight `w_k = 1 / max(F_k, eps)` is estimated from A's
    own samples (`F_k = mean_i g_A,i,k^2`, the default `fisher_pool` a). M_signed[i, j] is a mean
    over k of `g_A,i,k w_k g_B,j,k`. Take k in B's half: there A's values g_A,.,k are pure noise,
    independent of everything at other elements and of B. Flipping the sign of all of them at once
    leaves their joint law unchanged and leaves w_k unchanged (w_k depends on A's values at k only
    through their squares), but negates the k-th term; so that term has expectation 0 (it is
    integrable: |g w| <= sqrt(N_A / eps) and E|g_B| < inf even for t(3)). Take k in A's half:
    there B's values are pure noise, independent of A (hence of w_k); flipping them negates the
    term. The two halves cover the slice, so `E M_signed[i, j] = 0` for every pair, exactly. (The
    same argument holds for the pooled Fisher, which also sees only squares.) What the estimated w
    does break is the fixed-kernel U-statistic form that the variance estimate assumes: every
    M[i, j] shares A's F. That is why this is checked by simulation rather than assumed; t(3),
    whose 4th moment is infinite, makes F (a mean of squares over 40 samples) very noisy.

    Cells are independent tests: they hold disjoint elements, the noise is independent across
    elements, and w_k depends only on element k's data. Over 20 seeds x 24 cells = 480 tests:
      (a) every cell is tested (status ok, n_a 40, n_b 25), no NaN, and the reported p is the
          two-sided Student t tail `2 t_df.sf(|mean / se|)` of the reported df. The reference
          distribution is checked directly because (b) alone cannot see a normal one: with means
          this small the U-statistic is nearly degenerate, the Satterthwaite df has median ~16-18,
          and a normal reference rejects 6.0% (Gaussian) and 7.1% (t3) of these null cells at
          5%, inside the bound of (b);
      (b) the raw rejection rate P(p < 0.05) is within the binomial Monte-Carlo bound
          0.05 +- 3 sqrt(0.05 x 0.95 / 480) = [0.020, 0.080];
      (c) the 480 p-values are uniform: Kolmogorov-Smirnov (scipy.stats.kstest against U(0, 1))
          p > 0.001;
      (d) BH: q is the Benjamini-Hochberg adjustment of the 24 p-values of the pair, and under
          this complete null any discovery is false, so FDR = P(any q < alpha) <= alpha per pair;
          over 20 independent seeds the fraction of seeds with some q < alpha must be
          <= 0.05 + 3 sqrt(0.05 x 0.95 / 20) = 0.196; no cell is labelled in more than alpha of
          all cells.
    Observed at these seeds: P(p < 0.05) 0.035 (Gaussian) and 0.035 (t3), P(p < 0.01) 0.002 and
    0.000, KS p 0.44 and 0.65, no seed with a q < alpha. Over 100 other seeds (2400 cells):
    0.046 (Gaussian, KS p 0.74) and 0.038 (t3, KS p 0.04): slightly conservative under t(3)
    noise, never anti-conservative; the pooled Fisher gives 0.046 and 0.037.
    """
    tables = []
    for seed in NULL_SEEDS:
        rng = np.random.default_rng(seed)
        scales = noise_scales(rng, 1.0)
        grads_a = sample(rng, NULL_N_A, orthogonal_means(rng, scales, "a", NULL_MAGNITUDE), scales, noise)
        grads_b = sample(rng, NULL_N_B, orthogonal_means(rng, scales, "b", NULL_MAGNITUDE), scales, noise)
        store_a, store_b, _ = write_stores(tmp_path, f"null-{noise}-{seed}", grads_a, grads_b, seed=seed)
        cells = pair_qkov(store_a, store_b, QkovOptions(alpha=ALPHA, n_bootstrap=0, top_k=0))["cells"]
        assert (cells["status"] == "ok").all(), cells["status"].value_counts()
        assert (cells["n_a"] == NULL_N_A).all() and (cells["n_b"] == NULL_N_B).all()
        assert_no_nan(cells)
        z = cells["signed_mean"] / cells["signed_se"]
        np.testing.assert_allclose(cells["signed_p"], 2 * stats.t.sf(np.abs(z), cells["df"]), rtol=1e-9)
        np.testing.assert_allclose(cells["signed_q"],
                                   stats.false_discovery_control(cells["signed_p"], method="bh"), rtol=1e-12)
        tables.append(cells)
    p = pd.concat(tables)["signed_p"].to_numpy(dtype=float)
    bound = 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(p))
    rate = np.mean(p < ALPHA)
    ks = stats.kstest(p, "uniform").pvalue
    any_q = np.mean([(t["signed_q"] < ALPHA).any() for t in tables])
    labelled = np.mean([(t["label"] != "none").mean() for t in tables])
    df = pd.concat(tables)["df"]
    text = (f"{noise}: p<0.05 in {rate:.4f} of {len(p)} cells (bound {ALPHA} +- {bound:.4f}), p<0.01 in "
            f"{np.mean(p < 0.01):.4f}, KS p {ks:.3f}, seeds with some q<alpha {any_q:.3f}, labelled {labelled:.4f}, "
            f"df median {df.median():.1f} (min {df.min():.1f})")
    print(text)
    assert len(p) == len(NULL_SEEDS) * len(CELLS)
    assert abs(rate - ALPHA) <= bound, text
    assert ks > 0.001, f"{text}: p-values not uniform"
    assert any_q <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(NULL_SEEDS)), text
    assert labelled <= ALPHA, text


# --- 2. power and false discoveries --------------------------------------------------------------

POWER_SEEDS = list(range(20))
POWER_N = 64
POWER_SNR = 0.1
#: Planted conflict cells (B's mean = -A's mean over the whole slice): 8 of the 24.
PLANTED = {("q", 0), ("q", 1), ("q", 5), ("k", 2), ("v", 0), ("o", 3), ("o", 6), ("o", 7)}


def planted_means(rng: np.random.Generator, scales: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Means of A and B: mu_B = -mu_A with |mu| = SNR x sd on every element of the planted cells,
    disjoint-support (orthogonal) means of the same SNR elsewhere."""
    mean_a = orthogonal_means(rng, scales, "a", POWER_SNR)
    mean_b = orthogonal_means(rng, scales, "b", POWER_SNR)
    for block, head in PLANTED:
        param, inside = PARAM[block], head_mask(block, head)
        conflict = POWER_SNR * scales[param] * rng.choice([-1.0, 1.0], size=SHAPES[param])
        mean_a[param] = np.where(inside, conflict, mean_a[param])
        mean_b[param] = np.where(inside, -conflict, mean_b[param])
    return mean_a, mean_b


def test_power_planted_conflicts(tmp_path):
    """Planted conflicts are found, with few false discoveries.

    Generator: the layout above (24 cells of 512 elements); per-element noise sd exp(0.3 x normal)
    (heteroscedastic), Gaussian noise, N_A = N_B = 64. In the 8 planted cells (`PLANTED`: q heads
    0, 1, 5, k head 2, v head 0, o heads 3, 6, 7) B's mean is minus A's on every element, with
    per-coordinate SNR |mu| / sd = 0.1 exactly; in the other 16 cells the means have the same SNR on
    disjoint halves of the slice (the exact null of the calibration test). Expected signed mean of a
    planted cell: -SNR^2 / (1 + SNR^2) ~ -0.0099; its z is about 0.42 sqrt(512) ~ 9.6 (per element,
    var(abar bbar / sd^2) ~ 2 SNR^2 / N + 1 / N^2).

    Checks over 20 seeds: >= 95% of the 160 planted cells have signed_q < 0.05 and are labelled
    `conflict`; the false discovery proportion (cells with q < 0.05 that are not planted, over all
    cells with q < 0.05; 0 when none) averaged over seeds is <= 5%. With power ~1, BH's expected
    FDP is alpha x 16 / 24 = 0.033. Observed: every planted cell found in every seed (8 of 8;
    the smallest planted |z| is printed), mean FDP 0.027 (4 of 20 seeds with one false
    discovery); without BH the mean FDP would be 0.064.
    """
    power, fdp, z_planted = [], [], []
    for seed in POWER_SEEDS:
        rng = np.random.default_rng(1000 + seed)
        scales = noise_scales(rng, 0.3)
        mean_a, mean_b = planted_means(rng, scales)
        grads_a, grads_b = sample(rng, POWER_N, mean_a, scales), sample(rng, POWER_N, mean_b, scales)
        store_a, store_b, _ = write_stores(tmp_path, f"power-{seed}", grads_a, grads_b, seed=seed)
        cells = pair_qkov(store_a, store_b, QkovOptions(alpha=ALPHA, n_bootstrap=0, top_k=0))["cells"]
        assert (cells["status"] == "ok").all()
        assert_no_nan(cells)
        planted = np.array([cell_key(row) in PLANTED for _, row in cells.iterrows()])
        found = (cells["signed_q"] < ALPHA).to_numpy()
        power.extend(found[planted] & (cells["label"][planted] == "conflict").to_numpy())
        fdp.append((found & ~planted).sum() / max(found.sum(), 1))
        z_planted.extend(np.abs(cells["signed_mean"] / cells["signed_se"])[planted])
    rate, mean_fdp = np.mean(power), np.mean(fdp)
    text = (f"power {rate:.3f} over {len(power)} planted cells (smallest |z| {min(z_planted):.1f}); mean FDP "
            f"{mean_fdp:.4f} (seeds with a false discovery: {np.mean(np.array(fdp) > 0):.2f})")
    print(text)
    assert rate >= 0.95, text
    assert mean_fdp <= ALPHA, text


# --- 3. sample forensics: planted sample pairs ---------------------------------------------------

FORENSIC_N_A, FORENSIC_N_B = 40, 32
PLANTED_A, PLANTED_B = (3, 7), (2, 5)
PLANTED_CELL = ("q", 1)
LOUD_CELL = ("o", 2)  # B's gradients 30x larger here: the largest raw scores, but no excess
LOUD_A = 11  # A's sample 11 is 4x larger everywhere in head q 1: large M with every B sample, no shared push


def forensic_grads() -> tuple[dict, dict, np.ndarray]:
    """Canonical samples (row i is sample `a-{i}` / `b-{i}`): zero means, Gaussian noise of sd
    exp(0.3 x normal) per element; in head q 1 the first 2 of its 16 rows (64 of 512 elements,
    `hot`) A's samples 3, 7 and B's samples 2, 5 have |g| = 8 sd (random signs); B's head o 2 is
    30x louder in every sample; A's sample 11 is 4x larger in all of head q 1."""
    rng = np.random.default_rng(42)
    scales = noise_scales(rng, 0.3)
    zero = {param: np.zeros(SHAPES[param]) for param in PER_SAMPLE}
    grads_a, grads_b = sample(rng, FORENSIC_N_A, zero, scales), sample(rng, FORENSIC_N_B, zero, scales)
    rows = np.arange(SHAPES[QP][0])
    hot = _along_heads(QP, (rows // HEAD_DIM == PLANTED_CELL[1]) & (rows % HEAD_DIM < 2))
    for grads, planted in ((grads_a, PLANTED_A), (grads_b, PLANTED_B)):
        for i in planted:
            big = 8 * scales[QP] * rng.choice([-1.0, 1.0], size=SHAPES[QP])
            grads[QP][i] = np.where(hot, big, grads[QP][i])
    grads_b[OP][:, head_mask(*LOUD_CELL)] *= 30
    grads_a[QP][LOUD_A, head_mask(*PLANTED_CELL)] *= 4
    return grads_a, grads_b, hot


def expected_unsigned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The unsigned pair matrix of one cell, `mean_k a_ik^2 b_jk| / max(F_A,k, eps)`, from raw slices."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    weight = 1 / np.maximum(np.mean(a ** 2, axis=0), 1e-10)
    return (a ** 2 * weight) @ np.abs(b).T / a.shape[1]


@pytest.mark.parametrize("order", ["as_generated", "shuffled", "filtered_shuffled"])
def test_forensics_name_the_planted_sample_pairs(tmp_path, order):
    """The four planted pairs (A 3 or 7 with B 2 or 5, all in head q 1) are the top 4 of
    `top_conflicts` (default unsigned variant, ranked by excess = M[i, j] mean(M) / (mean_j M[i, j]
    mean_i M[i, j])), named by their true ids, whether the samples are stored in generation order,
    in shuffled order, or shuffled with some other samples dropped; A is read in blocks of 7
    samples (`sample_block`), so ids must follow the rows across blocks. Ranking by the raw score
    would list the loud head o 2 instead (its M is ~30x larger for every pair), and normalising by
    B's side alone (M[i, j] / mean_i M[i, j]) would list A's loud sample 11 with ordinary samples
    of B. Score, a_alone, b_alone and excess of every listed pair equal the values recomputed from
    the raw gradients of exactly those two samples."""
    grads_a, grads_b, _ = forensic_grads()
    rng = np.random.default_rng({"as_generated": 0, "shuffled": 1, "filtered_shuffled": 2}[order])
    keep_a, keep_b = np.arange(FORENSIC_N_A), np.arange(FORENSIC_N_B)
    if order == "filtered_shuffled":  # drop samples that were not planted (ids are then not contiguous)
        keep_a = np.setdiff1d(keep_a, [0, 1, 4, 11, 12, 13, 30, 39])
        keep_b = np.setdiff1d(keep_b, [0, 1, 3, 20, 31])
    if order != "as_generated":
        keep_a, keep_b = rng.permutation(keep_a), rng.permutation(keep_b)
    rows_a = {param: grads[keep_a] for param, grads in grads_a.items()}
    rows_b = {param: grads[keep_b] for param, grads in grads_b.items()}
    store_a = write_store_with_ids(tmp_path / "a.zarr", "a", rows_a, [f"a-{i}" for i in keep_a])
    store_b = write_store_with_ids(tmp_path / "b.zarr", "b", rows_b, [f"b-{i}" for i in keep_b])
    assert store_a.sample_ids == [f"a-{i}" for i in keep_a]
    top_k = 10
    result = pair_qkov(store_a, store_b, QkovOptions(top_k=top_k, sample_block=7, n_bootstrap=0, forensics="excess"))
    top = result["top_conflicts"]
    assert len(top) == top_k and list(top["rank"]) == list(range(1, top_k + 1))
    assert (top["variant"] == "unsigned").all() and (np.diff(top["excess"]) <= 0).all()
    planted = {(f"a-{i}", f"b-{j}") for i in PLANTED_A for j in PLANTED_B}
    first = top.iloc[:4]
    assert set(zip(first["sample_a"], first["sample_b"], strict=True)) == planted, top
    assert ((first["block"] == PLANTED_CELL[0]) & (first["head"] == PLANTED_CELL[1]) & (first["layer"] == 0)).all()
    assert top.iloc[4]["excess"] < 0.6 * top.iloc[3]["excess"], top  # a clear gap below the planted pairs
    # every listed pair's numbers, from the raw gradients of the samples its ids name
    for _, row in top.iterrows():
        mask = head_mask(row["block"], int(row["head"]))
        a, b = rows_a[PARAM[row["block"]]][:, mask], rows_b[PARAM[row["block"]]][:, mask]
        matrix = expected_unsigned(a, b)
        i = int(np.flatnonzero(keep_a == int(row["sample_a"].split("-")[1]))[0])
        j = int(np.flatnonzero(keep_b == int(row["sample_b"].split("-")[1]))[0])
        np.testing.assert_allclose(row["score"], matrix[i, j], rtol=1e-4)
        np.testing.assert_allclose(row["a_alone"], matrix[i].mean(), rtol=1e-4)
        np.testing.assert_allclose(row["b_alone"], matrix[:, j].mean(), rtol=1e-4)
        np.testing.assert_allclose(row["excess"], matrix[i, j] * matrix.mean() / (matrix[i].mean()
                                                                                   * matrix[:, j].mean()), rtol=1e-4)
    # the loud head holds more than top_k pairs whose raw score beats every planted pair's (so a ranking
    # by raw score would list only loud pairs), yet none of its pairs is listed
    mask = head_mask(*LOUD_CELL)
    loud = expected_unsigned(rows_a[PARAM[LOUD_CELL[0]]][:, mask], rows_b[PARAM[LOUD_CELL[0]]][:, mask])
    assert (loud > first["score"].max()).sum() > top_k, (np.sort(loud.ravel())[-top_k:], first["score"])
    assert not ((top["block"] == LOUD_CELL[0]) & (top["head"] == LOUD_CELL[1])).any()
    # A's loud sample: by B's side alone its pairs with ordinary samples of B outrank the planted
    # pairs (the ranking this phase once used); with both sides it is not listed
    mask = head_mask(*PLANTED_CELL)
    matrix = expected_unsigned(rows_a[QP][:, mask], rows_b[QP][:, mask])
    one_sided = matrix / matrix.mean(axis=0)
    loud_row = int(np.flatnonzero(keep_a == LOUD_A)[0]) if LOUD_A in keep_a else None
    if loud_row is not None:
        planted_rows = [int(np.flatnonzero(keep_a == i)[0]) for i in PLANTED_A]
        planted_cols = [int(np.flatnonzero(keep_b == j)[0]) for j in PLANTED_B]
        ordinary = np.setdiff1d(np.arange(len(keep_b)), planted_cols)
        assert one_sided[loud_row, ordinary].max() > one_sided[np.ix_(planted_rows, planted_cols)].min()
        assert f"a-{LOUD_A}" not in set(top["sample_a"]), top


# --- 4. degenerate inputs ------------------------------------------------------------------------

def _null_grads(rng: np.random.Generator, n_a: int, n_b: int) -> tuple[dict, dict]:
    scales = noise_scales(rng, 1.0)
    return (sample(rng, n_a, orthogonal_means(rng, scales, "a", 0.3), scales),
            sample(rng, n_b, orthogonal_means(rng, scales, "b", 0.3), scales))


@pytest.mark.parametrize("single", ["a", "b"])
def test_one_sample_task_is_untested_with_a_warning(tmp_path, caplog, single):
    """A task with a single sample: every cell `too_few_samples`, label `none`, p = q = 1, finite
    signed mean and score, and a warning naming both tasks."""
    n_a, n_b = (1, 10) if single == "a" else (10, 1)
    grads_a, grads_b = _null_grads(np.random.default_rng(7), n_a, n_b)
    store_a, store_b, _ = write_stores(tmp_path, "one", grads_a, grads_b, task_a="code", task_b="prose")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = pair_qkov(store_a, store_b, QkovOptions(n_bootstrap=50))
    cells = result["cells"]
    assert len(cells) == len(CELLS)
    assert (cells["status"] == "too_few_samples").all(), cells["status"]
    assert (cells["label"] == "none").all()
    assert (cells["signed_p"] == 1).all() and (cells["signed_q"] == 1).all()
    assert (cells["n_a"] == n_a).all() and (cells["n_b"] == n_b).all()
    assert_no_nan(cells)
    assert np.isfinite(cells[["signed_mean", "score_mean", "score_ci_low", "score_ci_high"]].to_numpy()).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("code" in m and "prose" in m and "too_few_samples" in m for m in warnings), warnings
    top = result["top_conflicts"]
    assert set(top["sample_a"]) <= set(store_a.sample_ids) and set(top["sample_b"]) <= set(store_b.sample_ids)


ZERO_CELL = ("k", 1)


@pytest.mark.parametrize("ridge_lambda", [0.0, 1e-3])
def test_all_zero_head_is_untested_and_outputs_are_written(tmp_path, caplog, ridge_lambda):
    """A head whose gradients are zero in every sample of both tasks (its Fisher is all zero):
    status `zero_gradients`, label `none`, signed mean and score exactly 0 (no NaN / inf although
    w = 1 / (eps + lambda) is huge there), its health row has fisher_min = fisher_max = eps + lambda
    (and fraction_below_eps = 1; with a ridge too, see the next test); a warning
    names the cell; every other cell is tested; `run_qkov` writes the tables without NaN in the
    numeric columns, and the figure."""
    grads_a, grads_b = _null_grads(np.random.default_rng(9), 12, 9)
    zero = head_mask(*ZERO_CELL)
    for grads in (grads_a, grads_b):
        grads[PARAM[ZERO_CELL[0]]][:, zero] = 0.0
    store_a, store_b, paths = write_stores(tmp_path, "zero", grads_a, grads_b)
    options = QkovOptions(ridge_lambda=ridge_lambda, n_bootstrap=50)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = pair_qkov(store_a, store_b, options)
    cells, health = result["cells"], result["health"]
    is_zero = np.array([cell_key(row) == ZERO_CELL for _, row in cells.iterrows()])
    row = cells[is_zero].iloc[0]
    assert row["status"] == "zero_gradients" and row["label"] == "none", row
    assert row["signed_p"] == 1 and row["signed_q"] == 1
    for column in ("signed_mean", "score_mean", "score_ci_low", "score_ci_high"):
        assert row[column] == 0.0, (column, row[column])
    assert (cells[~is_zero]["status"] == "ok").all()
    assert np.isfinite(cells[~is_zero]["signed_se"]).all() and (cells[~is_zero]["signed_se"] > 0).all()
    assert_no_nan(cells)
    zero_health = health[(health["block"] == ZERO_CELL[0]) & (health["head"] == ZERO_CELL[1])].iloc[0]
    if ridge_lambda == 0:
        assert zero_health["fraction_below_eps"] == 1.0, zero_health
    np.testing.assert_allclose([zero_health["fisher_min"], zero_health["fisher_max"]], options.eps + ridge_lambda)
    others = health[(health["block"] != ZERO_CELL[0]) | (health["head"] != ZERO_CELL[1])]
    assert (others["fraction_below_eps"] == 0).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("zero_gradients" in m and "k head 1" in m for m in warnings), warnings
    assert not ((result["top_conflicts"]["block"] == ZERO_CELL[0])
                & (result["top_conflicts"]["head"] == ZERO_CELL[1])).any()

    out = tmp_path / "out"
    written = run_qkov(paths, out, options)
    for key in ("cells_csv", "cells_parquet", "health_csv", "top_conflicts_csv", "figure_a__b"):
        assert written[key].is_file() and written[key].stat().st_size > 0 and written[key].parent == out, key
    assert written["figure_a__b"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for table in (pd.read_csv(written["cells_csv"]), pd.read_parquet(written["cells_parquet"])):
        assert len(table) == len(CELLS) and not table[NUMERIC].isna().any().any(), table[NUMERIC]
        assert list(table["status"]) == list(cells["status"])


def test_fraction_below_eps_with_a_ridge(tmp_path):
    """With ridge_lambda 1e-3, a head whose Fisher is all zero must still report fraction_below_eps = 1."""
    grads_a, grads_b = _null_grads(np.random.default_rng(9), 6, 5)
    for grads in (grads_a, grads_b):
        grads[PARAM[ZERO_CELL[0]]][:, head_mask(*ZERO_CELL)] = 0.0
    store_a, store_b, _ = write_stores(tmp_path, "ridge", grads_a, grads_b)
    health = pair_qkov(store_a, store_b, QkovOptions(ridge_lambda=1e-3, n_bootstrap=0, top_k=0))["health"]
    zero_health = health[(health["block"] == ZERO_CELL[0]) & (health["head"] == ZERO_CELL[1])].iloc[0]
    assert zero_health["fraction_below_eps"] == 1.0, zero_health


@pytest.mark.parametrize("per_sample", [(), (MLP,)], ids=["none", "mlp_only"])
def test_no_per_sample_attention_gradients_is_refused(tmp_path, per_sample):
    """Stores without per-sample gradients of any attention parameter: PhaseInputError (a
    FisherPipelineError) naming per_sample_params, and nothing written."""
    grads_a, grads_b = _null_grads(np.random.default_rng(8), 6, 5)
    mlp = {MLP: np.random.default_rng(1).normal(size=(6, *SHAPES[MLP]))}
    _, _, paths = write_stores(tmp_path, "none", grads_a | mlp, grads_b | {MLP: mlp[MLP][:5]},
                               per_sample=per_sample, shapes=SHAPES)
    out = tmp_path / "out-none"
    with pytest.raises(PhaseInputError) as err:
        run_qkov(paths, out)
    assert isinstance(err.value, FisherPipelineError)
    assert "per_sample_params" in str(err.value), str(err.value)
    assert not out.exists()


# --- 5. what one product per cell gives: the score's interval, signed forensics ----------------

def _cell_matrices(store_a: FisherStore, store_b: FisherStore, transforms: tuple[str, str]) -> dict:
    """(block, head) -> the cell's pair matrix `agg_mean f(g_A) / Fhat h(g_B)`, float64, by the pair engine's
    plain product (checked against brute force in test_sample_pairs), with phase 6's default metric."""
    from fisher_pipeline.sample_pairs import pair_matrices

    cells = [(PARAM[block], block, head) for block, head in CELLS]
    weights = {p: 1.0 / (np.maximum(store_a.fisher(p).astype(np.float64), 1e-10)) for p in PER_SAMPLE}
    matrices = pair_matrices(store_a, store_b, cells, *transforms, weights, dtype="float64")
    return {(block, head): matrices[cell] / SLICE for cell, (block, head) in zip(cells, CELLS, strict=True)}


def test_score_interval_is_the_first_order_bootstrap_of_the_full_matrix(tmp_path):
    """`score_mean` is the mean of the unsigned matrix phase 6 no longer forms, and the interval is the
    2.5 / 97.5 percentiles of `(c . rows + d . cols) / (N_A N_B) - mean` over the phase's resample counts
    (c of A's samples, d of B's), recomputed here from the full matrix. Against the full bootstrap
    `c^T M d / (N_A N_B)` on the same draws, each end lies within 10% of the interval's width, and
    the widths agree within 10%: what the first order leaves out is the small pair-level part."""
    seed = int(np.random.default_rng().integers(2**31))
    grads_a, grads_b = _null_grads(np.random.default_rng(seed), 24, 20)
    store_a, store_b, _ = write_stores(tmp_path, "ci", grads_a, grads_b)
    n_bootstrap = 400
    cells = pair_qkov(store_a, store_b, QkovOptions(n_bootstrap=n_bootstrap, top_k=0,
                                                    compute_dtype="float64"))["cells"].set_index(["block", "head"])
    rng = np.random.default_rng(0)  # the phase's draws
    draws_a = rng.multinomial(24, np.full(24, 1 / 24), size=n_bootstrap)
    draws_b = rng.multinomial(20, np.full(20, 1 / 20), size=n_bootstrap)
    for cell, matrix in _cell_matrices(store_a, store_b, ("square", "abs")).items():
        row = cells.loc[cell]
        mean = matrix.mean()
        assert row["score_mean"] == pytest.approx(mean, rel=1e-9), (seed, cell)
        first = (draws_a @ matrix.sum(1) + draws_b @ matrix.sum(0)) / matrix.size - mean
        low, high = np.percentile(first, [2.5, 97.5])
        assert (row["score_ci_low"], row["score_ci_high"]) == pytest.approx((low, high), rel=1e-9), (seed, cell)
        full = np.einsum("ri,ij,rj->r", draws_a, matrix, draws_b) / matrix.size
        full_low, full_high = np.percentile(full, [2.5, 97.5])
        width, full_width = high - low, full_high - full_low
        assert abs(low - full_low) < 0.1 * full_width and abs(high - full_high) < 0.1 * full_width, (seed, cell)
        assert width == pytest.approx(full_width, rel=0.1), (seed, cell)


def test_signed_forensics_list_the_most_negative_signed_pairs(tmp_path):
    """Default `forensics: signed`: `top_conflicts` holds the `top_k` most negative signed scores over
    all cells and sample pairs, ranked, by sample id, each equal to the brute-force value; `excess`
    is NaN (no ratio for a signed score) and `variant` says which score ranks."""
    seed = int(np.random.default_rng().integers(2**31))
    grads_a, grads_b = _null_grads(np.random.default_rng(seed), 9, 7)
    store_a, store_b, _ = write_stores(tmp_path, "signed", grads_a, grads_b)
    top = pair_qkov(store_a, store_b, QkovOptions(top_k=6, n_bootstrap=0, compute_dtype="float64"))["top_conflicts"]
    pairs = sorted((value, block, head, store_a.sample_ids[i], store_b.sample_ids[j])
                   for (block, head), matrix in _cell_matrices(store_a, store_b, ("identity", "identity")).items()
                   for (i, j), value in np.ndenumerate(matrix))[:6]
    assert list(top["rank"]) == list(range(1, 7)) and (top["variant"] == "signed").all(), seed
    assert top["excess"].isna().all()
    got = list(zip(top["block"], top["head"], top["sample_a"], top["sample_b"], strict=True))
    assert got == [(block, head, a, b) for _, block, head, a, b in pairs], seed
    np.testing.assert_allclose(top["score"], [value for value, *_ in pairs], rtol=1e-9, err_msg=str(seed))


def test_excess_forensics_need_an_unsigned_or_symmetric_score():
    from fisher_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="qkov.forensics = excess ranks the unsigned or symmetric score, but "
                                          "qkov.variant is signed"):
        QkovOptions(variant="signed", forensics="excess")
    assert QkovOptions(variant="symmetric", forensics="excess").forensics == "excess"
