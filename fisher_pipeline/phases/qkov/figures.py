"""Figures of phase 6: signed alignment and mean score per layer and head, Q/K/V/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ... import plots


def qkov_figure(cells: pd.DataFrame, task_a: str, task_b: str, options, path: Path) -> Path:
    """Phase 6 figure of one ordered pair: signed alignment (top) and mean score (bottom), Q/K/V/O.

    Top row: mean signed Fisher-normalised alignment per layer x head, diverging around 0
    (red: a step on B raises A's loss, conflict), `-` / `+` on cells with q < alpha. Bottom
    row: the mean `variant` score, whose caption says what it can show.
    """
    title = f"Q/K/V/O interference, {task_a} (A) vs {task_b} (B)"
    if cells.empty:
        return plots.message_figure(title, "no cells to show", path)
    blocks = [b for b in plots.BLOCK_TITLES if (cells["block"] == b).any()]
    n_layers = max(cells["layer"].nunique(), 4)
    figure = Figure(figsize=(4.0 * len(blocks) + 1, 2.2 + 0.5 * n_layers), layout="constrained")
    FigureCanvasAgg(figure)
    if options.variant == "unsigned" and options.fisher_pool == "a":
        caption = ("bottom: mean unsigned score g_A^2 |g_B| / F_A. With F from A, A's sensitivity cancels in this "
                   "mean (mean_i g_A^2 / F_A = 1): it shows where B's updates are large, not interference.")
    else:
        caption = (f"bottom: mean {options.variant} score (F from {options.fisher_pool}); a mean over all pairs, "
                   "not a test of interference.")
    figure.suptitle(f"{title}\ntop: signed alignment mean g_A g_B / Fhat (red: conflict; - / + : BH q < "
                    f"{options.alpha:g} and |cosine of the mean gradients| >= {options.min_effect_size:g}; "
                    f"grey: untested)\n{caption}", fontsize=9)
    shown = cells.assign(signed=cells["signed_mean"].where(cells["status"] == "ok"),
                         mark=cells["label"].map({"conflict": "-", "synergy": "+"}).fillna(""))
    for column, block in enumerate(blocks):
        rows = shown[shown["block"] == block]
        signed = rows.pivot_table(index="layer", columns="head", values="signed", aggfunc="first", dropna=False)
        marks = rows.pivot_table(index="layer", columns="head", values="mark", aggfunc="first", dropna=False)
        score = rows.pivot_table(index="layer", columns="head", values="score_mean", aggfunc="first", dropna=False)
        marks = marks.reindex(index=signed.index, columns=signed.columns)
        grid = signed.to_numpy(dtype=float)
        finite = np.abs(grid[np.isfinite(grid)])
        # a few dead heads (F at eps) can be 100x the rest: clip the scale at the 98th percentile
        limit = float(np.percentile(finite, 98)) if finite.size and finite.max() > 0 else 1.0
        limit = limit if limit > 0 else 1.0
        top = figure.add_subplot(2, len(blocks), column + 1)
        image = top.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=plots.with_grey_bad("RdBu"),
                           norm=Normalize(-limit, limit), interpolation="nearest")
        for (r, c), mark in np.ndenumerate(marks.fillna("").to_numpy(dtype=object)):
            if mark:
                top.text(c, r, mark, ha="center", va="center", fontsize=9, fontweight="bold")
        top.set_title(f"{plots.BLOCK_TITLES[block]}: signed")
        plots.head_axes(top, block, signed)
        figure.colorbar(image, ax=top, shrink=0.8, extend="both", label="clipped at 98th pct of |value|")
        bottom = figure.add_subplot(2, len(blocks), len(blocks) + column + 1)
        image = plots.draw_matrix(bottom, score.to_numpy(dtype=float), log_scale=options.variant != "signed")
        bottom.set_title(f"{plots.BLOCK_TITLES[block]}: mean {options.variant}")
        plots.head_axes(bottom, block, score)
        figure.colorbar(image, ax=bottom, shrink=0.8)
    figure.savefig(path, dpi=110)
    return path
