"""Figures of phase 5: one task pair's mean similarities per layer, module and head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ... import plots
from ...roles import head_axis


def conflict_heatmaps(table: pd.DataFrame, title: str, colorbar_label: str, path: Path) -> Path:
    """One task pair's mean similarities: layer x module, then layer x head per block Q, K, V, O.

    Colours are diverging and centred at 0 (red: against, blue: together), each panel on
    its own symmetric scale; `-` marks a `conflict` cell, `+` a `synergy` cell; untested
    cells (status other than `ok`) are grey.

    Args:
        table: phase 5 rows of one task pair (`layer`, `module`, `block`, `head`, `mean`,
            `label`, `status`).
    """
    if table.empty:
        return plots.message_figure(title, "no groups to show", path)
    shown = table.assign(value=table["mean"].where(table["status"] == "ok"),
                         mark=table["label"].map({"conflict": "-", "synergy": "+"}).fillna(""))
    modules = shown[shown["block"].isna()]
    panels = [("layer x module", modules, "module")]
    panels += [(plots.BLOCK_TITLES[b], shown[shown["block"] == b], head_axis(b))
               for b in plots.BLOCK_TITLES if (shown["block"] == b).any()]
    n_layers = max(shown["layer"].nunique(), 4)
    figure = Figure(figsize=(3.6 * len(panels) + 1, 1.4 + 0.28 * n_layers), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{title}\n(- conflict, + synergy: q < alpha and |alignment| >= min_effect_size; grey: untested)")
    for position, (panel_title, rows, axis_label) in enumerate(panels, start=1):
        column = "module" if axis_label == "module" else "head"
        layer = rows["layer"].astype("float").fillna(-1)
        values = rows.assign(layer=layer).pivot_table(index="layer", columns=column, values="value", aggfunc="first",
                                                      dropna=False, sort=False)
        marks = rows.assign(layer=layer).pivot_table(index="layer", columns=column, values="mark", aggfunc="first",
                                                     dropna=False, sort=False)
        order = sorted(values.index)
        values, marks = values.loc[order], marks.reindex(index=order, columns=values.columns)
        grid = values.to_numpy(dtype=float)
        finite = np.abs(grid[np.isfinite(grid)])
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        ax = figure.add_subplot(1, len(panels), position)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=plots.with_grey_bad("RdBu"),
                          norm=Normalize(-limit, limit), interpolation="nearest")
        for (r, c), mark in np.ndenumerate(marks.fillna("").to_numpy(dtype=object)):
            if mark:
                ax.text(c, r, mark, ha="center", va="center", fontsize=9, fontweight="bold", color="black")
        ax.set_title(panel_title)
        ax.set_xlabel(axis_label)
        ax.set_ylabel("layer")
        plots.label_ticks(ax, [str(c) for c in values.columns],
                     ["-" if r < 0 else str(int(r)) for r in values.index], rotate=column == "module")
        figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    figure.savefig(path, dpi=120)
    return path
