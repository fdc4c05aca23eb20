"""The pair-phase benchmark script runs each of its variants (on tiny stores, not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]
PER_SAMPLE = tuple(f"model.layers.{layer}.self_attn.{m}_proj.weight" for layer in (0, 1) for m in "qkvo")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for task, seed in (("arithmetic", 1), ("code", 2), ("prose", 3)):
        make_store(root / f"{task}.zarr", n_samples=5, seed=seed, task=task, per_sample=PER_SAMPLE,
                   per_sample_dtype="float16")
    return root


@pytest.mark.parametrize("phase", ["conflicts", "qkov"])
@pytest.mark.parametrize("variant", ["floor", "ours", "all", "loop", "ours_small"])
def test_pair_phase_benchmark_variants_run(stores, phase, variant):
    command = [sys.executable, str(ROOT / "benchmarks" / "pair_phases.py"), "--worker", variant, "--phase", phase,
               "--stores", str(stores), "--threads", "1", "--loop-layers", "1", "--loop-samples", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["variant"] == variant and measured["seconds"] > 0 and measured["peak_rss_mb"] > 0
