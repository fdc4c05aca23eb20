"""Phases 5 and 6 under each `compute_dtype`: how far float32 and bfloat16 tables lie from float64's.

    .venv/bin/python benchmarks/pair_dtypes.py                     # the default run's stores, arithmetic / code
    .venv/bin/python benchmarks/pair_dtypes.py --stores DIR --task-a A --task-b B

One task pair, both phases, default options but `compute_dtype`. Per phase and dtype:
the largest difference from float64 of the tested mean (in its own units and in standard
errors), of the p-value (absolute, and of log10 p), of the alignment (effect size), how many
labels differ and how many cells change sides of q = 0.05, and the wall time of the phase
(one run each, in this process: a rough guide; `pair_phases.py --sweep` times them properly).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from harness import ROOT

#: (mean, se, p, q) columns of each phase's table.
COLUMNS = {"conflicts": ("mean", "se", "p", "q"), "qkov": ("signed_mean", "signed_se", "signed_p", "signed_q")}


def tables(store_a, store_b, dtype: str) -> dict:
    """`{phase: (table, seconds)}` of both phases with `compute_dtype = dtype`."""
    from fisher_pipeline.phases.conflicts import ConflictsOptions
    from fisher_pipeline.phases.conflicts.compute import pair_conflicts
    from fisher_pipeline.phases.qkov import QkovOptions
    from fisher_pipeline.phases.qkov.compute import pair_qkov

    runs = {"conflicts": lambda: pair_conflicts(store_a, store_b, ConflictsOptions(compute_dtype=dtype))[0],
            "qkov": lambda: pair_qkov(store_a, store_b, QkovOptions(compute_dtype=dtype))["cells"]}
    out = {}
    for phase, run in runs.items():
        start = time.perf_counter()
        table = run()
        out[phase] = table, time.perf_counter() - start
    return out


def compare(phase: str, table, exact) -> dict:
    """Largest differences of `table` from the float64 `exact` (same rows, same order)."""
    mean, se, p, q = COLUMNS[phase]
    ok = (exact["status"] == "ok").to_numpy()
    shift = np.abs(table[mean] - exact[mean]).to_numpy()[ok]
    log_p = np.abs(np.log10(table[p].clip(lower=1e-300)) - np.log10(exact[p].clip(lower=1e-300))).to_numpy()[ok]
    return {
        "cells": int(ok.sum()),
        "mean": shift.max(initial=0.0),
        "mean / se": (shift / exact[se].to_numpy()[ok]).max(initial=0.0),
        "p": np.abs(table[p] - exact[p]).to_numpy()[ok].max(initial=0.0),
        "log10 p": log_p.max(initial=0.0),
        "effect": np.nanmax(np.abs(table["effect_size"] - exact["effect_size"]).to_numpy()[ok], initial=0.0),
        "labels": int((table["label"] != exact["label"]).sum()),
        "q sides": int(((table[q] < 0.05) != (exact[q] < 0.05)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default=str(ROOT / "results" / "fisher"))
    parser.add_argument("--task-a", default="arithmetic")
    parser.add_argument("--task-b", default="code")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from fisher_pipeline.store import FisherStore

    torch.set_num_threads(args.threads)
    store_a = FisherStore(Path(args.stores) / f"{args.task_a}.zarr")
    store_b = FisherStore(Path(args.stores) / f"{args.task_b}.zarr")
    results = {dtype: tables(store_a, store_b, dtype) for dtype in ("float64", "float32", "bfloat16")}
    print(f"{args.task_a} / {args.task_b}: N = {store_a.n_samples} x {store_b.n_samples}, {args.threads} threads")
    print("| phase | compute_dtype | cells | max abs diff of mean | in se | of p | of log10 p | of alignment "
          "| labels differing | cells across q = 0.05 | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for phase in ("conflicts", "qkov"):
        exact, seconds = results["float64"][phase]
        print(f"| {phase} | float64 | {int((exact['status'] == 'ok').sum())} | - | - | - | - | - | - | - "
              f"| {seconds:.1f} |")
        for dtype in ("float32", "bfloat16"):
            table, seconds = results[dtype][phase]
            d = compare(phase, table, exact)
            print(f"| {phase} | {dtype} | {d['cells']} | {d['mean']:.2e} | {d['mean / se']:.2e} | {d['p']:.2e} "
                  f"| {d['log10 p']:.2e} | {d['effect']:.2e} | {d['labels']} | {d['q sides']} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
