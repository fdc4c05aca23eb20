"""PNG figures of the analysis phases: layer x head heatmaps and task x task matrices.

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

BLOCK_TITLES = {"q": "Q (query heads)", "k": "K (KV heads)", "v": "V (KV heads)", "o": "O (query heads)"}


def head_heatmaps(heads: pd.DataFrame, value: str, title: str, path: Path, log_scale: bool = True) -> Path:
    """One panel per block Q, K, V, O: rows are layers, columns heads (K/V: KV heads).

    Args:
        heads: rows with columns `layer`, `block`, `head` and `value` (the phase 2 head table).
        value: column to colour by.
        title: figure title.
        path: PNG to write.
        log_scale: colour on a log scale; zero and missing cells are drawn grey.
    """
    blocks = [b for b in BLOCK_TITLES if (heads["block"] == b).any()]
    if not blocks:
        return _message_figure(title, "no attention head groups in this store", path)
    figure = Figure(figsize=(4.2 * len(blocks), 1.2 + 0.35 * max(heads["layer"].nunique(), 4)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for position, block in enumerate(blocks, start=1):
        grid = heads[heads["block"] == block].pivot_table(index="layer", columns="head", values=value, aggfunc="sum")
        ax = figure.add_subplot(1, len(blocks), position)
        image = _draw_matrix(ax, grid.to_numpy(dtype=float), log_scale)
        ax.set_title(BLOCK_TITLES[block])
        ax.set_xlabel("KV head" if block in ("k", "v") else "head")
        ax.set_ylabel("layer")
        _label_ticks(ax, [str(h) for h in grid.columns], [str(layer) for layer in grid.index])
        figure.colorbar(image, ax=ax, label=value.replace("_", " "), shrink=0.8)
    figure.savefig(path, dpi=120)
    return path


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
        return _message_figure(title, empty_message, path)
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
        image = ax.imshow(np.ma.masked_invalid(frame.to_numpy(dtype=float)), cmap=_with_grey_bad(cmap), norm=norm)
        ax.set_title(panel_title)
        ax.set_xlabel(column_label)
        ax.set_ylabel(row_label)
        _label_ticks(ax, [str(c) for c in frame.columns], [str(r) for r in frame.index], rotate=True)
        _annotate(ax, frame.to_numpy(dtype=float))
    figure.colorbar(image, ax=figure.axes, label=colorbar_label, shrink=0.8)
    figure.savefig(path, dpi=120)
    return path


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
        return _message_figure(title, "no groups to show", path)
    shown = table.assign(value=table["mean"].where(table["status"] == "ok"),
                         mark=table["label"].map({"conflict": "-", "synergy": "+"}).fillna(""))
    modules = shown[shown["block"].isna()]
    panels = [("layer x module", modules, "module")]
    panels += [(BLOCK_TITLES[b], shown[shown["block"] == b], "KV head" if b in ("k", "v") else "head")
               for b in BLOCK_TITLES if (shown["block"] == b).any()]
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
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=_with_grey_bad("RdBu"),
                          norm=Normalize(-limit, limit), interpolation="nearest")
        for (r, c), mark in np.ndenumerate(marks.fillna("").to_numpy(dtype=object)):
            if mark:
                ax.text(c, r, mark, ha="center", va="center", fontsize=9, fontweight="bold", color="black")
        ax.set_title(panel_title)
        ax.set_xlabel(axis_label)
        ax.set_ylabel("layer")
        _label_ticks(ax, [str(c) for c in values.columns],
                     ["-" if r < 0 else str(int(r)) for r in values.index], rotate=column == "module")
        figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    figure.savefig(path, dpi=120)
    return path


def qkov_figure(cells: pd.DataFrame, task_a: str, task_b: str, options, path: Path) -> Path:
    """Phase 6 figure of one ordered pair: signed alignment (top) and mean score (bottom), Q/K/V/O.

    Top row: mean signed Fisher-normalised alignment per layer x head, diverging around 0
    (red: a step on B raises A's loss, conflict), `-` / `+` on cells with q < alpha. Bottom
    row: the mean `variant` score, whose caption says what it can show.
    """
    title = f"Q/K/V/O interference, {task_a} (A) vs {task_b} (B)"
    if cells.empty:
        return _message_figure(title, "no cells to show", path)
    blocks = [b for b in BLOCK_TITLES if (cells["block"] == b).any()]
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
        image = top.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=_with_grey_bad("RdBu"),
                           norm=Normalize(-limit, limit), interpolation="nearest")
        for (r, c), mark in np.ndenumerate(marks.fillna("").to_numpy(dtype=object)):
            if mark:
                top.text(c, r, mark, ha="center", va="center", fontsize=9, fontweight="bold")
        top.set_title(f"{BLOCK_TITLES[block]}: signed")
        _axes(top, block, signed)
        figure.colorbar(image, ax=top, shrink=0.8, extend="both", label="clipped at 98th pct of |value|")
        bottom = figure.add_subplot(2, len(blocks), len(blocks) + column + 1)
        image = _draw_matrix(bottom, score.to_numpy(dtype=float), log_scale=options.variant != "signed")
        bottom.set_title(f"{BLOCK_TITLES[block]}: mean {options.variant}")
        _axes(bottom, block, score)
        figure.colorbar(image, ax=bottom, shrink=0.8)
    figure.savefig(path, dpi=110)
    return path


def _axes(ax, block: str, grid: pd.DataFrame) -> None:
    ax.set_xlabel("KV head" if block in ("k", "v") else "head")
    ax.set_ylabel("layer")
    _label_ticks(ax, [str(c) for c in grid.columns], [str(r) for r in grid.index])


def _draw_matrix(ax, grid: np.ndarray, log_scale: bool):
    positive = grid[np.isfinite(grid) & (grid > 0)]
    if log_scale and positive.size:
        norm = LogNorm(positive.min(), max(positive.max(), positive.min() * (1 + 1e-9)))
        grid = np.where(grid > 0, grid, np.nan)  # log colours cannot show zero: grey instead
    else:
        finite = grid[np.isfinite(grid)]
        norm = Normalize(finite.min() if finite.size else 0.0, finite.max() if finite.size else 1.0)
    return ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=_with_grey_bad("viridis"), norm=norm,
                     interpolation="nearest")


def _with_grey_bad(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")


def _label_ticks(ax, columns: list[str], rows: list[str], rotate: bool = False) -> None:
    # Label every cell up to ~40 per axis; beyond that matplotlib's automatic ticks read better.
    if len(columns) <= 40:
        ax.set_xticks(range(len(columns)), columns, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), rows)


def _annotate(ax, grid: np.ndarray) -> None:
    if grid.size > 100:
        return  # numbers in cells are unreadable beyond 10 x 10 tasks
    for (row, col), value in np.ndenumerate(grid):
        text = "n/a" if not np.isfinite(value) else f"{value:.3g}"
        ax.text(col, row, text, ha="center", va="center", fontsize=8, color="white",
                bbox={"facecolor": "black", "alpha": 0.3, "pad": 1, "linewidth": 0})


def _message_figure(title: str, message: str, path: Path) -> Path:
    figure = Figure(figsize=(6, 2.5), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    ax = figure.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    figure.savefig(path, dpi=120)
    return path
