"""How long a config mistake takes to be reported, and what reading the workflow costs.

Each measurement runs in a fresh process (imports are what is measured), `--runs` times;
the table gives medians:

- `python -m fisher_pipeline <command> --config-json '<a bad key>'` for a phase 1 command and
  a phase command of each kind: the time until the one-line error, exit status 2;
- `python -c "import torch"`: what a check would cost if it imported the numerics;
- `snakemake -n` of the default config in an empty folder: reading the workflow (every
  rule file, the config check), which Snakemake repeats for each job a cluster runs.

`--checkout DIR` measures another checkout of the package (e.g. a `git worktree` of an older
commit) with the same commands, for a before/after comparison on one machine.

    python benchmarks/config_check.py --runs 5
    python benchmarks/config_check.py --runs 5 --checkout ../before
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT

#: (what, argv after `python -m fisher_pipeline`): one bad key each.
COMMANDS = [
    ("fisher (phase 1)", ["fisher", "--config-json", '{"fisher": {"no_such_key": 1}}', "--task", "t", "--out", "x"]),
    ("masks (per task)", ["masks", "--config-json", '{"masks": {"no_such_key": 1}}', "--store", "s", "--out", "x"]),
    ("qkov (task pairs)", ["qkov", "--config-json", '{"qkov": {"no_such_key": 1}}', "--stores", "a=s", "b=t",
                           "--out", "x"]),
]


def timed(command: list[str], env: dict[str, str], cwd: Path, expect: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}, expected {expect}:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose package is measured")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as empty:
        for what, argv in COMMANDS:
            times = [timed([sys.executable, "-m", "fisher_pipeline", *argv], env, Path(empty), 2)
                     for _ in range(args.runs)]
            rows.append((f"bad config: {what}", statistics.median(times)))
        times = [timed([sys.executable, "-c", "import torch"], env, Path(empty), 0) for _ in range(args.runs)]
        rows.append(("reference: import torch", statistics.median(times)))
        snakemake = [sys.executable, "-m", "snakemake", "-n", "--quiet", "--snakefile", str(checkout / "Snakefile"),
                     "--directory", empty, "--configfile", str(checkout / "config" / "config.yaml")]
        times = [timed(snakemake, env, checkout, 0) for _ in range(args.runs)]
        rows.append(("snakemake -n, default config (reading the workflow)", statistics.median(times)))
    print(f"checkout: {checkout}; medians of {args.runs} runs, each in a fresh process\n")
    print("| what | seconds |\n|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
