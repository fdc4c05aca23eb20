"""How precise a task's head and neuron Fisher are, and how many samples a target precision needs.

For each stored group (a head of one q/k/v/o block, a neuron of one MLP tensor) phase 1
keeps the Welford M2 of the per-sample group contributions `c_i = sum_{k in G} g_ik^2`, so
the Fisher `F_G = mean_i c_i` has the standard error `se_G = sd_i(c_i) / sqrt(N)` and the
relative standard error `r_G = se_G / F_G`. A standard error shrinks as `1 / sqrt(N)`, so
`N * (r_G / target)^2` samples would bring the group to `target`.

The table reports, per unit kind (head, neuron), the median and the 90th percentile of `r_G`
over the groups with a positive Fisher, and the samples those need for each target
(rounded up). The extrapolation assumes the per-sample contributions have a finite variance
that `N` samples estimate: contributions are squares of gradients and heavy-tailed, so at
small `N` the sample standard deviation tends to *under*-state the spread (a rare large
contribution not yet seen), and the samples needed are then a lower bound. Compare two
runs (32 and 128 samples) before trusting a large extrapolation.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ...roles import HEAD_BLOCKS

#: Relative standard errors the table gives sample counts for.
TARGETS = (0.10, 0.05, 0.03, 0.01)


def samples_needed(n_samples: int, relative_se: float, target: float) -> int:
    """Samples that bring a relative standard error of `relative_se` at `n_samples` to `target` (1/sqrt(N))."""
    # rounded to 9 significant digits first: 32 * (0.14 / 0.01)^2 is 6272.000000000001 in floats
    return math.ceil(float(f"{n_samples * (relative_se / target) ** 2:.9g}"))


def precision_table(groups: pd.DataFrame, n_samples: int, task: str,
                    targets: tuple[float, ...] = TARGETS) -> pd.DataFrame:
    """Per unit kind: the relative standard error of the group Fisher (median, 90th percentile)
    and the samples needed for each target.

    Args:
        groups: phase 2's stored-group table (`group_table`): `block`, `index`, `fisher_sum`, `se`.
        n_samples: N of the store.
        task: the task's name (a column).

    Returns:
        One row per unit kind with groups: task, unit, n_samples, groups, rel_se_median,
        rel_se_p90, and `samples_for_{p}pct_median` / `samples_for_{p}pct_p90` per target
        (empty when N < 2: no standard error).
    """
    kinds = {"head": groups["block"].isin(HEAD_BLOCKS) & groups["index"].notna(),
             "neuron": groups["block"] == "neuron"}
    rows = []
    for unit, selected in kinds.items():
        part = groups[selected & (groups["fisher_sum"] > 0)]
        relative = (part["se"] / part["fisher_sum"]).to_numpy(dtype=np.float64)
        relative = relative[np.isfinite(relative)]
        if n_samples < 2 or not len(relative):
            continue
        median, p90 = float(np.median(relative)), float(np.quantile(relative, 0.9))
        row = {"task": task, "unit": unit, "n_samples": n_samples, "groups": len(relative),
               "rel_se_median": median, "rel_se_p90": p90}
        for target in targets:
            label = f"{100 * target:g}pct"
            row[f"samples_for_{label}_median"] = samples_needed(n_samples, median, target)
            row[f"samples_for_{label}_p90"] = samples_needed(n_samples, p90, target)
        rows.append(row)
    return pd.DataFrame(rows)
