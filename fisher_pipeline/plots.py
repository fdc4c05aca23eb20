"""What the phases' figures share: task x task matrices, matrix drawing, ticks, messages.

Each phase draws its own figures beside its numerics (`phases/<name>/figures.py`) with these.

Figures are drawn on matplotlib's Agg canvas through the object API (`Figure`), so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from .roles import HEAD_BLOCKS, KV_BLOCKS, head_axis

#: Panel titles of the blocks Q, K, V, O (`roles.KV_BLOCKS` are per KV head).
BLOCK_TITLES = {b: f"{b.upper()} ({'KV heads' if b in KV_BLOCKS else 'query heads'})" for b in HEAD_BLOCKS}


def task_heatmaps(panels: Mapping[str, pd.DataFrame], title: str, colorbar_label: str, path: Path,
                  vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                  row_label: str = "task", column_label: str = "task", empty_message: str = "nothing to show") -> Path:
    """Task x task matrices side by side (one panel per sparsity, level, ...), values annotated.

    Args:
        panels: panel title -> square frame (index = row tasks, columns = column tasks).
        title: figure title.
        colorbar_label: what the colours measure.
        path: PNG to write.
        vmin, vmax: colour range shared by all panels (default: the data's range).
        cmap: matplotlib colormap name.
        row_label, column_label: axis labels (what rows and columns are).
        empty_message: drawn instead when `panels` is empty.
    """
    if not panels:
        return message_figure(title, empty_message, path)
    n_tasks = max(len(frame) for frame in panels.values())
    side = 2.0 + 0.6 * n_tasks
    figure = Figure(figsize=(side * len(panels) + 1.0, side + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    values = np.concatenate([frame.to_numpy(dtype=float).ravel() for frame in panels.values()])
    finite = values[np.isfinite(values)]
    norm = Normalize(vmin if vmin is not None else (finite.min() if finite.size else 0.0),
                     vmax if vmax is not None else (finite.max() if finite.size else 1.0))
    image = None
    for position, (panel_title, frame) in enumerate(panels.items(), start=1):
        ax = figure.add_subplot(1, len(panels), position)
        image = ax.imshow(np.ma.masked_invalid(frame.to_numpy(dtype=float)), cmap=with_grey_bad(cmap), norm=norm)
        ax.set_title(panel_title)
        ax.set_xlabel(column_label)
        ax.set_ylabel(row_label)
        label_ticks(ax, [str(c) for c in frame.columns], [str(r) for r in frame.index], rotate=True)
        annotate(ax, frame.to_numpy(dtype=float))
    figure.colorbar(image, ax=figure.axes, label=colorbar_label, shrink=0.8)
    figure.savefig(path, dpi=120)
    return path


def head_axes(ax, block: str, grid: pd.DataFrame) -> None:
    ax.set_xlabel(head_axis(block))
    ax.set_ylabel("layer")
    label_ticks(ax, [str(c) for c in grid.columns], [str(r) for r in grid.index])


def draw_matrix(ax, grid: np.ndarray, log_scale: bool):
    positive = grid[np.isfinite(grid) & (grid > 0)]
    if log_scale and positive.size:
        norm = LogNorm(positive.min(), max(positive.max(), positive.min() * (1 + 1e-9)))
        grid = np.where(grid > 0, grid, np.nan)  # log colours cannot show zero: grey instead
    else:
        finite = grid[np.isfinite(grid)]
        norm = Normalize(finite.min() if finite.size else 0.0, finite.max() if finite.size else 1.0)
    return ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=with_grey_bad("viridis"), norm=norm,
                     interpolation="nearest")


def with_grey_bad(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")


def label_ticks(ax, columns: list[str], rows: list[str], rotate: bool = False) -> None:
    # Label every cell up to ~40 per axis; beyond that matplotlib's automatic ticks read better.
    if len(columns) <= 40:
        ax.set_xticks(range(len(columns)), columns, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), rows)


def annotate(ax, grid: np.ndarray) -> None:
    if grid.size > 100:
        return  # numbers in cells are unreadable beyond 10 x 10 tasks
    for (row, col), value in np.ndenumerate(grid):
        text = "n/a" if not np.isfinite(value) else f"{value:.3g}"
        ax.text(col, row, text, ha="center", va="center", fontsize=8, color="white",
                bbox={"facecolor": "black", "alpha": 0.3, "pad": 1, "linewidth": 0})


def message_figure(title: str, message: str, path: Path) -> Path:
    figure = Figure(figsize=(6, 2.5), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    ax = figure.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    figure.savefig(path, dpi=120)
    return path
