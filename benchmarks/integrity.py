"""What the stores' integrity record costs: to write at close, to check at open, to check on
read, and to verify a whole store.

For each store given (default: `results/fisher/*.zarr` of a finished `make run`), medians of
`--runs` runs:

- **record**: `write_manifest` on the finished store (what `StoreWriter.close` adds before
  publishing: a CRC-32 of every file). A store written before the record existed gets one
  only with `--record` (it then becomes a checked store; nothing else in it changes);
- **open, checked**: `open_store` (the record read, every file's name and size compared
  with it, the consolidated metadata read), against **open, plain**: the same metadata read
  by `zarr.open_consolidated` on the folder, no record;
- **read, checked / plain**: every `fisher/` and `grad_mean/` array read in full through
  the checked store (each file's CRC on its first read) and through zarr's plain local
  store: what a phase that reads the statistics pays;
- **verify**: `verify_store`, every file read and its CRC compared (2 threads, the CLI's
  default).

Files are in the page cache after the first run (as they are for a phase reading a store
phase 1 just wrote); the first, cold run is not in the medians.

    python benchmarks/integrity.py results/fisher/*.zarr --runs 5
    python benchmarks/integrity.py results/fisher/*.zarr --record    # stores from before the record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import zarr
from harness import ROOT

sys.path.insert(0, str(ROOT))
from fisher_pipeline.store import open_store, verify_store  # noqa: E402
from fisher_pipeline.store.integrity import MANIFEST, read_manifest, write_manifest  # noqa: E402


def _timed(function, runs: int) -> float:
    """Median seconds of `function()` over `runs` runs, after one untimed warm-up run."""
    function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _plain_group(path: Path) -> zarr.Group:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return zarr.open_consolidated(zarr.storage.LocalStore(path, read_only=True), mode="r")


def _read_statistics(group, names: list[str]) -> None:
    for kind in ("fisher", "grad_mean"):
        for name in names:
            group[f"{kind}/{name}"][...]


def measure(path: Path, runs: int, record: bool) -> dict[str, float]:
    if read_manifest(path) is None:
        if not record:
            raise SystemExit(f"{path} has no {MANIFEST}: pass --record to give it one (a store from before the record)")
        write_manifest(path)
    manifest = read_manifest(path)
    store = open_store(path)
    names = store.param_names if store.attrs.get("elementwise_fisher", True) else []
    result = {
        "files": len(manifest),
        "gb": sum(size for size, _ in manifest.values()) / 1e9,
        "record_s": _timed(lambda: write_manifest(path), max(1, runs // 2)),
        "open_checked_ms": 1e3 * _timed(lambda: open_store(path), runs),
        "open_plain_ms": 1e3 * _timed(lambda: _plain_group(path), runs),
        # a fresh store object each run: CRCs are checked once per file per opened store
        "read_checked_s": _timed(lambda: _read_statistics(open_store(path).root, names), runs),
        "read_plain_s": _timed(lambda: _read_statistics(_plain_group(path), names), runs),
        "verify_s": _timed(lambda: verify_store(path), max(1, runs // 2)),
    }
    assert verify_store(path).ok
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="*", type=Path, help="store folders (default: results/fisher/*.zarr)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="give stores without an integrity record one")
    args = parser.parse_args()
    stores = args.stores or sorted((ROOT / "results" / "fisher").glob("*.zarr"))
    if not stores:
        raise SystemExit("no stores: run `make run` first, or name store folders")
    print("| store | files | GB | record at close s | open checked ms | open plain ms | read fisher+grad_mean "
          "checked s | plain s | verify s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in stores:
        r = measure(path, args.runs, args.record)
        print(f"| {path.name} | {r['files']:,} | {r['gb']:.2f} | {r['record_s']:.2f} | {r['open_checked_ms']:.0f} | "
              f"{r['open_plain_ms']:.0f} | {r['read_checked_s']:.2f} | {r['read_plain_s']:.2f} | {r['verify_s']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
