"""The planner's phase 1 host memory against the measured peak RSS of real phase 1 runs.

    .venv/bin/python benchmarks/planner_check.py                 # 3 variants of the default config, ~5 min
    .venv/bin/python benchmarks/planner_check.py --variants default

Each variant is the default config (`config/config.yaml`: SmolLM2-135M, T <= 128) with a few
`fisher` keys changed; phase 1 of one task (`arithmetic`, 32 samples) runs as its own
process (`python -m fisher_pipeline fisher`, as the workflow runs it, on the CPU with 2
threads), and its peak resident set size is read from the kernel when it exits
(`os.wait4`). The prediction is `fisher_pipeline.planner`'s for the same config, made
without loading the weights. Memory only: nothing is timed. Results are also written to
`benchmarks/results/planner_check.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "arithmetic"
#: Variant -> `fisher` keys changed from config/config.yaml.
VARIANTS: dict[str, dict] = {
    "default": {},
    "batch 4": {"batch_size": 4},
    "layers [0, -1] stored": {"per_sample_layers": [0, -1]},
}


def variant_config(changes: dict) -> dict:
    """The default config with `changes` in its `fisher` section and an absolute model path."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["fisher"] = {**config.get("fisher", {}), **changes}
    model = config["model"]["path"]
    if not Path(model).is_absolute():
        config["model"]["path"] = str(ROOT / model)
    return config


def measure(config: dict, threads: int) -> int:
    """Peak RSS in bytes of phase 1 of `TASK` under `config`, as its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "fisher_pipeline", "fisher", "--config-json", json.dumps(config),
                   "--task", TASK, "--out", str(Path(tmp) / f"{TASK}.zarr"), "--threads", str(threads),
                   "--quiet"]
        log = Path(tmp) / "phase1.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env={**os.environ, "TQDM_DISABLE": "1"})
            _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"phase 1 failed: {log.read_text()[-3000:]}")
        return usage.ru_maxrss * 1024  # kB on Linux


def predict(config: dict) -> int:
    """The planner's host bytes of the variant's phase 1 job."""
    from fisher_pipeline.config import PipelineConfig
    from fisher_pipeline.planner import plan_run

    return plan_run(PipelineConfig.from_dict(config)).job("fisher").host


#: Qwen2.5-Math-1.5B's shapes: Qwen2.5-1.5B's (its published config.json differs in context, 4096, and
#: names bfloat16 weights).
QWEN_MATH = {**__import__("fisher_pipeline.planner", fromlist=["x"]).PUBLISHED_CONFIGS["Qwen2.5-1.5B"],
             "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def qwen_math_plan(n_samples: int, device: str, fisher: dict | None = None) -> str:
    """The planner's output for the default config on a Qwen2.5-Math-1.5B-shaped model, `n_samples` per task."""
    from fisher_pipeline.config import PipelineConfig
    from fisher_pipeline.planner import Machine, model_shape, plan_run, render_plan

    raw = variant_config({"device": device, **(fisher or {})})
    for task in raw["tasks"].values():
        task["n_samples"] = n_samples
    config = PipelineConfig.from_dict(raw)
    shape = model_shape(QWEN_MATH, config.fisher, "Qwen2.5-Math-1.5B (shapes)")
    machine = Machine(host=int(256e9), device=int(80e9)) if device == "cuda" else Machine(host=int(24e9))
    return render_plan(config, plan_run(config, shape), machine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the phase 1 job")
    parser.add_argument("--qwen-math", type=int, metavar="N",
                        help="print only the plan of a Qwen2.5-Math-1.5B-shaped model at N samples per task (on a "
                             "GPU with 80 GB beside 256 GB host memory, and on a 24 GB CPU machine)")
    parser.add_argument("--predict-only", action="store_true",
                        help="the predictions beside the last recorded measurements (run no phase 1)")
    args = parser.parse_args(argv)
    if args.qwen_math:
        for device in ("cuda", "cpu"):
            print(f"fisher.device: {device}\n\n{qwen_math_plan(args.qwen_math, device)}\n")
        return
    record = ROOT / "benchmarks" / "results" / "planner_check.json"
    previous = json.loads(record.read_text()) if record.is_file() else {}
    measured = {name: previous.get("variants", {}).get(name, {}).get("measured") for name in args.variants}
    if not args.predict_only:
        for name in args.variants:
            measured[name] = measure(variant_config(VARIANTS[name]), args.threads)
            print(f"{name}: peak RSS {measured[name] / 1e9:.2f} GB", file=sys.stderr)
    rows = {name: {"fisher": VARIANTS[name], "measured": measured[name],
                   "predicted": predict(variant_config(VARIANTS[name]))} for name in args.variants}
    print(f"phase 1 of task {TASK!r}, {platform.machine()}, {os.cpu_count()} cores, CPU only, "
          f"{args.threads} threads\n")
    print("| variant | predicted host memory | measured peak RSS | predicted / measured |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        measured = row["measured"]
        ratio = f"{row['predicted'] / measured:.2f}" if measured else "-"
        shown = f"{measured / 1e9:.2f} GB" if measured else "not measured"
        print(f"| {name} | {row['predicted'] / 1e9:.2f} GB | {shown} | {ratio} |")
    if all(row["measured"] for row in rows.values()):
        record.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                                      "threads": args.threads, "task": TASK,
                                      "variants": {**previous.get("variants", {}), **rows}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
