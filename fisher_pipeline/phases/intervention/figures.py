"""Figures of the intervention checks: measured against predicted loss changes, the damping curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def cells_figure(cells: pd.DataFrame, path: Path) -> Path:
    """Predicted (discovery) against measured change of A's held-out loss, a panel per phase."""
    phases = list(dict.fromkeys(cells["phase"])) or ["none"]
    figure = Figure(figsize=(4.6 * len(phases), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Steps on B through single cells: predicted vs measured change of A's held-out loss")
    for position, phase in enumerate(phases, start=1):
        ax = figure.add_subplot(1, len(phases), position)
        group = cells[cells["phase"] == phase]
        for (choice, gain), part in group.groupby(["choice", "gain"], sort=False):
            ax.scatter(part["predicted_discovery"], part["measured"], s=20,
                       marker="o" if choice == "top" else "x", label=f"{choice} cells, gain {gain:g}")
        values = np.abs(group[["predicted_discovery", "measured"]].to_numpy(float))
        scale = float(np.nanmedian(values[values > 0])) if (values > 0).any() else 1.0
        limit = float(np.nanmax(values)) if values.size else 1.0
        ax.plot([-limit, limit], [-limit, limit], color="grey", lw=0.8)
        ax.set_xscale("symlog", linthresh=scale / 10)
        ax.set_yscale("symlog", linthresh=scale / 10)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_title({"conflicts": "phase 5 cells, plain steps", "qkov": "phase 6 cells, Fisher steps"}.get(
            phase, phase), fontsize="medium")
        ax.set_xlabel("predicted from analysed samples, gbar_A . step")
        ax.set_ylabel("measured on held-out samples")
        if len(group):
            ax.legend(fontsize="x-small")
    figure.savefig(path, dpi=110)
    return path


def damping_figure(natgrad: pd.DataFrame, damping: float, path: Path) -> Path:
    """Own natural-gradient steps: held-out loss change and realised fraction against lambda, per task."""
    own = natgrad[natgrad["kind"] == "own"]
    figure = Figure(figsize=(9.0, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle("Each task's own natural-gradient step, all promising the same drop (dotted: plain gradient)")
    gain, realised = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for task, group in own.groupby("task_a", sort=False):
        natural = group[np.isfinite(group["damping"])].sort_values("damping")
        line = gain.plot(natural["damping"], natural["measured"], marker="o", label=task)[0]
        realised.plot(natural["damping"], natural["realised"], marker="o", color=line.get_color(), label=task)
        plain = group[~np.isfinite(group["damping"])]
        if len(plain):
            gain.axhline(float(plain["measured"].iloc[0]), color=line.get_color(), ls=":", lw=1)
            realised.axhline(float(plain["realised"].iloc[0]), color=line.get_color(), ls=":", lw=1)
    for ax in (gain, realised):
        ax.set_xscale("log")
        ax.axvline(damping, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("damping lambda (Fisher units)")
        ax.legend(fontsize="small")
    gain.set_ylabel("held-out loss change per sample")
    realised.set_ylabel("measured / predicted by analysed samples")
    realised.axhline(1.0, color="grey", lw=0.5)
    figure.savefig(path, dpi=110)
    return path


# --- the command ---------------------------------------------------------------------------------
