"""Phases 5 and 6, speed and memory: ours vs the floor of reading the stores vs a pair-by-pair loop.

    .venv/bin/python benchmarks/pair_phases.py                     # phase 5 on the default run's stores
    .venv/bin/python benchmarks/pair_phases.py --phase qkov         # phase 6
    .venv/bin/python benchmarks/pair_phases.py --sweep 32,128,256,512 [--baseline DIR]   # N sweep
    .venv/bin/python benchmarks/pair_phases.py --sweep 32,512 --compute-dtypes float32,bfloat16

The N sweep writes synthetic stores (`synthetic_stores.py`: SmolLM2's attention geometry, 3
layers, float16, our writer; kept under `--sweep-dir` for the next run) of N samples per
task and times, per N: `floor` (read both stores' per-sample arrays), `product` (read, convert
and one batched product per head block: one product per cell, the compute bound of both
phases), `conflicts` and `qkov` (`pair_conflicts` / `pair_qkov`, default options), and with
`--baseline DIR` (a checkout of an earlier version of the package) the same two phases there,
side by side in the same run. `--compute-dtypes float32,bfloat16` times `product`, `conflicts`
and `qkov` with each `compute_dtype` (bfloat16: the products in bfloat16).

Needs the default run's phase 1 stores (`make run`). Each measurement runs in its own
subprocess (peak RSS is that variant's alone), variants interleaved over repeats, and the
table reports medians. Variants, per task pair:
  floor   read every per-sample array of both stores once (`store.per_sample(param)`),
          nothing else: the least any phase 5 must do
  ours    phase 5: `pair_conflicts` (cosine): all layers, modules and heads, with within-task
          baselines, tests, BH and top pairs; phase 6: `pair_qkov` (unsigned and signed
          scores of every cell, tests, BH, bootstrap intervals, health, forensics)
  all     `run_conflicts` over all pairs / `run_qkov` over all ordered pairs of the given
          stores in one process, outputs written
  loop    the hand-rolled script: phase 5, for every group and sample pair a float64 cosine
          of the two flattened slices (numpy); phase 6, the seed-style loop over pairs,
          layers, heads and blocks of `sum(g_A^2 / F_A * |g_B|)`. Run on a small case (the
          groups of the first `--loop-layers` layers, `--loop-samples` samples per task),
          where ours is timed too for the speed-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, peak_rss_mb, run_worker


def _floor(store_a, store_b) -> None:
    for store in (store_a, store_b):
        for name in store.per_sample_names:
            store.per_sample(name)


def _loop_groups(store, layers: int, phase: str):
    from fisher_pipeline.phases.conflicts.compute import conflict_groups
    from fisher_pipeline.phases.qkov.compute import qkov_cells

    groups = conflict_groups(store) if phase == "conflicts" else qkov_cells(store)
    return [g for g in groups if store.geometry[g[0]].layer in range(layers)]


def _first_samples(path: Path, n: int):
    """The store at `path` as a phase would see it with only its first `n` samples."""
    from fisher_pipeline.store import FisherStore

    class FirstSamples(FisherStore):
        n_samples = property(lambda self: n)
        sample_ids = property(lambda self: FisherStore.sample_ids.fget(self)[:n])

        def per_sample(self, name, ids=None, rows=None):
            return super().per_sample(name, ids, slice(0, n) if rows is None and ids is None else rows)

    return FirstSamples(path)


def _loop(store_a, store_b, groups, n: int) -> None:
    """What a hand-rolled script does: Python loops over groups and pairs, numpy per pair."""
    import numpy as np

    from fisher_pipeline.sample_pairs import group_slice

    for param in dict.fromkeys(g[0] for g in groups):
        data_a, data_b = store_a.per_sample(param, rows=slice(0, n)), store_b.per_sample(param, rows=slice(0, n))
        for group in (g for g in groups if g[0] == param):
            a = group_slice(store_a, group, data_a).astype(np.float64)
            b = group_slice(store_b, group, data_b).astype(np.float64)
            sims = [float(a[i] @ b[j] / (np.linalg.norm(a[i]) * np.linalg.norm(b[j])))
                    for i in range(len(a)) for j in range(len(b))]
            np.mean(sims)


def _seed_loop(store_a, store_b, cells, n: int) -> None:
    """The seeds' phase 6: for every pair, layer, head and block, one slice product in numpy."""
    import numpy as np

    from fisher_pipeline.sample_pairs import group_slice

    for param in dict.fromkeys(c[0] for c in cells):
        data_a, data_b = store_a.per_sample(param, rows=slice(0, n)), store_b.per_sample(param, rows=slice(0, n))
        fisher = store_a.fisher(param).astype(np.float64)[None]
        for i in range(n):
            for j in range(n):
                for cell in (c for c in cells if c[0] == param):
                    a = group_slice(store_a, cell, data_a[i:i + 1]).astype(np.float64)[0]
                    b = group_slice(store_b, cell, data_b[j:j + 1]).astype(np.float64)[0]
                    f = group_slice(store_a, cell, fisher)[0]
                    float(np.mean(a * a / np.maximum(f, 1e-10) * np.abs(b)))


def _product(store_a, store_b, compute_dtype: str = "float32") -> None:
    """Read, convert and one batched product per head block of every per-sample parameter
    (bfloat16: converted to float32, then to bfloat16, as the pair engine does)."""
    import torch

    from fisher_pipeline.sample_pairs import _Units

    product_dtype = getattr(torch, compute_dtype)

    for param in store_a.per_sample_names:
        geometry = store_a.geometry[param]
        units = _Units(geometry, [(param, block, 0) for block in geometry.head_blocks()])
        data_a, data_b = store_a.per_sample(param), store_b.per_sample(param)
        for unit in units.units:
            left, right = (units.tensor(data, unit, torch.float32).to(product_dtype) for data in (data_a, data_b))
            torch.bmm(left, right.transpose(1, 2))


def worker(args: argparse.Namespace) -> None:
    if args.package_root:  # an earlier version of the package, for the before / after sweep
        sys.path.insert(0, args.package_root)
    import torch

    from fisher_pipeline.phases.conflicts import ConflictsOptions
    from fisher_pipeline.phases.conflicts.compute import pair_conflicts, run_conflicts
    from fisher_pipeline.phases.qkov import QkovOptions
    from fisher_pipeline.phases.qkov.compute import pair_qkov, run_qkov
    from fisher_pipeline.store import FisherStore

    torch.set_num_threads(args.threads)
    paths = {p.stem: p for p in sorted(Path(args.stores).glob("*.zarr"))}
    store_a, store_b = FisherStore(paths[args.task_a]), FisherStore(paths[args.task_b])
    start = time.perf_counter()
    extra: dict = {}
    if args.worker == "floor":
        _floor(store_a, store_b)
    elif args.worker == "product":
        _product(store_a, store_b, args.compute_dtype)
    elif args.worker == "ours":
        dtype = {} if args.compute_dtype == "float32" else {"compute_dtype": args.compute_dtype}  # older versions
        if args.phase == "conflicts":
            extra["groups"] = len(pair_conflicts(store_a, store_b, ConflictsOptions(**dtype))[0])
        else:
            extra["groups"] = len(pair_qkov(store_a, store_b, QkovOptions(**dtype))["cells"])
    elif args.worker == "all":
        with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
            if args.phase == "conflicts":
                run_conflicts(paths, Path(tmp) / "out", ConflictsOptions())
            else:
                run_qkov(paths, Path(tmp) / "out", QkovOptions(), pairs=None)
    else:  # the small case: a loop, or ours restricted to the same groups and samples
        groups = _loop_groups(store_a, args.loop_layers, args.phase)
        n = min(args.loop_samples, store_a.n_samples, store_b.n_samples)
        if args.worker == "loop":
            (_loop if args.phase == "conflicts" else _seed_loop)(store_a, store_b, groups, n)
        else:
            small_a, small_b = (_first_samples(paths[t], n) for t in (args.task_a, args.task_b))
            if args.phase == "conflicts":
                pair_conflicts(small_a, small_b, ConflictsOptions(), groups)
            else:
                pair_qkov(small_a, small_b, QkovOptions(), groups)
        extra["groups"] = len(groups)
    elapsed = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    import fisher_pipeline

    print(json.dumps({"variant": args.worker, "seconds": elapsed, "peak_rss_mb": peak_mb,
                      "package": str(Path(fisher_pipeline.__file__).parent), **extra}))


def _run(variant: str, pair: tuple[str, str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--stores", args.stores, "--task-a", pair[0],
           "--task-b", pair[1], "--threads", str(args.threads), "--loop-layers", str(args.loop_layers),
           "--loop-samples", str(args.loop_samples), "--phase", args.phase]
    return run_worker(cmd[1], cmd[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["floor", "product", "ours", "all", "loop", "ours_small"])
    parser.add_argument("--phase", choices=["conflicts", "qkov"], default="conflicts")
    parser.add_argument("--loop-samples", type=int, default=32, help="samples per task of the small case")
    parser.add_argument("--stores", default=str(ROOT / "results" / "fisher"))
    parser.add_argument("--task-a", default="arithmetic")
    parser.add_argument("--task-b", default="code")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-layers", type=int, default=1, help="layers of the small case")
    parser.add_argument("--sweep", help="N per task, comma-separated (e.g. 32,128,256,512): the N sweep")
    parser.add_argument("--sweep-dir", default=str(ROOT / "benchmarks" / ".sweep_stores"),
                        help="where the sweep's synthetic stores are kept")
    parser.add_argument("--baseline", help="a checkout of an earlier version, timed beside this one in the sweep")
    parser.add_argument("--package-root", help=argparse.SUPPRESS)
    parser.add_argument("--compute-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--compute-dtypes", default="float32",
                        help="the sweep's compute dtypes, comma-separated (float32, bfloat16, float64)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.sweep:
        sweep(args)
        return
    pair = (args.task_a, args.task_b)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, threads={args.threads}, stores={args.stores}, pair={pair}, "
          f"phase={args.phase}")
    variants = ["floor", "ours", "all", "loop", "ours_small"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _, variant in itertools.product(range(args.repeats), variants):
        results[variant].append(_run(variant, pair, args))
    median = {v: statistics.median(r["seconds"] for r in runs) for v, runs in results.items()}
    rss = {v: statistics.median(r["peak_rss_mb"] for r in runs) for v, runs in results.items()}
    print("| variant | what | wall s (median) | ratio | peak RSS MB | runs (s) |\n|---|---|---|---|---|---|")
    rows = [("floor", "read both stores' per-sample arrays once", 1.0),
            ("ours", f"{args.phase}, one pair ({results['ours'][0]['groups']} groups)",
             median["ours"] / median["floor"]),
            ("all", f"{args.phase}, every pair of the stores, outputs written", median["all"] / median["floor"]),
            ("loop", f"pair-by-pair loop, {args.loop_layers} layer(s), {args.loop_samples} samples per task "
                     f"({results['loop'][0]['groups']} groups)", 1.0),
            ("ours_small", f"{args.phase} on the same small case", median["ours_small"] / median["loop"])]
    for variant, what, ratio in rows:
        runs = ", ".join(f"{r['seconds']:.2f}" for r in results[variant])
        label = {"ours": "x floor", "all": "x floor", "ours_small": "x loop"}.get(variant, "")
        print(f"| {variant} | {what} | {median[variant]:.2f} | {ratio:.3f}{label} | {rss[variant]:.0f} | {runs} |")
    print(f"speed-up over the loop on the small case: {median['loop'] / median['ours_small']:.0f}x")


def sweep(args: argparse.Namespace) -> None:
    """The N sweep: per N, every variant in its own process, interleaved over repeats, medians."""
    from synthetic_stores import sweep_stores

    sizes = [int(n) for n in args.sweep.split(",")]
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, threads={args.threads}, repeats={args.repeats}; synthetic stores "
          "of SmolLM2's attention geometry, 3 layers, float16")
    dtypes = args.compute_dtypes.split(",")
    variants = [("floor", None, "conflicts", "float32")]
    variants += [(worker_name, None, phase, dtype) for dtype in dtypes
                 for worker_name, phase in (("product", "conflicts"), ("ours", "conflicts"), ("ours", "qkov"))]
    if args.baseline:
        variants += [("ours", args.baseline, "conflicts", "float32"), ("ours", args.baseline, "qkov", "float32")]
    print("| N per task | variant | wall s (median) | x floor | peak RSS MB | runs (s) |\n|---|---|---|---|---|---|")
    for n in sizes:
        folder = Path(sweep_stores(Path(args.sweep_dir), n)["alpha"]).parent
        results: dict[tuple, list[dict]] = {v: [] for v in variants}
        for _, variant in itertools.product(range(args.repeats), variants):
            worker_name, root, phase, dtype = variant
            extra = ["--package-root", root] if root else []
            cmd = ["--worker", worker_name, "--stores", str(folder), "--task-a", "alpha", "--task-b", "beta",
                   "--threads", str(args.threads), "--phase", phase, "--compute-dtype", dtype, *extra]
            results[variant].append(run_worker(__file__, cmd))
        floor = statistics.median(r["seconds"] for r in results[variants[0]])
        for variant, runs in results.items():
            worker_name, root, phase, dtype = variant
            name = {"floor": "floor (read)", "product": "one product per cell (read, convert, bmm)"}.get(
                worker_name, f"{phase}{' before' if root else ''}") + ("" if dtype == "float32" else f", {dtype}")
            wall = statistics.median(r["seconds"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"| {n} | {name} | {wall:.2f} | {wall / floor:.2f}x | {rss:.0f} | {times} |", flush=True)


if __name__ == "__main__":
    main()
