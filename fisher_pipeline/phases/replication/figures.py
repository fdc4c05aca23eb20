"""Figures of the held-out replication: t on the analysed vs the held-out samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def replication_figure(cells: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """Each cell's t statistic (mean / se) on the analysed against the held-out samples, a panel per
    (phase, task pair); labelled cells in colour (filled: replicated, open: not), the others grey.

    t statistics put heads and modules, and phase 6's Fisher-metric products that span decades,
    on one linear scale; the dashed lines mark the held-out one-sided 5% points (normal).
    """
    panels = list(summary[["phase", "task_a", "task_b"]].itertuples(index=False))
    columns = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(4.2 * columns, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Held-out replication: each cell's t statistic on the analysed vs the held-out samples")
    z = cells.assign(x=_t(cells["discovery_mean"], cells["discovery_se"]),
                     y=_t(cells["heldout_mean"], cells["heldout_se"]))
    for position, (phase, task_a, task_b) in enumerate(panels, start=1):
        ax = figure.add_subplot(rows, columns, position)
        group = z[(z["phase"] == phase) & (z["task_a"] == task_a) & (z["task_b"] == task_b)]
        # a held-out t from 8 x 8 samples can be huge where the se estimate comes out tiny:
        # such points are drawn at the panel's edge, so the bulk stays readable
        low, high = _limits(group["y"].to_numpy(float))
        group = group.assign(y=group["y"].clip(low, high))
        other = group[~group["discovered"]]
        ax.scatter(other["x"], other["y"], s=5, color="0.72", label=f"not labelled ({len(other)})")
        for name, colour in (("conflict", "tab:red"), ("synergy", "tab:blue")):
            found = group[group["label"] == name]
            hit, miss = found[found["replicated"]], found[~found["replicated"]]
            if len(found):
                ax.scatter(hit["x"], hit["y"], s=16, color=colour, label=f"{name}, replicated ({len(hit)})")
                ax.scatter(miss["x"], miss["y"], s=16, facecolors="none", edgecolors=colour,
                           label=f"{name}, not replicated ({len(miss)})")
        for level in (-1.645, 1.645):
            ax.axhline(level, color="grey", lw=0.6, ls="--")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.axvline(0.0, color="grey", lw=0.6)
        arrow = "vs" if phase == "conflicts" else "->"
        ax.set_title(f"{'phase 5' if phase == 'conflicts' else 'phase 6'}: {task_a} {arrow} {task_b}",
                     fontsize="medium")
        ax.set_ylim(low - 0.3, high + 0.3)
        ax.set_xlabel("t on analysed samples")
        ax.set_ylabel("t on held-out samples (clipped to the panel)")
        ax.legend(fontsize="x-small")
    if not panels:
        figure.text(0.5, 0.5, "no cell to replicate", ha="center")
    figure.savefig(path, dpi=110)
    return path


def _limits(values: np.ndarray) -> tuple[float, float]:
    """The 0.5 and 99.5 percentiles of the finite values, widened to at least [-3, 3]."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return -3.0, 3.0
    low, high = np.percentile(finite, [0.5, 99.5])
    return min(float(low), -3.0), max(float(high), 3.0)


def _t(mean: pd.Series, se: pd.Series) -> np.ndarray:
    """mean / se, NaN where se is not a positive finite number (untested cells)."""
    mean, se = mean.to_numpy(float), se.to_numpy(float)
    ok = np.isfinite(se) & (se > 0)
    return np.where(ok, mean / np.where(ok, se, 1.0), np.nan)
