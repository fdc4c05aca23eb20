"""Statistics shared by the pair phases (5: gradient conflicts, 6: Q/K/V/O interference).

A pair matrix `M [N_A, N_B]` holds `M[i, j] = h(a_i, b_j)` for samples `a_i` of task A
and `b_j` of task B. Its mean `T` is a two-sample U-statistic. Every sample sits in
many pairs, so the entries are not independent and `var(M) / (N_A N_B)` is far too
small. With the Hoeffding decomposition `M_ij = mu + alpha_i + beta_j + gamma_ij`

    Var(T) = s_a^2 / N_A + s_b^2 / N_B + s_g^2 / (N_A N_B).

With `r`, `c` the row and column means and `R = M - r[:, None] - c[None, :] + T` the
double-centred matrix,

    E[var(r)] = s_a^2 + s_g^2 / N_B,   E[var(c)] = s_b^2 + s_g^2 / N_A   (ddof=1)
    E[sum R^2] = (N_A - 1)(N_B - 1) s_g^2,

so the row+column variance `var(r)/N_A + var(c)/N_B` (DeLong style) counts the
interaction term twice, and the unbiased estimate is

    V = var(r)/N_A + var(c)/N_B - sum R^2 / ((N_A - 1)(N_B - 1)) / (N_A N_B).

The double count matters: for gradients whose mean is small next to their noise
(per-coordinate SNR ~0.1) the interaction term dominates and the uncorrected test
rejects ~0.5-2% of null cells at alpha 5% instead of 5%.

Reference distribution. z = T / sqrt(V) is referred to Student t with Satterthwaite
degrees of freedom for V rather than to the normal: when both main effects vanish
(mean gradients ~0, a degenerate U-statistic) V is a noisy difference of three terms
with only ~25 df at N 64 x 40 and the normal reference rejects ~6.5% of null cells at
alpha 5%. With real main effects df is in the hundreds and t equals the normal.

Non-positive V. In small samples V can be <= 0. Since s_a^2, s_b^2 >= 0, the true
variance is never below the interaction term `s_g^2 / (N_A N_B)`; V <= 0 means the
main-effect estimates came out negative, i.e. the data are consistent with no main
effects, and then the interaction term *is* the variance. So we floor V at the
interaction-only estimate `sum R^2 / ((N_A-1)(N_B-1)) / (N_A N_B)` (the usual
"clip a negative variance component at zero" of random-effects ANOVA) and set
`floored`. We prefer this to returning NaN because NaN cells would silently drop out
of the BH family, and they drop out non-randomly (exactly the cells with weak main
effects). A matrix with no variability at all (se == 0) gets z = p = NaN.

Effect size: the alignment. A label needs a test (BH q < alpha) and an effect that means
the same for a head of 64 coordinates and for a whole module of 50,000. The standardised
mean `T / sd(M)` does not: for the same per-coordinate signal the pair entries' sd shrinks
like 1 / sqrt(slice size), so a module's |d| is sqrt(modules / heads) times a head's, and a
threshold on it labels modules and leaves their heads (planted head conflicts with q ~ 0 got
|d| 0.10-0.24 at 1024 coordinates). We use instead

    alignment = T / sqrt(W_A W_B),   W_A = mean_{i != i'} M_A[i, i'],  W_B likewise,

with `M_A` the same similarity between two distinct samples of A. For raw products
(`<g_i, g_j>_w`) `T` and `W_A` are unbiased for `<E g_A, E g_B>_w` and `|E g_A|_w^2`, so the
alignment estimates the cosine between the two tasks' mean gradients in the slice (for
per-pair cosines, between their mean directions). It lies in [-1, 1] up to noise (clipped),
it does not grow with the slice, and it says what a reader asks of a "conflict": how far
B's consistent update points against A's. It is undefined (NaN, never labelled) where a
task shows no mean direction in the slice (`W <= 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

Float = float | np.ndarray


@dataclass(frozen=True)
class PairMeanTest:
    """Test of `mean(M) == 0` for one pair matrix (floats) or many cells (arrays `[C]`).

    Attributes:
        mean: mean of all entries of M.
        se: standard error of `mean` (unbiased U-statistic variance, floored, see module).
        z: `mean / se`; NaN when se == 0.
        p: two-sided p-value of z from Student t with `df` degrees of freedom (normal
            in the limit); NaN when se == 0.
        n_a: number of rows (samples of task A).
        n_b: number of columns (samples of task B).
        var_rows: sample variance (ddof=1) of the row means r_i.
        var_cols: sample variance (ddof=1) of the column means c_j.
        var_interaction: `sum R^2 / ((N_A-1)(N_B-1))`, unbiased for s_g^2.
        var_mean: the unbiased (unfloored, possibly <= 0) variance estimate V of `mean`.
        floored: True where V <= 0 and se came from the interaction-only floor.
        sd: standard deviation (ddof=1) of the entries of M, for `effect_size`.
        df: Satterthwaite degrees of freedom of the variance estimate.
    """

    mean: Float
    se: Float
    z: Float
    p: Float
    n_a: int
    n_b: int
    var_rows: Float
    var_cols: Float
    var_interaction: Float
    var_mean: Float
    floored: bool | np.ndarray
    sd: Float
    df: Float


def _check_sizes(n_a: int, n_b: int, shape: tuple[int, ...]) -> None:
    if n_a < 2 or n_b < 2:
        raise ValueError(
            f"pair matrix of shape {shape} has N_A={n_a}, N_B={n_b}; both must be >= 2 "
            "for a variance estimate"
        )


def _finish(
    mean: np.ndarray,
    var_rows: np.ndarray,
    var_cols: np.ndarray,
    sum_r2: np.ndarray,
    sum_dev2: np.ndarray,
    n_a: int,
    n_b: int,
    scalar: bool,
) -> PairMeanTest:
    """Turn per-cell moments (arrays `[C]`) into a PairMeanTest."""
    n = n_a * n_b
    var_interaction = sum_r2 / ((n_a - 1) * (n_b - 1))
    var_mean = var_rows / n_a + var_cols / n_b - var_interaction / n
    floored = var_mean <= 0
    var_used = np.where(floored, var_interaction / n, var_mean)
    se = np.sqrt(np.maximum(var_used, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, mean / np.where(se > 0, se, 1.0), np.nan)
    # Satterthwaite degrees of freedom of V (var(r): N_A-1 df, var(c): N_B-1, the
    # interaction: (N_A-1)(N_B-1)). When the main effects vanish (degenerate
    # U-statistic, e.g. both mean gradients ~0) V is a noisy difference of three terms
    # with ~20-30 df at N 64 x 40, and a normal reference rejects ~6.5% at alpha 5%;
    # the t reference restores calibration and tends to the normal as df grows.
    terms = (var_rows / n_a, var_cols / n_b, var_interaction / n)
    dfs = (n_a - 1, n_b - 1, (n_a - 1) * (n_b - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(floored, dfs[2], var_used**2 / sum(t * t / d for t, d in zip(terms, dfs, strict=True)))
    p = np.where(np.isnan(z), np.nan, 2.0 * stats.t.sf(np.abs(z), np.where(np.isnan(df), 1.0, df)))
    sd = np.sqrt(np.maximum(sum_dev2, 0.0) / (n - 1))
    out = dict(mean=mean, se=se, z=z, p=p, var_rows=var_rows, var_cols=var_cols,
               var_interaction=var_interaction, var_mean=var_mean, floored=floored, sd=sd, df=df)
    if scalar:
        out = {k: (bool(v[0]) if k == "floored" else float(v[0])) for k, v in out.items()}
    return PairMeanTest(n_a=n_a, n_b=n_b, **out)


def pair_mean_tests(matrices: np.ndarray) -> PairMeanTest:
    """Test the mean of each of many pair matrices at once, without a loop over cells.

    Args:
        matrices: `[C, N_A, N_B]` pair matrices of C cells sharing the sample sizes.

    Returns:
        PairMeanTest whose statistics are float64 arrays `[C]`.

    Raises:
        ValueError: if `matrices` is not 3-D or N_A < 2 or N_B < 2.
    """
    m = np.asarray(matrices, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"expected pair matrices [C, N_A, N_B], got shape {m.shape}")
    _check_sizes(m.shape[1], m.shape[2], m.shape)
    return _tests(m, scalar=False)


def _tests(m: np.ndarray, scalar: bool) -> PairMeanTest:
    n_a, n_b = m.shape[1], m.shape[2]
    rows = m.mean(axis=2)  # [C, N_A]
    cols = m.mean(axis=1)  # [C, N_B]
    mean = rows.mean(axis=1)  # [C]
    # R computed directly (not via sum M^2 - ...) to avoid cancellation when |mean| >> noise.
    resid = m - rows[:, :, None] - cols[:, None, :] + mean[:, None, None]
    sum_r2 = np.einsum("cij,cij->c", resid, resid)
    dev = m - mean[:, None, None]
    sum_dev2 = np.einsum("cij,cij->c", dev, dev)
    return _finish(mean, rows.var(axis=1, ddof=1), cols.var(axis=1, ddof=1),
                   sum_r2, sum_dev2, n_a, n_b, scalar)


def pair_mean_test(matrix: np.ndarray) -> PairMeanTest:
    """Test `mean(M) == 0` for one pair matrix with the U-statistic variance.

    Args:
        matrix: `[N_A, N_B]`, `matrix[i, j] = h(a_i, b_j)`.

    Returns:
        PairMeanTest with float statistics.

    Raises:
        ValueError: if `matrix` is not 2-D or N_A < 2 or N_B < 2.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a pair matrix [N_A, N_B], got shape {m.shape}")
    _check_sizes(m.shape[0], m.shape[1], m.shape)
    return _tests(m[None], scalar=True)


def pair_mean_test_from_sums(
    row_sums: np.ndarray, col_sums: np.ndarray, sum_sq: float
) -> PairMeanTest:
    """Same test from streamed moments, so a blocked pair engine need not hold M.

    A caller accumulating blocks of M adds each block's row sums, column sums and sum
    of squared entries. Then `sum R^2 = sum M^2 - N_B sum r^2 - N_A sum c^2 + N_A N_B T^2`.
    That subtraction loses relative precision ~1e-16 * sum M^2 / sum R^2 in float64:
    fine unless the mean is ~1e6 times the interaction noise; otherwise pass M.

    Args:
        row_sums: `[N_A]` sums over j of M[i, j].
        col_sums: `[N_B]` sums over i of M[i, j].
        sum_sq: sum over i, j of M[i, j]^2.

    Returns:
        PairMeanTest with float statistics.

    Raises:
        ValueError: if the sums are not 1-D, disagree on the total, or N_A, N_B < 2.
    """
    row_sums = np.asarray(row_sums, dtype=np.float64)
    col_sums = np.asarray(col_sums, dtype=np.float64)
    if row_sums.ndim != 1 or col_sums.ndim != 1:
        raise ValueError(
            f"row_sums and col_sums must be 1-D, got shapes {row_sums.shape}, {col_sums.shape}"
        )
    n_a, n_b = row_sums.size, col_sums.size
    _check_sizes(n_a, n_b, (n_a, n_b))
    total = row_sums.sum()
    if not np.isclose(total, col_sums.sum(), rtol=1e-9, atol=1e-9 * (1 + abs(total))):
        raise ValueError(f"row sums total {total} but column sums total {col_sums.sum()}")
    n = n_a * n_b
    rows, cols, mean = row_sums / n_b, col_sums / n_a, total / n
    sum_r2 = sum_sq - n_b * rows @ rows - n_a * cols @ cols + n * mean * mean
    sum_dev2 = sum_sq - n * mean * mean
    return _finish(np.array([mean]), np.array([rows.var(ddof=1)]), np.array([cols.var(ddof=1)]),
                   np.array([max(sum_r2, 0.0)]), np.array([sum_dev2]), n_a, n_b, scalar=True)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and are not counted in m.

    A NaN p means "no test was possible" (a cell without variability); counting it in
    m as if it were p = 1 would penalise the real tests for cells that never were
    hypotheses.

    Args:
        p: p-values of any shape.

    Returns:
        q-values, same shape as `p`.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def alignment(mean: Float, within_a: Float, within_b: Float) -> Float:
    """Cosine between the two tasks' mean gradients in a slice, `T / sqrt(W_A W_B)` (module docstring).

    Args:
        mean: mean cross-task pair similarity `T`, scalar or `[C]`.
        within_a, within_b: mean similarity of distinct pairs within A and within B, same shape.

    Returns:
        The alignment clipped to [-1, 1]; NaN where `W_A <= 0` or `W_B <= 0` (or NaN).
    """
    mean, within_a, within_b = (np.asarray(x, dtype=np.float64) for x in (mean, within_a, within_b))
    defined = (within_a > 0) & (within_b > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(defined, mean / np.sqrt(np.where(defined, within_a * within_b, 1.0)), np.nan)
    value = np.clip(value, -1.0, 1.0)
    return float(value) if value.ndim == 0 else value


def label(
    mean: Float, q: Float, effect: Float, alpha: float = 0.05, min_effect_size: float = 0.1
) -> np.ndarray:
    """Label cells `conflict` (significant negative), `synergy` (positive) or `none`.

    A cell needs both BH q < alpha and |effect| >= min_effect_size; NaN q or effect
    compare False and give `none`. Phases 5 and 6 both pass the `alignment`.

    Args:
        mean: mean pair similarity, `[C]` (or scalar).
        q: BH q-values, same shape.
        effect: the alignment (`alignment`), same shape.
        alpha: false discovery rate.
        min_effect_size: smallest |alignment| worth a label.

    Returns:
        Array of str, same shape as the inputs.
    """
    mean, q, effect = (np.asarray(x, dtype=np.float64) for x in (mean, q, effect))
    with np.errstate(invalid="ignore"):
        hit = (q < alpha) & (np.abs(effect) >= min_effect_size)
    out = np.full(np.broadcast(mean, q, effect).shape, "none", dtype="<U8")
    out[hit & (mean < 0)] = "conflict"
    out[hit & (mean > 0)] = "synergy"
    return out


def bh_labels(mean: Float, p: Float, effect: Float, tested: np.ndarray, alpha: float = 0.05,
              min_effect_size: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """BH q-values over the tested cells and their labels: the one labelling step of phases 5 and 6.

    Args:
        mean, p, effect: per cell, `[C]`: mean pair similarity, p-value, alignment.
        tested: `[C]` bool, the cells whose test ran; the others get q = 1 and label `none`.
        alpha, min_effect_size: as in `label`.

    Returns:
        (q `[C]` float64, labels `[C]` str).
    """
    tested = np.asarray(tested, dtype=bool)
    q = np.ones(tested.shape)
    q[tested] = bh_qvalues(np.asarray(p, dtype=np.float64)[tested])
    labels = label(mean, q, effect, alpha, min_effect_size)
    labels[~tested] = "none"
    return q, labels
