"""Calibration, power and correctness of the pair-phase statistics (fisher_pipeline.pair_stats)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fisher_pipeline.pair_stats import (
    alignment,
    bh_qvalues,
    label,
    pair_mean_test,
    pair_mean_test_from_sums,
    pair_mean_tests,
)


def _bilinear_cells(rng, cells, n_a, n_b, mu_a, mu_b, noise="gauss"):
    """Pair matrices `[C, N_A, N_B]` of dot products a_i . b_j with a = mu_a + noise, b = mu_b + noise.

    mu_a, mu_b: `[D]` or `[C, D]`. noise "t3" is Student t with 3 degrees of freedom.
    """
    mu_a, mu_b = np.broadcast_to(mu_a, (cells, np.shape(mu_a)[-1])), np.broadcast_to(
        mu_b, (cells, np.shape(mu_b)[-1]))
    dim = mu_a.shape[-1]
    draw = {"gauss": rng.standard_normal, "t3": lambda s: rng.standard_t(3, s)}[noise]
    a = mu_a[:, None, :] + draw((cells, n_a, dim))
    b = mu_b[:, None, :] + draw((cells, n_b, dim))
    return np.einsum("cid,cjd->cij", a, b)


def test_variance_is_unbiased_and_naive_overestimates():
    """Null hypothesis: the unbiased U-statistic variance V has expectation Var(mean).

    Brute force: 2000 datasets of a small bilinear model (dim 8, mean gradients 0.1 per
    coordinate, unit noise, N_A=12, N_B=9); the average V must match the empirical
    variance of the pair mean across datasets within 10%, while the naive row+column
    variance (interaction counted twice) overestimates it by far.
    """
    rng = np.random.default_rng(0)
    n_a, n_b, dim = 12, 9, 8
    mu = np.full(dim, 0.1)
    t = pair_mean_tests(_bilinear_cells(rng, 2000, n_a, n_b, mu, mu))
    empirical = t.mean.var(ddof=1)
    assert abs(t.var_mean.mean() / empirical - 1) < 0.10
    # se^2 is V floored at the interaction term in ~9% of these tiny datasets, which
    # biases it up a little (conservative) but not much.
    assert 1.0 <= (t.se**2).mean() / empirical < 1.2
    naive = t.var_rows / n_a + t.var_cols / n_b
    assert naive.mean() / empirical > 1.6


@pytest.mark.parametrize("noise", ["gauss", "t3"])
@pytest.mark.parametrize("null", ["zero_means", "orthogonal_means"])
def test_null_p_values_are_uniform(noise, null):
    """Null hypothesis: mu_a . mu_b = 0, so the pair mean has expectation 0 and p ~ U(0, 1).

    1500 cells, N_A=64, N_B=40, dim 16; Gaussian or t(3) noise; means both zero or
    nonzero and orthogonal. KS test against uniform must not reject at 1% and the
    rejection rate at alpha 5% must lie in [0.03, 0.075].
    """
    rng = np.random.default_rng({"gauss": 1, "t3": 2}[noise] + {"zero_means": 0, "orthogonal_means": 10}[null])
    dim = 128
    mu_a, mu_b = np.zeros(dim), np.zeros(dim)
    if null == "orthogonal_means":
        mu_a[: dim // 2], mu_b[dim // 2:] = 0.3, 0.3
    t = pair_mean_tests(_bilinear_cells(rng, 1500, 64, 40, mu_a, mu_b, noise))
    ks = stats.kstest(t.p, "uniform")
    rate = np.mean(t.p < 0.05)
    print(f"{noise} {null}: rejection {rate:.4f}, KS p {ks.pvalue:.3f}, floored {t.floored.mean():.4f}")
    assert ks.pvalue > 0.01
    assert 0.03 <= rate <= 0.075


def test_power_and_labels_at_snr_0_1():
    """Null hypothesis (for the planted half): none; the test must find planted effects.

    300 null cells (mu_a = mu_b = 0) and 300 planted cells with mu_a = 0.1 u,
    mu_b = +-0.1 u (u a random +-1 vector of dim 512, unit noise: per-coordinate SNR
    0.1, mean a.b = +-5.12), N 64 vs 40. After BH at 5% at least 90% of planted cells
    are discovered, the false discovery proportion is <= 10%, and planted cells get
    `conflict` (negative) or `synergy` (positive), never the opposite label.
    """
    rng = np.random.default_rng(3)
    dim, per = 512, 150
    u = rng.choice([-1.0, 1.0], size=dim)
    zero = np.zeros((2 * per, dim))
    sign = np.repeat([1.0, -1.0], per)
    mu_a = np.concatenate([zero, np.tile(0.1 * u, (2 * per, 1))])
    mu_b = np.concatenate([zero, 0.1 * sign[:, None] * u])
    planted = np.arange(4 * per) >= 2 * per
    t = pair_mean_tests(_bilinear_cells(rng, 4 * per, 64, 40, mu_a, mu_b))
    q = bh_qvalues(t.p)
    found = q < 0.05
    power = found[planted].mean()
    fdp = (found & ~planted).sum() / max(found.sum(), 1)
    # the alignment from the true within-task products |mu|^2: +-1 on planted cells, undefined
    # (NaN: no mean direction) on the others
    effect = alignment(t.mean, (mu_a ** 2).sum(1), (mu_b ** 2).sum(1))
    labels = label(t.mean, q, effect, alpha=0.05)
    expected = np.where(sign > 0, "synergy", "conflict")
    print(f"power {power:.3f}, FDP {fdp:.3f}, median |alignment| planted {np.median(np.abs(effect[planted])):.3f}")
    assert power >= 0.9
    assert fdp <= 0.10
    assert np.mean(labels[planted] == expected) >= 0.9
    assert not np.any(labels[planted] == np.where(sign > 0, "conflict", "synergy"))
    assert (labels[~planted] == "none").all()


def test_alignment_is_the_cosine_of_the_mean_gradients_whatever_the_slice_size():
    """alignment = T / sqrt(W_A W_B) from pair matrices of raw products equals the cosine of the
    two true mean vectors within sampling noise, at 64 and at 4096 coordinates with the same
    per-coordinate signal (mu_B = -0.5 mu_A + an orthogonal part, true cosine -0.447), where the
    standardised mean T / sd(pairs) grows ~8x; NaN where a task has no mean direction; clipped."""
    rng = np.random.default_rng(11)
    n_a, n_b = 48, 40
    found, standardised = {}, {}
    for size in (64, 4096):
        u, v = rng.choice([-1.0, 1.0], size=(2, size))
        v -= (v @ u) / (u @ u) * u  # orthogonal to u
        v *= np.linalg.norm(u) / np.linalg.norm(v)
        mu_a, mu_b = 0.2 * u, 0.2 * (-0.5 * u + v)
        a = mu_a + rng.standard_normal((n_a, size))
        b = mu_b + rng.standard_normal((n_b, size))
        cross = a @ b.T
        within_a = (a @ a.T)[~np.eye(n_a, dtype=bool)].mean()
        within_b = (b @ b.T)[~np.eye(n_b, dtype=bool)].mean()
        found[size] = alignment(cross.mean(), within_a, within_b)
        standardised[size] = cross.mean() / cross.std(ddof=1)
    truth = -0.5 / np.sqrt(1.25)
    for size, value in found.items():
        assert abs(value - truth) < (0.25 if size == 64 else 0.05), (size, value, truth)
    assert abs(standardised[4096] / standardised[64]) > 4, standardised
    assert np.isnan(alignment(0.3, -0.1, 2.0)) and np.isnan(alignment(0.3, 1.0, 0.0))
    np.testing.assert_array_equal(alignment(np.array([3.0, -3.0, 0.5]), 1.0, 4.0), [1.0, -1.0, 0.25])
    assert label(-0.2, 0.01, np.nan)[()] == "none"


def test_floor_when_unbiased_variance_is_not_positive():
    """Null hypothesis: none; a matrix with zero main-effect variance must use the floor.

    M = 0.5 + outer(x, y) with centred x, y has constant row and column means, so the
    unbiased variance is -interaction/(N_A N_B) < 0; se^2 must equal the
    interaction-only estimate, `floored` be set and z, p be finite.
    """
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal(7), rng.standard_normal(5)
    x, y = x - x.mean(), y - y.mean()
    m = 0.5 + np.outer(x, y)
    t = pair_mean_test(m)
    assert t.floored and t.var_mean < 0
    resid = m - 0.5
    np.testing.assert_allclose(t.se**2, (resid**2).sum() / (6 * 4) / 35, rtol=1e-12)
    assert np.isfinite(t.z) and 0 <= t.p <= 1
    constant = pair_mean_test(np.full((3, 4), 2.0))
    assert constant.se == 0 and np.isnan(constant.z) and np.isnan(constant.p)


def test_single_and_streamed_agree_with_vectorised():
    """Null hypothesis: the scalar, streamed-sums and vectorised entry points compute the same test."""
    rng = np.random.default_rng(5)
    m = rng.standard_normal((3, 10, 6)) + 0.3
    many = pair_mean_tests(m)
    for c in range(3):
        one = pair_mean_test(m[c])
        streamed = pair_mean_test_from_sums(m[c].sum(1), m[c].sum(0), float((m[c] ** 2).sum()))
        for other in (one, streamed):
            for field in ("mean", "se", "z", "p", "var_rows", "var_cols", "var_interaction", "sd"):
                np.testing.assert_allclose(getattr(other, field), getattr(many, field)[c], rtol=1e-9)
    assert isinstance(one.p, float) and isinstance(one.floored, bool)


def _bh_reference(p):
    """Textbook BH: sort, p * m / rank, cumulative minimum from the largest rank, unsort."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(adjusted, 1.0)
    return q


def test_bh_matches_textbook_and_keeps_nan():
    """Null hypothesis: bh_qvalues equals textbook BH over the non-NaN p-values, NaN stays NaN."""
    rng = np.random.default_rng(6)
    p = np.round(rng.uniform(size=200) ** 2, 2)  # rounding makes many ties
    p[rng.choice(200, 20, replace=False)] = np.nan
    q = bh_qvalues(p)
    ok = ~np.isnan(p)
    assert np.array_equal(np.isnan(q), ~ok)
    np.testing.assert_allclose(q[ok], _bh_reference(p[ok]), rtol=1e-12)
    assert np.all(np.isnan(bh_qvalues(np.full(3, np.nan))))


def test_labels():
    """Null hypothesis: none; labels follow the sign of the mean only when q and |effect| pass."""
    mean = np.array([-1.0, 1.0, -1.0, 1.0, 1.0, np.nan])
    q = np.array([0.01, 0.01, 0.2, 0.01, np.nan, 0.01])
    d = np.array([-0.5, 0.5, -0.5, 0.05, 0.5, 0.5])
    assert label(mean, q, d).tolist() == ["conflict", "synergy", "none", "none", "none", "none"]


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (0, 3)])
def test_rejects_too_few_samples(shape):
    """Null hypothesis: none; fewer than 2 samples on a side is an error naming the shape."""
    with pytest.raises(ValueError, match=rf"\({shape[0]}, {shape[1]}\)"):
        pair_mean_test(np.ones(shape))
    with pytest.raises(ValueError, match="N_A"):
        pair_mean_tests(np.ones((2, *shape)))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_rejects_wrong_dimensions(shape):
    """Null hypothesis: none; a non-2-D matrix (non-3-D stack) is an error naming the shape."""
    with pytest.raises(ValueError, match=re_shape(shape)):
        pair_mean_test(np.ones(shape))
    with pytest.raises(ValueError, match="got shape"):
        pair_mean_tests(np.ones((3, 3)))


def re_shape(shape):
    """Regex matching the tuple repr of `shape`."""
    return repr(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
