"""Phase 1 with `model.dtype: bfloat16` (or float16) against float32, on the bundled SmolLM2.

Each run is a fresh process (its own peak RSS) running `run_fisher` on one built-in task
with the default config's phase 1 settings; `--runs` runs per dtype, alternating, medians:

- seconds for the whole job (model load, phase 1, store written), and per sample;
- peak RSS;
- agreement with the float32 store of the same run: the largest relative error over
  parameters of each tensor's Fisher sum, of the elementwise Fisher (L1), and of the
  head / neuron group sums (as `tests/test_dtype.py` measures on tiny models).

    python benchmarks/dtype.py --runs 3
    python benchmarks/dtype.py --runs 3 --dtypes float32 bfloat16 float16 --samples 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import ROOT, peak_rss_mb, run_worker

sys.path.insert(0, str(ROOT))


DEFAULT_CONFIG = ROOT / "config" / "config.yaml"


def _config(dtype: str, samples: int, configfile: Path = DEFAULT_CONFIG):
    import yaml

    from fisher_pipeline.config import PipelineConfig

    raw = yaml.safe_load(Path(configfile).read_text())
    raw["model"] = {**(raw.get("model") or {}), "dtype": dtype}
    raw["tasks"] = {"prose": {**raw["tasks"]["prose"], "n_samples": samples}}
    return PipelineConfig.from_dict(raw)


def worker(dtype: str, samples: int, out: Path, configfile: Path = DEFAULT_CONFIG) -> None:
    from fisher_pipeline.fisher import run_fisher

    started = time.perf_counter()
    run_fisher(_config(dtype, samples, configfile), "prose", out, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"dtype": dtype, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def agreement(reference: Path, other: Path) -> dict[str, float]:
    from fisher_pipeline.store import open_store

    a_store, b_store = open_store(reference), open_store(other)
    tensor, elementwise, group = [], [], []
    for name in a_store.param_names:
        a, b = a_store.fisher(name).astype(np.float64), b_store.fisher(name).astype(np.float64)
        tensor.append(abs(b.sum() - a.sum()) / a.sum())
        elementwise.append(np.abs(b - a).sum() / np.abs(a).sum())
        ga, gb = a_store.group_fisher(name).astype(np.float64), b_store.group_fisher(name).astype(np.float64)
        group.append(np.abs(gb - ga).max() / np.abs(ga).max())
    return {"tensor": max(tensor), "elementwise": max(elementwise), "group": max(group)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--configfile", type=Path, default=DEFAULT_CONFIG,
                        help="the config whose model and task `prose` are run (default: the default run's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.out, args.configfile)
        return
    results: dict[str, list[dict]] = {dtype: [] for dtype in args.dtypes}
    with tempfile.TemporaryDirectory(dir=ROOT / "results" if (ROOT / "results").is_dir() else None) as folder:
        for run in range(args.runs):
            for dtype in args.dtypes:
                out = Path(folder) / f"{dtype}-{run}.zarr"
                results[dtype].append(run_worker(__file__, ["--worker", dtype, "--samples", str(args.samples),
                                                            "--out", str(out), "--configfile", str(args.configfile)]))
        reference = Path(folder) / f"{args.dtypes[0]}-0.zarr"
        print(f"| model.dtype | s per job | s per sample | peak RSS MB | vs {args.dtypes[0]}: tensor sum | "
              "elementwise L1 | group sums |")
        print("|---|---|---|---|---|---|---|")
        for dtype in args.dtypes:
            seconds = statistics.median(r["seconds"] for r in results[dtype])
            rss = statistics.median(r["peak_rss_mb"] for r in results[dtype])
            errors = agreement(reference, Path(folder) / f"{dtype}-0.zarr")
            print(f"| {dtype} | {seconds:.1f} | {seconds / args.samples:.2f} | {rss:.0f} | {errors['tensor']:.2%} | "
                  f"{errors['elementwise']:.2%} | {errors['group']:.2%} |", flush=True)


if __name__ == "__main__":
    main()
