"""Figures of phase 2: layer x head heatmaps of one task's importance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ... import plots
from ...roles import head_axis


def head_heatmaps(heads: pd.DataFrame, value: str, title: str, path: Path, log_scale: bool = True) -> Path:
    """One panel per block Q, K, V, O: rows are layers, columns heads (K/V: KV heads).

    Args:
        heads: rows with columns `layer`, `block`, `head` and `value` (the phase 2 head table).
        value: column to colour by.
        title: figure title.
        path: PNG to write.
        log_scale: colour on a log scale; zero and missing cells are drawn grey.
    """
    blocks = [b for b in plots.BLOCK_TITLES if (heads["block"] == b).any()]
    if not blocks:
        return plots.message_figure(title, "no attention head groups in this store", path)
    figure = Figure(figsize=(4.2 * len(blocks), 1.2 + 0.35 * max(heads["layer"].nunique(), 4)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for position, block in enumerate(blocks, start=1):
        grid = heads[heads["block"] == block].pivot_table(index="layer", columns="head", values=value, aggfunc="sum")
        ax = figure.add_subplot(1, len(blocks), position)
        image = plots.draw_matrix(ax, grid.to_numpy(dtype=float), log_scale)
        ax.set_title(plots.BLOCK_TITLES[block])
        ax.set_xlabel(head_axis(block))
        ax.set_ylabel("layer")
        plots.label_ticks(ax, [str(h) for h in grid.columns], [str(layer) for layer in grid.index])
        figure.colorbar(image, ax=ax, label=value.replace("_", " "), shrink=0.8)
    figure.savefig(path, dpi=120)
    return path
