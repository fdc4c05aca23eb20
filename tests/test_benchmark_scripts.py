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
@pytest.mark.parametrize("variant", ["floor", "product", "ours", "all", "loop", "ours_small"])
def test_pair_phase_benchmark_variants_run(stores, phase, variant):
    command = [sys.executable, str(ROOT / "benchmarks" / "pair_phases.py"), "--worker", variant, "--phase", phase,
               "--stores", str(stores), "--threads", "1", "--loop-layers", "1", "--loop-samples", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["variant"] == variant and measured["seconds"] > 0 and measured["peak_rss_mb"] > 0


def test_pair_phase_sweep_writes_synthetic_stores_and_times_every_variant(tmp_path):
    """The N sweep at N = 3: synthetic stores of SmolLM2's attention shape through our writer (complete,
    verified), then one row per variant and compute dtype, before / after included (the baseline is this
    checkout)."""
    from fisher_pipeline.store import open_store, verify_store

    command = [sys.executable, str(ROOT / "benchmarks" / "pair_phases.py"), "--sweep", "3", "--repeats", "1",
               "--threads", "1", "--sweep-dir", str(tmp_path), "--baseline", str(ROOT),
               "--compute-dtypes", "float32,bfloat16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 3 |")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "floor (read)", "one product per cell (read, convert, bmm)", "conflicts", "qkov",
        "one product per cell (read, convert, bmm), bfloat16", "conflicts, bfloat16", "qkov, bfloat16",
        "conflicts before", "qkov before"]
    for task in ("alpha", "beta"):
        store = open_store(tmp_path / "n3" / f"{task}.zarr")
        assert store.n_samples == 3 and len(store.per_sample_names) == 12  # 3 layers x Q/K/V/O
        assert store.geometry[store.per_sample_names[0]].shape in {(576, 576), (192, 576)}
        assert verify_store(store.path).ok


def test_qkov_interval_benchmark_runs(stores):
    command = [sys.executable, str(ROOT / "benchmarks" / "qkov_interval.py"), "--stores", str(stores),
               "--n-bootstrap", "50"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "arithmetic -> code: 24 cells, N = 5 x 5, 50 draws" in result.stdout
    assert "width ratio (first order / full): median" in result.stdout


def test_pair_dtypes_benchmark_runs(stores):
    command = [sys.executable, str(ROOT / "benchmarks" / "pair_dtypes.py"), "--stores", str(stores), "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:3] for line in result.stdout.splitlines() if line.startswith("| conflicts")
            or line.startswith("| qkov")]
    assert [(phase.strip(), dtype.strip()) for phase, dtype in rows] == [
        (phase, dtype) for phase in ("conflicts", "qkov") for dtype in ("float64", "float32", "bfloat16")]


def test_peak_rss_is_the_workers_own():
    """A worker started by a parent that once held ~400 MB reports its own peak, not the
    parent's (`ru_maxrss` survives `execve`; `harness.peak_rss_mb` reads `VmHWM`)."""
    parent = ("import subprocess, sys; block = bytearray(400 << 20); block[::4096] = b'x' * len(block[::4096]); "
              "del block; print(subprocess.run([sys.executable, '-c', 'import harness; print(harness.peak_rss_mb())'], "
              "capture_output=True, text=True, check=True).stdout)")
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120,
                            cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 200, result.stdout


def _phase1_script():
    """benchmarks/phase1.py as a module (its helpers are what the benchmark runs)."""
    import importlib.util

    if str(ROOT / "benchmarks") not in sys.path:  # as when the script runs: its folder first
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("phase1_benchmark", ROOT / "benchmarks" / "phase1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_opacus_per_sample_gradients_equal_hooks_engine():
    """Opacus's per-sample gradients (the phase 1 benchmark's `opacus` variant) equal our hooks
    engine's for every parameter of a tiny Llama with tied embeddings, on a right-padded batch
    with unlabelled prefixes; the variant's g^2 fold equals the loop variant's."""
    import torch

    from fisher_pipeline.data import TokenizedSample
    from fisher_pipeline.engine.loss import collate
    from tiny_models import VOCAB, build_tiny

    phase1 = _phase1_script()
    model = build_tiny("llama")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(5)
    samples = []
    for k, length in enumerate((11, 17, 6)):
        mask = torch.ones(length, dtype=torch.bool)
        mask[: 1 + 2 * k] = False
        samples.append(TokenizedSample(f"o{k}", torch.randint(0, VOCAB, (length,), generator=gen), mask))
    batch = collate(samples, pad_id=0)

    errors = phase1.opacus_vs_hooks(model, batch)
    assert set(errors) == set(dict(model.named_parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: Opacus vs hooks, max relative difference {errors[worst]:.2e}"
    assert not model.training and not any(hasattr(p, "grad_sample") for p in model.parameters())

    folded: dict[str, torch.Tensor] = {}
    phase1._opacus(model, [batch], folded)
    looped: dict[str, torch.Tensor] = {}
    phase1._loop(model, [batch], looped)  # the benchmark's batch-1 variant: sum_i g_i^2 by plain autograd
    assert set(folded) == set(looped)
    for name, value in folded.items():
        err = float((value - looped[name].double()).abs().max() / looped[name].abs().max())
        assert value.dtype == torch.float64 and err <= 1e-5, f"{name}: opacus vs loop sum of g^2, {err:.2e}"


def test_phase1_benchmark_opacus_variant_runs():
    command = [sys.executable, str(ROOT / "benchmarks" / "phase1.py"), "--worker", "opacus", "--model", "small",
               "--batch", "2", "--n", "2", "--length", "16", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["variant"] == "opacus" and measured["sec_per_sample"] > 0 and measured["peak_rss_mb"] > 0


@pytest.mark.workflow
def test_sharding_benchmark_runs_and_merged_stores_equal_one_job(tiny_model_dir, tmp_path):
    """benchmarks/sharding.py on a tiny config: both variants run, and the merged stores it
    compares equal the one-job stores (to float32 rounding)."""
    import re

    import yaml

    config = {"model": {"path": str(tiny_model_dir("llama"))},
              "tasks": {task: {"source": f"builtin:{task}", "n_samples": 3, "max_length": 16}
                        for task in ("code", "prose")},
              "fisher": {"batch_size": 2, "per_sample_params": "attention", "fisher_m2_params": ""}}
    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(ROOT / "benchmarks" / "sharding.py"), "--configfile", str(configfile),
               "--shards", "2", "--cores", "2", "--keep", str(tmp_path / "runs")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"speed-up of phase 1: [0-9.]+x", result.stdout), result.stdout
    differences = [float(x) for x in re.findall(r"largest relative difference, merged vs one job: (\S+)",
                                                 result.stdout)]
    assert len(differences) == 2 and max(differences) < 1e-5, result.stdout
    assert (tmp_path / "runs" / "sharded" / "logs" / "benchmarks" / "fisher" / "code.merge.tsv").exists()


@pytest.mark.parametrize("variant", ["floor", "loop", "ours"])
def test_phase1_benchmark_variants_run(variant):
    command = [sys.executable, str(ROOT / "benchmarks" / "phase1.py"), "--worker", variant, "--model", "small",
               "--batch", "2", "--n", "4", "--length", "16", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["variant"] == variant and measured["sec_per_sample"] > 0 and measured["peak_rss_mb"] > 0


def test_phase1_benchmark_traces_rss_per_micro_batch():
    """The RSS-scaling worker reports one sampled peak per committed micro-batch."""
    command = [sys.executable, str(ROOT / "benchmarks" / "phase1.py"), "--worker", "ours", "--model", "small",
               "--batch", "2", "--n", "6", "--length", "16", "--threads", "1", "--trace-rss"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peaks = measured["batch_peak_rss_mb"]
    assert len(peaks) == 3 and all(0 < peak <= measured["peak_rss_mb"] for peak in peaks), measured


def test_phase1_benchmark_fixed_cost_table():
    command = [sys.executable, str(ROOT / "benchmarks" / "phase1.py"), "--fixed-cost", "--model", "small",
               "--repeats", "1", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["state", "writer", "close", "total"]


def test_config_check_benchmark_runs():
    """benchmarks/config_check.py measures each of its rows (one run each, not timed here)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "config_check.py"), "--runs", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) == 5 and all(float(row.split("|")[2]) > 0 for row in rows)


def test_integrity_benchmark_runs(tmp_path):
    """benchmarks/integrity.py measures a store with a record, and gives one to a store without (--record)."""
    recorded = make_store(tmp_path / "prose.zarr", n_samples=3, task="prose")
    older = make_store(tmp_path / "code.zarr", n_samples=3, task="code")
    (older / "integrity.json").unlink()
    script = [sys.executable, str(ROOT / "benchmarks" / "integrity.py"), "--runs", "1"]
    refused = subprocess.run([*script, str(older)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "pass --record" in refused.stderr
    result = subprocess.run([*script, "--record", str(recorded), str(older)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and ".zarr" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| prose.zarr", "| code.zarr"]
    assert (older / "integrity.json").exists()


def test_dtype_benchmark_runs(tiny_model_dir, tmp_path):
    """benchmarks/dtype.py on a tiny config: a table row per dtype, bfloat16 within the rounding bound."""
    import yaml

    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir("llama"))},
        "tasks": {"prose": {"source": "builtin:prose", "max_length": 24}},
        "fisher": {"batch_size": 2, "per_sample_params": "attention"}}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dtype.py"), "--runs", "1", "--samples", "4",
                             "--configfile", str(configfile)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert rows["| float32"][4:] == ["0.00%", "0.00%", "0.00% |"], rows
    assert 0 < float(rows["| bfloat16"][5].rstrip("%")) < 100 * 8 * 2.0**-8, rows
