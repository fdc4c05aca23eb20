"""Figures of mask_eval: held-out loss against sparsity per criterion, and across tasks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ... import plots


def curves_figure(table: pd.DataFrame, path: Path) -> Path:
    """Delta loss against sparsity, one line per criterion, a panel per task (own masks), with ±1 SE."""
    own = table[table["own"]]
    tasks = list(dict.fromkeys(own["eval_task"]))
    figure = Figure(figsize=(4.2 * len(tasks), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Held-out loss increase when a task is pruned by its own masks")
    for position, task in enumerate(tasks, start=1):
        ax = figure.add_subplot(1, len(tasks), position)
        for criterion, group in own[own["eval_task"] == task].groupby("criterion", sort=False):
            group = group.sort_values("sparsity")
            ax.errorbar(group["sparsity"], group["delta"], yerr=group["delta_se"], marker="o", capsize=3,
                        label=criterion)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(task)
        ax.set_xlabel("sparsity (fraction removed)")
        ax.set_ylabel("Δ loss, nats / labelled token")
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def cross_figure(table: pd.DataFrame, path: Path) -> Path:
    """Mask task x eval task matrices of delta loss, one panel per criterion, at the highest sparsity."""
    top = table["sparsity"].max()
    panels = {}
    for criterion, group in table[table["sparsity"] == top].groupby("criterion", sort=False):
        panels[criterion] = group.pivot(index="mask_task", columns="eval_task", values="delta")
    return plots.task_heatmaps(panels, f"Held-out loss increase, task A's mask on task B's samples (sparsity {top:g})",
                               "Δ loss, nats / labelled token", path, cmap="magma_r",
                               row_label="mask of task", column_label="held-out samples of task")
