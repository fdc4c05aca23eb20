"""Statistical tests of phase 5 (`fisher_pipeline.phases.conflicts`): calibration, power, edge cases.

Every store is written by the production accumulator and store writer (`store_factory.make_store`)
and read back with `FisherStore`, so the phase is tested on exactly what phase 1 writes.

Layout: one layer with a q_proj of 4 query heads, a k_proj of 2 KV heads (GQA) and an o_proj of
4 heads, head_dim 32 and d_model 32, so every head slice holds 32 x 32 = 1024 elements (the
default tiny layout's heads hold 12). Groups per task pair: 3 whole parameters + 10 heads.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fisher_pipeline.errors import FisherPipelineError, PhaseInputError, StoreMismatchError
from fisher_pipeline.layout import GroupSpec
from fisher_pipeline.phases.conflicts import ConflictsOptions
from fisher_pipeline.phases.conflicts.compute import pair_conflicts, run_conflicts
from fisher_pipeline.store import FisherStore
from store_factory import make_store

D_MODEL, HEAD_DIM, N_HEADS, N_KV_HEADS = 32, 32, 4, 2
QP = "model.layers.0.self_attn.q_proj.weight"
KP = "model.layers.0.self_attn.k_proj.weight"
OP = "model.layers.0.self_attn.o_proj.weight"
NORM = "model.norm.weight"
SHAPES = {QP: (N_HEADS * HEAD_DIM, D_MODEL), KP: (N_KV_HEADS * HEAD_DIM, D_MODEL), OP: (D_MODEL, N_HEADS * HEAD_DIM),
          NORM: (D_MODEL,)}
SPECS = {QP: GroupSpec.heads(0, ("q", N_HEADS, HEAD_DIM)), KP: GroupSpec.heads(0, ("k", N_KV_HEADS, HEAD_DIM)),
         OP: GroupSpec.heads(1, ("o", N_HEADS, HEAD_DIM))}
PER_SAMPLE = (QP, KP, OP)
BLOCK = {QP: "q", KP: "k", OP: "o"}
HEAD_AXIS = {QP: 0, KP: 0, OP: 1}  # the dimension along which the parameter's heads lie
ALPHA = 0.05
#: Columns that must never hold NaN (untested groups carry finite placeholders; se may be inf).
NUMERIC = ["mean", "se", "p", "q", "within_a_mean", "within_b_mean", "df"]  # effect_size: NaN where W <= 0
LOGGER = "fisher_pipeline.phases.conflicts.compute"


# --- synthetic per-sample gradients ---------------------------------------------------------

def _along_heads(param: str, values: np.ndarray) -> np.ndarray:
    """Broadcast `values` `[positions along the head axis]` to the parameter's shape."""
    shape = [1] * len(SHAPES[param])
    shape[HEAD_AXIS[param]] = SHAPES[param][HEAD_AXIS[param]]
    return np.broadcast_to(values.reshape(shape), SHAPES[param])


def head_index(param: str) -> np.ndarray:
    """Head of every element of `param` (its shape)."""
    return _along_heads(param, np.arange(SHAPES[param][HEAD_AXIS[param]]) // HEAD_DIM)


def first_half(param: str) -> np.ndarray:
    """True on the first half of every head's slice (positions 0..15 of each head along the head axis)."""
    return _along_heads(param, np.arange(SHAPES[param][HEAD_AXIS[param]]) % HEAD_DIM < HEAD_DIM // 2)


def noise_scales(rng: np.random.Generator, spread: float) -> dict[str, np.ndarray]:
    """Heteroscedastic per-element noise sd `exp(spread * normal)` (a spread of Fisher values)."""
    return {param: np.exp(spread * rng.normal(size=SHAPES[param])) for param in PER_SAMPLE}


def orthogonal_means(rng: np.random.Generator, scales: dict[str, np.ndarray], side: str,
                     magnitude: float = 0.3) -> dict[str, np.ndarray]:
    """Mean gradients of task `side` ('a' or 'b') with supports disjoint from the other task's in every group.

    A's mean is non-zero only on the first half of each head slice, B's only on the second half,
    with |mean| = `magnitude` x noise sd and random signs. Each head group then has disjoint
    supports, and so has each whole parameter (a union of heads).
    """
    means = {}
    for param in PER_SAMPLE:
        support = first_half(param) if side == "a" else ~first_half(param)
        signs = rng.choice([-1.0, 1.0], size=SHAPES[param])
        means[param] = magnitude * scales[param] * signs * support
    return means


def sample(rng: np.random.Generator, n: int, means: dict[str, np.ndarray], scales: dict[str, np.ndarray],
           noise: str) -> dict[str, np.ndarray]:
    """Per-sample gradients `[n, *shape]` = mean + sd x (standard normal or Student t(3)), float32."""
    grads = {}
    for param in PER_SAMPLE:
        shape = (n, *SHAPES[param])
        draw = rng.standard_normal(shape) if noise == "gauss" else rng.standard_t(3, shape)
        grads[param] = (means[param] + scales[param] * draw).astype(np.float32)
    return grads


def write_stores(tmp_path, name: str, grads_a: dict, grads_b: dict, seed: int = 0,
                 per_sample_a: tuple[str, ...] = PER_SAMPLE, per_sample_b: tuple[str, ...] = PER_SAMPLE,
                 task_a: str = "a", task_b: str = "b") -> tuple[FisherStore, FisherStore, dict]:
    """Write tasks A and B through the store writer; return the opened stores and their paths."""
    n_a = next(iter(grads_a.values())).shape[0] if grads_a else 8
    n_b = next(iter(grads_b.values())).shape[0] if grads_b else 8
    path_a = make_store(tmp_path / f"{name}-{task_a}.zarr", n_samples=n_a, seed=seed, task=task_a, shapes=SHAPES,
                        specs=SPECS, grads=grads_a, per_sample=per_sample_a, batch_size=32)
    path_b = make_store(tmp_path / f"{name}-{task_b}.zarr", n_samples=n_b, seed=seed + 1, task=task_b,
                        shapes=SHAPES, specs=SPECS, grads=grads_b, per_sample=per_sample_b, batch_size=32)
    return FisherStore(path_a), FisherStore(path_b), {task_a: path_a, task_b: path_b}


def group_key(row) -> tuple[str, str | None, int | None]:
    return (row["param"], None, None) if pd.isna(row["block"]) else (row["param"], row["block"], int(row["head"]))


def assert_no_nan(table: pd.DataFrame) -> None:
    values = table[NUMERIC].to_numpy(dtype=float)
    assert not np.isnan(values).any(), table.loc[np.isnan(values).any(axis=1), ["param", "block", "head", *NUMERIC]]


def test_layout_has_the_expected_groups(tmp_path):
    """The custom layout gives 3 whole parameters and 4 + 2 + 4 heads of 1024 elements each."""
    rng = np.random.default_rng(0)
    scales = noise_scales(rng, 1.0)
    grads_a = sample(rng, 4, orthogonal_means(rng, scales, "a"), scales, "gauss")
    grads_b = sample(rng, 3, orthogonal_means(rng, scales, "b"), scales, "gauss")
    store_a, store_b, _ = write_stores(tmp_path, "layout", grads_a, grads_b)
    table, _ = pair_conflicts(store_a, store_b)
    keys = [group_key(row) for _, row in table.iterrows()]
    assert keys == [(QP, None, None), *[(QP, "q", h) for h in range(4)],
                    (KP, None, None), *[(KP, "k", h) for h in range(2)],
                    (OP, None, None), *[(OP, "o", h) for h in range(4)]]
    # head index / half-slice helpers agree with the store's own geometry
    for param in PER_SAMPLE:
        geometry = store_a.geometry[param]
        positions = geometry.positions(BLOCK[param])
        assert positions.shape == (N_HEADS if param != KP else N_KV_HEADS, HEAD_DIM)
        index = head_index(param).take(0, axis=1 - HEAD_AXIS[param])  # head of each position along the head axis
        for head, pos in enumerate(positions):
            assert (index[pos] == head).all()
    assert (table["n_a"] == 4).all() and (table["n_b"] == 3).all()


# --- 1. calibration under the null ------------------------------------------------------------

NULL_SEEDS = list(range(20))


@pytest.mark.parametrize("noise", ["gauss", "t3"])
def test_null_calibration_orthogonal_means(tmp_path, noise):
    """Null hypothesis, in plain words: *in this group, a random sample of A and a random sample
    of B have gradients that are, on average, orthogonal* (mean pair similarity 0).

    Construction (exact null in every group, for both similarities). Task A's mean gradient is
    non-zero (|mean| = 0.3 x noise sd, random signs) only on the first half of every head slice,
    B's only on the second half; noise is independent across samples and elements,
    sign-symmetric (Gaussian or Student t with 3 df), with heteroscedastic sd exp(normal) per
    element. Why the mean similarity is then exactly 0: take an element k outside supp(mu_B);
    there b_jk is pure noise, and flipping its sign leaves the distribution unchanged (sign
    symmetry, independence) and changes neither |b_j| nor any Fisher weight (the Fisher is a sum
    of squared gradients, so `W = 1 / (F_pool + lambda)` and the weighted norms are sign
    invariant), but negates the k-th term of <a_i, b_j>_W / (|a_i|_W |b_j|_W). So every term k
    outside supp(mu_B) has expectation 0, and likewise every term outside supp(mu_A) (flip a_ik).
    With disjoint supports every k is outside one of them: E[s_ij] = 0 in every head and in
    every whole parameter (a union of heads). For cosine this is E[cos] = <E[a/|a|], E[b/|b|]>
    with E[b/|b|] supported on supp(mu_B).

    Unequal samples N_A = 40, N_B = 25; 20 seeds; cosine and fisher on the same stores.
    Checks per similarity:
      (a) the fraction of groups labelled conflict or synergy, averaged over seeds, is <= alpha;
      (b) the raw rejection rate P(p < 0.05). Heads are independent tests (disjoint elements,
          independent noise; for `fisher` up to the shared damping lambda, a mean over the
          parameter), so the 10 x 20 = 200 head tests give a binomial Monte-Carlo bound
          0.05 +- 3 sqrt(0.05 x 0.95 / 200) = [0.004, 0.096]. Whole-parameter groups (3 per seed,
          independent of each other but not of their heads) are a second family of 60
          independent tests: bound 0.05 + 3 sqrt(0.05 x 0.95 / 60) = 0.134. The rate over all
          groups is a weighted mean of the two, so it is bounded by the larger bound.
      (c) the 200 head p-values are uniform: Kolmogorov-Smirnov p > 0.001 (a check of the whole
          p-value distribution, not only its 5% tail);
      (d) the BH q-values control the false discovery rate: under this complete null a false
          discovery proportion is 1 as soon as one q < alpha, so FDR = P(any q < alpha) <= alpha
          per task pair. Seeds are independent: the fraction of seeds with some q < alpha must be
          <= 0.05 + 3 sqrt(0.05 x 0.95 / 20) = 0.196.
    Observed at these seeds (heads): raw rejection 0.035 (gauss cosine), 0.055 (gauss fisher),
    0.065 (t3 cosine), 0.035 (t3 fisher); over 200 other seeds 0.033, 0.046, 0.042, 0.051.
    """
    results = {"cosine": [], "fisher": []}
    for seed in NULL_SEEDS:
        rng = np.random.default_rng(seed)
        scales = noise_scales(rng, 1.0)
        grads_a = sample(rng, 40, orthogonal_means(rng, scales, "a"), scales, noise)
        grads_b = sample(rng, 25, orthogonal_means(rng, scales, "b"), scales, noise)
        store_a, store_b, _ = write_stores(tmp_path, f"null-{noise}-{seed}", grads_a, grads_b, seed=seed)
        for similarity in results:
            table, _ = pair_conflicts(store_a, store_b, ConflictsOptions(similarity=similarity, alpha=ALPHA))
            assert (table["status"] == "ok").all()
            assert (table["n_a"] == 40).all() and (table["n_b"] == 25).all()
            assert_no_nan(table)
            results[similarity].append(table)
    for similarity, tables in results.items():
        labelled = np.mean([(t["label"] != "none").mean() for t in tables])
        heads = pd.concat([t[t["block"].notna()] for t in tables])
        whole = pd.concat([t[t["block"].isna()] for t in tables])
        rate_heads, rate_whole = (heads["p"] < 0.05).mean(), (whole["p"] < 0.05).mean()
        rate_all = (len(heads) * rate_heads + len(whole) * rate_whole) / (len(heads) + len(whole))
        bound = {n: 3 * math.sqrt(0.05 * 0.95 / n) for n in (len(heads), len(whole))}
        text = (f"{noise} {similarity}: labelled {labelled:.4f}, raw p<0.05 heads {rate_heads:.4f} "
                f"(n={len(heads)}), whole {rate_whole:.4f} (n={len(whole)}), all {rate_all:.4f}")
        print(text)
        assert len(heads) == 10 * len(NULL_SEEDS) and len(whole) == 3 * len(NULL_SEEDS)
        assert labelled <= ALPHA, text
        assert abs(rate_heads - 0.05) <= bound[len(heads)], text
        assert rate_whole <= 0.05 + bound[len(whole)], text
        assert rate_all <= 0.05 + max(bound.values()), text
        ks = stats.kstest(heads["p"].to_numpy(dtype=float), "uniform").pvalue
        assert ks > 0.001, f"{text}: head p-values not uniform (KS p = {ks:.2g})"
        any_q = np.mean([(t["q"] < ALPHA).any() for t in tables])
        assert any_q <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(tables)), f"{text}: P(any q < alpha) {any_q}"
        print(f"    KS p {ks:.3f}, fraction of seeds with some q < alpha {any_q:.3f}")


# --- 2. power and false discoveries --------------------------------------------------------------

POWER_SEEDS = list(range(20))
#: Planted conflict heads: B's mean = -A's mean there.
PLANTED = {(QP, "q", 0), (QP, "q", 1), (OP, "o", 2)}
#: Groups that carry the planted conflict: the heads and the whole parameters that contain one.
TRUE_CONFLICTS = PLANTED | {(QP, None, None), (OP, None, None)}


def planted_means(rng: np.random.Generator, scales: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Means of A and B: per-coordinate SNR |mean| / sd = 0.1 exactly with mu_B = -mu_A on the planted
    heads, disjoint-support (orthogonal) means elsewhere."""
    mean_a, mean_b = orthogonal_means(rng, scales, "a"), orthogonal_means(rng, scales, "b")
    for param, _, head in PLANTED:
        inside = head_index(param) == head
        conflict = 0.1 * scales[param] * rng.choice([-1.0, 1.0], size=SHAPES[param])
        mean_a[param] = np.where(inside, conflict, mean_a[param])
        mean_b[param] = np.where(inside, -conflict, mean_b[param])
    return mean_a, mean_b


def group_data(grads: dict[str, np.ndarray], group) -> np.ndarray:
    """`[N, S]` values of a group, sliced from my own arrays (independently of the store geometry)."""
    param, _, head = group
    data = grads[param]
    if head is None:
        return data.reshape(data.shape[0], -1).astype(np.float64)
    return data[:, head_index(param) == head].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def test_power_planted_conflicts(tmp_path):
    """Planted conflict in 2 of 4 q heads and 1 of 4 o heads (mu_B = -mu_A there, per-coordinate
    SNR 0.1, so the expected cosine is about -0.01 and the effect size about
    sqrt(1024 / 1.4) x 0.01 ~ 0.27 for cosine with mildly heteroscedastic noise, ~0.32 for fisher);
    orthogonal disjoint-support means elsewhere; N_A = N_B = 64; Gaussian noise; 20 seeds.

    Checks per similarity: >= 90% of planted head groups (over seeds) are labelled `conflict`; the
    false discovery proportion (labelled groups that do not carry the planted conflict with that
    label, over all labelled groups, 0 when none) averaged over seeds is <= alpha; the top pairs of
    every conflicting group name real sample ids of the two stores and (cosine) are the group's
    most negative pair similarities, recomputed here from the raw gradients.
    """
    power, fdp, labelled_whole = {"cosine": [], "fisher": []}, {"cosine": [], "fisher": []}, []
    for seed in POWER_SEEDS:
        rng = np.random.default_rng(1000 + seed)
        scales = noise_scales(rng, 0.3)
        mean_a, mean_b = planted_means(rng, scales)
        grads_a, grads_b = sample(rng, 64, mean_a, scales, "gauss"), sample(rng, 64, mean_b, scales, "gauss")
        store_a, store_b, _ = write_stores(tmp_path, f"power-{seed}", grads_a, grads_b, seed=seed)
        ids_a, ids_b = store_a.sample_ids, store_b.sample_ids
        for similarity in power:
            options = ConflictsOptions(similarity=similarity, alpha=ALPHA, top_pairs=10)
            table, top = pair_conflicts(store_a, store_b, options)
            assert (table["status"] == "ok").all()
            assert_no_nan(table)
            labels = {group_key(row): row["label"] for _, row in table.iterrows()}
            power[similarity].extend(labels[group] == "conflict" for group in PLANTED)
            found = [group for group, value in labels.items() if value != "none"]
            false = [group for group in found if group not in TRUE_CONFLICTS or labels[group] != "conflict"]
            fdp[similarity].append(len(false) / max(len(found), 1))
            labelled_whole.append(labels[(QP, None, None)] == "conflict")
            # top pairs: for every conflicting group, real ids, most negative first
            for _, row in table[table["label"] == "conflict"].iterrows():
                group = group_key(row)
                same = (top["module"] == row["module"]) & (top["layer"] == row["layer"])
                if group[1] is None:
                    same &= top["block"].isna()
                else:
                    same &= (top["block"] == group[1]) & (top["head"] == group[2])
                rows = top[same]
                assert len(rows) == 10, (group, rows)
                assert list(rows["rank"]) == list(range(1, 11))
                assert set(rows["sample_a"]) <= set(ids_a) and set(rows["sample_b"]) <= set(ids_b)
                assert (np.diff(rows["similarity"].to_numpy()) >= 0).all()
                if similarity == "cosine":
                    matrix = cosine(group_data(grads_a, group), group_data(grads_b, group))
                    np.testing.assert_allclose(row["mean"], matrix.mean(), rtol=1e-4, atol=1e-7)
                    np.testing.assert_allclose(rows["similarity"], np.sort(matrix.ravel())[:10], rtol=1e-4, atol=1e-6)
                    i = [ids_a.index(s) for s in rows["sample_a"]]
                    j = [ids_b.index(s) for s in rows["sample_b"]]
                    np.testing.assert_allclose(rows["similarity"], matrix[i, j], rtol=1e-4, atol=1e-6)
            assert set(top["sample_a"]) <= set(ids_a) and set(top["sample_b"]) <= set(ids_b)
    for similarity in power:
        rate, mean_fdp = np.mean(power[similarity]), np.mean(fdp[similarity])
        text = f"{similarity}: power {rate:.3f} over {len(power[similarity])} planted heads, mean FDP {mean_fdp:.4f}"
        print(text)
        assert rate >= 0.9, text
        assert mean_fdp <= ALPHA, text
    print(f"whole q_proj (2 of 4 heads planted) labelled conflict in {np.mean(labelled_whole):.3f} of runs")


# --- 3. edge cases ---------------------------------------------------------------------------

def _null_grads(rng: np.random.Generator, n_a: int, n_b: int) -> tuple[dict, dict]:
    scales = noise_scales(rng, 1.0)
    return (sample(rng, n_a, orthogonal_means(rng, scales, "a"), scales, "gauss"),
            sample(rng, n_b, orthogonal_means(rng, scales, "b"), scales, "gauss"))


@pytest.mark.parametrize("similarity", ["cosine", "fisher"])
def test_one_sample_task_is_untested_with_a_warning(tmp_path, caplog, similarity):
    """A task with a single sample: every group `too_few_samples`, label `none`, finite outputs,
    and a warning that names both tasks."""
    grads_a, grads_b = _null_grads(np.random.default_rng(7), 1, 10)
    store_a, store_b, _ = write_stores(tmp_path, "one", grads_a, grads_b, task_a="code", task_b="prose")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table, top = pair_conflicts(store_a, store_b, ConflictsOptions(similarity=similarity))
    assert len(table) == 13
    assert (table["status"] == "too_few_samples").all(), table["status"]
    assert (table["label"] == "none").all()
    assert (table["p"] == 1).all() and (table["q"] == 1).all()
    assert (table["n_a"] == 1).all() and (table["n_b"] == 10).all()
    assert_no_nan(table)
    assert top.empty
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("code" in m and "prose" in m and "too_few_samples" in m for m in warnings), warnings
    # ... and says how many samples each task has (1 and 10), so the user knows which to fix
    assert any(re.search(r"code\D*\b1\b.*prose\D*\b10\b", m) for m in warnings), warnings


def test_no_common_per_sample_parameter_is_refused(tmp_path):
    """Stores with per-sample gradients of different parameters cannot be compared: a
    StoreMismatchError naming the differing setting (per_sample_params)."""
    grads_a, grads_b = _null_grads(np.random.default_rng(8), 6, 5)
    _, _, paths = write_stores(tmp_path, "mismatch", {QP: grads_a[QP]}, {OP: grads_b[OP]},
                               per_sample_a=(QP,), per_sample_b=(OP,))
    with pytest.raises(StoreMismatchError) as err:
        run_conflicts(paths, tmp_path / "out-mismatch")
    assert isinstance(err.value, FisherPipelineError)
    message = str(err.value)
    assert "per_sample_params" in message and "rerun phase 1" in message, message
    assert QP in message and OP in message, message
    assert not (tmp_path / "out-mismatch").exists()
    with pytest.raises(StoreMismatchError, match="per_sample_params"):
        pair_conflicts(*(FisherStore(path) for path in paths.values()))


def test_no_per_sample_gradients_is_refused(tmp_path):
    """Stores without any per-sample gradient: PhaseInputError telling to set per_sample_params."""
    _, _, paths = write_stores(tmp_path, "none", {}, {}, per_sample_a=(), per_sample_b=())
    with pytest.raises(PhaseInputError, match="per_sample_params"):
        run_conflicts(paths, tmp_path / "out-none")
    stores = [FisherStore(path) for path in paths.values()]
    with pytest.raises(PhaseInputError, match="per_sample_params"):
        pair_conflicts(*stores)
    assert not (tmp_path / "out-none").exists()


ZERO_HEAD = (QP, "q", 1)


@pytest.mark.parametrize("similarity", ["cosine", "fisher"])
def test_all_zero_group_is_untested_and_outputs_are_written(tmp_path, caplog, similarity):
    """A head whose gradients are zero in every sample of both tasks: status `zero_gradients`,
    label `none`, no NaN, a warning; every other group is still tested. `run_conflicts` writes the
    tables (Parquet and CSV, without NaN in the numeric columns) and the heatmap PNG."""
    grads_a, grads_b = _null_grads(np.random.default_rng(9), 12, 9)
    zero = head_index(QP) == ZERO_HEAD[2]
    for grads in (grads_a, grads_b):
        grads[QP][:, zero] = 0.0
    store_a, store_b, paths = write_stores(tmp_path, "zero", grads_a, grads_b)
    options = ConflictsOptions(similarity=similarity)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table, _ = pair_conflicts(store_a, store_b, options)
    keys = [group_key(row) for _, row in table.iterrows()]
    untested = table[[key == ZERO_HEAD for key in keys]]
    assert len(untested) == 1
    row = untested.iloc[0]
    assert row["status"] == "zero_gradients" and row["label"] == "none"
    assert row["n_a"] == 0 and row["n_b"] == 0 and row["p"] == 1 and row["q"] == 1
    others = table[[key != ZERO_HEAD for key in keys]]
    assert (others["status"] == "ok").all(), others[["param", "block", "head", "status"]]
    assert (others["n_a"] == 12).all() and (others["n_b"] == 9).all()
    assert np.isfinite(others["se"]).all() and (others["se"] > 0).all()
    assert_no_nan(table)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("zero_gradients" in m and "q head 1" in m for m in warnings), warnings

    out = tmp_path / f"out-{similarity}"
    paths_out = run_conflicts(paths, out, options)
    for key in ("conflicts_csv", "conflicts_parquet", "top_pairs_csv", "top_pairs_parquet", "heatmap_a__b"):
        assert paths_out[key].is_file() and paths_out[key].stat().st_size > 0, key
        assert paths_out[key].parent == out
    assert paths_out["heatmap_a__b"].suffix == ".png"
    assert paths_out["heatmap_a__b"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(paths_out["conflicts_csv"])
    assert len(csv) == len(table)
    assert not csv[NUMERIC].isna().any().any(), csv[NUMERIC]
    raw = paths_out["conflicts_csv"].read_text().splitlines()
    header = raw[0].split(",")
    for line in raw[1:]:
        cells = dict(zip(header, line.split(","), strict=True))
        assert all(cells[c].lower() not in ("nan", "") for c in NUMERIC), line
    parquet = pd.read_parquet(paths_out["conflicts_parquet"])
    assert not parquet[NUMERIC].isna().any().any()
    assert list(parquet["status"]) == list(table["status"])


def test_some_zero_samples_are_left_out_of_a_group(tmp_path):
    """Samples whose gradient is zero in a head have no direction there: they are left out of that
    head (n_a, n_b count the rest), while the head is still tested and other groups keep all samples."""
    grads_a, grads_b = _null_grads(np.random.default_rng(10), 12, 9)
    zero = head_index(OP) == 3
    grads_a[OP][:4, zero] = 0.0
    grads_b[OP][-2:, zero] = 0.0
    store_a, store_b, _ = write_stores(tmp_path, "partial", grads_a, grads_b)
    table, _ = pair_conflicts(store_a, store_b)
    by_group = {group_key(row): row for _, row in table.iterrows()}
    assert by_group[(OP, "o", 3)]["n_a"] == 8 and by_group[(OP, "o", 3)]["n_b"] == 7
    assert by_group[(OP, "o", 3)]["status"] == "ok"
    matrix = cosine(group_data(grads_a, (OP, "o", 3))[4:], group_data(grads_b, (OP, "o", 3))[:-2])
    np.testing.assert_allclose(by_group[(OP, "o", 3)]["mean"], matrix.mean(), rtol=1e-4, atol=1e-7)
    assert by_group[(OP, None, None)]["n_a"] == 12 and by_group[(OP, "o", 2)]["n_b"] == 9
    # within-task baselines: mean over distinct pairs of the samples used
    kept_a = group_data(grads_a, (OP, "o", 3))[4:]
    within = cosine(kept_a, kept_a)
    expected = (within.sum() - np.trace(within)) / (8 * 7)
    np.testing.assert_allclose(by_group[(OP, "o", 3)]["within_a_mean"], expected, rtol=1e-4, atol=1e-7)
    assert_no_nan(table)


@pytest.mark.parametrize("similarity", ["cosine", "fisher"])
def test_top_pairs_name_the_right_samples(tmp_path, similarity):
    """Top pairs of a conflicting head with unequal N (48 x 32) and some samples dropped there
    (zero gradient in the head): every listed pair names real, non-dropped samples, ranks are the
    most negative first, and (cosine) the listed similarity is the cosine of exactly those two
    samples' raw gradients, and the list is the group's 10 most negative pairs."""
    rng = np.random.default_rng(11)
    scales = noise_scales(rng, 0.3)
    mean_a, mean_b = orthogonal_means(rng, scales, "a"), orthogonal_means(rng, scales, "b")
    inside = head_index(QP) == 0
    conflict = 0.2 * scales[QP] * rng.choice([-1.0, 1.0], size=SHAPES[QP])
    mean_a[QP], mean_b[QP] = np.where(inside, conflict, mean_a[QP]), np.where(inside, -conflict, mean_b[QP])
    grads_a, grads_b = sample(rng, 48, mean_a, scales, "gauss"), sample(rng, 32, mean_b, scales, "gauss")
    grads_a[QP][:5, inside] = 0.0
    grads_b[QP][-3:, inside] = 0.0
    store_a, store_b, _ = write_stores(tmp_path, "top", grads_a, grads_b)
    ids_a, ids_b = store_a.sample_ids, store_b.sample_ids
    table, top = pair_conflicts(store_a, store_b, ConflictsOptions(similarity=similarity, top_pairs=10))
    row = table[(table["block"] == "q") & (table["head"] == 0)].iloc[0]
    assert row["label"] == "conflict" and row["n_a"] == 43 and row["n_b"] == 29, row
    rows = top[(top["block"] == "q") & (top["head"] == 0)]
    assert list(rows["rank"]) == list(range(1, 11))
    assert set(rows["sample_a"]) <= set(ids_a[5:]) and set(rows["sample_b"]) <= set(ids_b[:-3]), rows
    assert (np.diff(rows["similarity"].to_numpy()) >= 0).all() and (rows["similarity"] < 0).all()
    if similarity == "cosine":
        a, b = group_data(grads_a, (QP, "q", 0)), group_data(grads_b, (QP, "q", 0))
        i = [ids_a.index(s) for s in rows["sample_a"]]
        j = [ids_b.index(s) for s in rows["sample_b"]]
        np.testing.assert_allclose(rows["similarity"], cosine(a[i], b[j]).diagonal(), rtol=1e-4, atol=1e-6)
        matrix = cosine(a[5:], b[:-3])
        np.testing.assert_allclose(rows["similarity"], np.sort(matrix.ravel())[:10], rtol=1e-4, atol=1e-6)
