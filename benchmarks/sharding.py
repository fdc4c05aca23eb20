"""Phase 1 of a config run as one job per task vs split into sample shards, side by side.

    .venv/bin/python benchmarks/sharding.py                   # default config, 2 shards on 2 cores
    .venv/bin/python benchmarks/sharding.py --shards 2 --cores 2 --configfile config/config.yaml

Each variant is a fresh Snakemake run (in its own temporary directory) of the phase 1
stores only: `unsharded` runs one `fisher` job per task with all the cores; `sharded`
runs `--shards` `fisher_shard` jobs per task with one thread each (so `--cores` of them
run at once), then a `fisher_merge` job per task. Reported: wall time of the whole run,
each job's own wall time and peak RSS (Snakemake's `benchmark:` files), the merge's cost,
and whether the merged stores equal the unsharded ones (float32 arrays to rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_variant(configfile: Path, workdir: Path, cores: int, shards: int) -> float:
    """Run phase 1 of every task of `configfile` in `workdir`; return the wall time (s)."""
    config = yaml.safe_load(configfile.read_text())
    items = []  # --config KEY=VALUE items (YAML values)
    model = config.get("model", {}).get("path")
    if model and not Path(model).is_absolute():
        items.append(f"model={json.dumps({'path': str(ROOT / model)})}")
    if shards > 1:
        items.append(f"fisher={json.dumps({**config.get('fisher', {}), 'shards': shards})}")
    targets = [f"results/fisher/{task}.zarr" for task in config["tasks"]]
    threads = "fisher_shard=1" if shards > 1 else f"fisher={cores}"  # K one-thread shards at once
    command = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(configfile), "--cores", str(cores),
               "--quiet", "rules", "--set-threads", threads, *(["--config", *items] if items else [])]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return elapsed


def job_costs(workdir: Path) -> pd.DataFrame:
    """One row per phase 1 job: kind (fisher / shard / merge), task, wall s, peak RSS MB."""
    rows = []
    for tsv in sorted((workdir / "logs" / "benchmarks" / "fisher").rglob("*.tsv")):
        table = pd.read_csv(tsv, sep="\t")
        relative = tsv.relative_to(workdir / "logs" / "benchmarks" / "fisher")
        kind = "shard" if relative.parts[0] == "shards" else ("merge" if tsv.name.endswith(".merge.tsv") else "fisher")
        task = relative.parts[1] if kind == "shard" else tsv.name.split(".")[0]
        rows.append({"kind": kind, "task": task, "job": str(relative), "wall_s": float(table["s"].iloc[0]),
                     "peak_rss_mb": float(table["max_rss"].iloc[0])})
    return pd.DataFrame(rows)


def stores_equal(a: Path, b: Path) -> float:
    """Largest relative difference over every statistic and per-sample array of two stores."""
    import zarr

    worst = 0.0
    left, right = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for kind in ("fisher", "grad_mean", "group", "group_m2", "fisher_m2", "per_sample"):
        if kind not in left:
            continue
        for name in left[kind].array_keys():
            x, y = left[kind][name][...].astype(np.float64), right[kind][name][...].astype(np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="sharding-", dir=ROOT / "benchmarks"))
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"config {args.configfile}, {args.shards} shards on {args.cores} cores")
    walls = {}
    for variant, shards in (("unsharded", 1), ("sharded", args.shards)):
        walls[variant] = run_variant(args.configfile.resolve(), base / variant, args.cores, shards)
    print("| variant | wall time of phase 1, all tasks (s) | jobs | median job wall (s) | max job peak RSS (MB) |")
    print("|---|---|---|---|---|")
    costs = {variant: job_costs(base / variant) for variant in walls}
    for variant, wall in walls.items():
        table = costs[variant]
        work = table[table["kind"] != "merge"]
        print(f"| {variant} | {wall:.1f} | {len(table)} | {statistics.median(work['wall_s']):.1f} | "
              f"{table['peak_rss_mb'].max():.0f} |")
    merges = costs["sharded"][costs["sharded"]["kind"] == "merge"]
    walls_text = ", ".join(f"{t} {s:.1f} s" for t, s in zip(merges["task"], merges["wall_s"], strict=True))
    print(f"\nmerge per task: wall {walls_text}; peak RSS max {merges['peak_rss_mb'].max():.0f} MB")
    print(f"speed-up of phase 1: {walls['unsharded'] / walls['sharded']:.2f}x")
    for task in sorted(set(costs["unsharded"]["task"])):
        difference = stores_equal(base / "unsharded" / "results" / "fisher" / f"{task}.zarr",
                                  base / "sharded" / "results" / "fisher" / f"{task}.zarr")
        print(f"{task}: largest relative difference, merged vs one job: {difference:.2e}")
    print(costs["sharded"].to_string(index=False))


if __name__ == "__main__":
    main()
