"""Phase 1 end to end on a tiny saved model: store contract, atomicity, determinism, bad inputs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fisher_pipeline.atomic import staging_siblings
from fisher_pipeline.config import ModelConfig, PipelineConfig
from fisher_pipeline.data import load_task
from fisher_pipeline.errors import DiskFullError, ModelLoadError, StoreFormatError, StoreMismatchError
from fisher_pipeline.fisher import compute_fisher, run_fisher
from fisher_pipeline.models.adapters import adapter_for
from fisher_pipeline.models.loading import load_model
from fisher_pipeline.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def make_config(model_dir, **fisher) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {
            "prose": {"source": "builtin:prose", "n_samples": 10, "max_length": 24},
            "arithmetic": {"source": "builtin:arithmetic", "n_samples": 300, "max_length": 48},
        },
        "fisher": {"batch_size": 4, "per_sample_params": r"self_attn\.(q|o)_proj\.weight$", **fisher},
    })


def test_store_contract_and_reader(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir("llama"), per_sample_dtype="float32")
    path = run_fisher(config, "prose", tmp_path / "prose.zarr", progress=False)
    store = open_store(path)
    attrs = store.attrs
    for key in ("format_version", "model_id", "weights_hash", "task", "n_samples", "loss_convention",
                "fisher_kind", "config_hash", "package_version"):
        assert key in attrs, key
    assert attrs["loss_convention"] == "token_sum" and attrs["task"] == "prose"
    assert store.n_samples == len(store.sample_ids) == 10
    assert len(set(store.sample_ids)) == 10 and all(i.startswith("prose:") for i in store.sample_ids)
    assert (store.n_tokens > 0).all() and np.isfinite(store.losses).all()
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = sorted(n for n in store.param_names if n.endswith(("q_proj.weight", "o_proj.weight")))
    assert store.per_sample_names == expected
    # Fisher of a per-sample parameter is the mean of its stored per-sample squares.
    np.testing.assert_allclose(store.contributions(name).mean(0), store.fisher(name), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(store.per_sample(name).mean(0), store.grad_mean(name), rtol=1e-4, atol=1e-9)
    # Samples by id, in the order asked; head slices narrow exactly the sliced dim.
    ids = [store.sample_ids[3], store.sample_ids[0]]
    np.testing.assert_array_equal(store.per_sample(name, ids), store.per_sample(name)[[3, 0]])
    model = load_model(config.model).model
    head_slice = adapter_for(model).head_slices(1, "q", 2)[0]
    expected = store.per_sample(name, ids)[:, head_slice.index.numpy()]
    np.testing.assert_array_equal(store.per_sample_slice(head_slice, ids), expected)
    # Group statistics: sums of the elementwise Fisher; standard errors finite.
    spec = store.group_spec(name)
    group_sum = spec.reduce(torch.from_numpy(store.fisher(name))[None].double())[0].numpy()
    np.testing.assert_allclose(store.group_fisher(name), group_sum, rtol=1e-5)
    assert np.isfinite(store.group_se(name)).all() and np.isfinite(store.fisher_se(name)).all()
    assert store.group_sizes(name).sum() == store.fisher(name).size
    with pytest.raises(KeyError, match="not in store"):
        store.per_sample(name, ["no-such-id"])


def test_two_runs_give_identical_stores(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir("llama"), labels="sampled")
    first = open_store(run_fisher(config, "prose", tmp_path / "a.zarr", progress=False))
    second = open_store(run_fisher(config, "prose", tmp_path / "b.zarr", progress=False))
    assert first.attrs == second.attrs
    keys = sorted(k for k, _ in first.root.arrays()) + [f"{g}/{a}" for g, grp in first.root.groups()
                                                         for a, _ in grp.arrays()]
    assert len(keys) > 20
    for key in keys:
        np.testing.assert_array_equal(first.root[key][...], second.root[key][...], err_msg=key)


def test_store_mismatch_and_missing_store_are_clear(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir("llama"))
    path = run_fisher(config, "prose", tmp_path / "prose.zarr", progress=False)
    store = open_store(path)
    open_store(path, weights_hash=store.attrs["weights_hash"], config_hash=store.attrs["config_hash"], task="prose")
    with pytest.raises(StoreMismatchError, match="weights_hash.*another model or config"):
        open_store(path, weights_hash="0123456789abcdef")
    with pytest.raises(StoreMismatchError, match="config_hash"):
        open_store(path, config_hash="feedfacefeedface")
    with pytest.raises(StoreFormatError, match="no Fisher store"):
        open_store(tmp_path / "missing.zarr")


def _phase1_command(tiny_model_dir, tmp_path):
    """A phase 1 CLI command (long enough to be killed mid-run) writing to the `out` given."""
    import yaml

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir("llama"))},
        # batch 1: the first per-sample shard file is on disk after one sample, and the kill
        # comes then; 80 samples leave the run going long after it
        "tasks": {"arithmetic": {"source": "builtin:arithmetic", "n_samples": 80, "max_length": 48}},
        "fisher": {"batch_size": 1, "engine": "loop", "per_sample_params": r"\.weight$"},
    }))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "fisher_pipeline", "fisher", "--config", str(config_file),
                "--task", "arithmetic", "--out", str(out), "--threads", "1"]

    return config_file, command


def _shard_files(out: Path) -> list[Path]:
    """Per-sample shard files (data, not just directories) in the staging directories of `out`."""
    return [p for staging in staging_siblings(out) for p in staging.glob("per_sample/*/c/**/*")
            if p.is_file() and p.stat().st_size > 0]


def _kill_while_writing(cmd: list[str], out: Path) -> list[Path]:
    """Start `cmd`, SIGKILL it once per-sample data is on disk; the shard files there at the kill."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not _shard_files(out) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = _shard_files(out)
    assert shards, "the run was killed before it wrote any per-sample data"
    return shards


def _store_contents(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A store's attrs and every array its metadata lists, read in full."""
    store = open_store(path)
    arrays = {key: array[...] for key, array in store.root.members(max_depth=None) if isinstance(array, zarr.Array)}
    return store.attrs, arrays


def _assert_same_store(path: Path, expected: tuple[dict, dict[str, np.ndarray]]) -> None:
    attrs, arrays = _store_contents(path)
    assert attrs == expected[0]
    assert sorted(arrays) == sorted(expected[1]) and len(arrays) > 20
    for key, values in expected[1].items():
        np.testing.assert_array_equal(arrays[key], values, err_msg=key)


def test_killed_run_leaves_no_finished_store_and_rerun_completes(tiny_model_dir, tmp_path):
    import yaml

    config_file, command = _phase1_command(tiny_model_dir, tmp_path)
    out = tmp_path / "arithmetic.zarr"
    _kill_while_writing(command(out), out)
    assert not out.exists(), "a killed run left a finished-looking store"
    with pytest.raises(StoreFormatError, match="interrupted"):
        open_store(out)
    subprocess.run(command(out) + ["--quiet"], cwd=ROOT, check=True, capture_output=True)
    clean = tmp_path / "clean.zarr"  # the same config, never interrupted
    subprocess.run(command(clean) + ["--quiet"], cwd=ROOT, check=True, capture_output=True)
    _assert_same_store(out, _store_contents(clean))
    config = PipelineConfig.from_dict(yaml.safe_load(config_file.read_text()))
    expected = load_task(config.tasks["arithmetic"], load_model(config.model).tokenizer)
    assert open_store(out).sample_ids == [s.id for s in expected]
    assert sorted(os.listdir(tmp_path)) == ["arithmetic.zarr", "clean.zarr", "config.yaml"]  # no .partial / .old


def test_killed_rerun_keeps_the_old_store(tiny_model_dir, tmp_path):
    _, command = _phase1_command(tiny_model_dir, tmp_path)
    out = tmp_path / "arithmetic.zarr"
    subprocess.run(command(out) + ["--quiet"], cwd=ROOT, check=True, capture_output=True)
    before = _store_contents(out)
    _kill_while_writing(command(out), out)
    _assert_same_store(out, before)  # the complete old store, intact and readable
    assert staging_siblings(out)  # the killed run's own work, removed by the next run


def test_failure_while_closing_leaves_no_partial_store(tiny_model_dir, tmp_path, monkeypatch):
    """A disk that fills while the store closes (here: the metadata write fails) leaves no
    staging behind and the path as it was (absent), and the error names the path, the free
    space and the size needed. (`tests/test_faults.py` fills a real filesystem.)"""
    import errno

    import yaml

    import fisher_pipeline.store.writer

    config_file, _ = _phase1_command(tiny_model_dir, tmp_path)
    config = PipelineConfig.from_dict(yaml.safe_load(config_file.read_text()))

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fisher_pipeline.store.writer, "consolidate", full_disk)
    out = tmp_path / "arithmetic.zarr"
    with pytest.raises(DiskFullError, match=rf"no space left on device writing {re.escape(str(out))} \(.* free of "
                                            r".* on the filesystem of .*; .* had been written; the output needs "
                                            r"about .*\): nothing was published and its staging was removed"):
        run_fisher(config, "arithmetic", out, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no store, no .partial


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; backward makes the gradient of batch rows `rows` NaN."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.rows = rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.rows] = float("nan")
        return grad, None


@pytest.mark.parametrize("flags, fold_kernel", [("host", "auto"), ("host", "torch"), ("device", "torch")])
def test_non_finite_samples_are_skipped_and_recorded(tiny_model_dir, monkeypatch, flags, fold_kernel):
    """A sample with a non-finite gradient leaves no trace. `host`: the CPU's check, with the
    compiled fold (non-finite rows left out row by row) or torch's (chunk by chunk);
    `device`: the GPU's way (a device-side flag, zeros folded once it trips), on the CPU."""
    from fisher_pipeline import accumulate
    from test_engine import random_samples

    monkeypatch.setattr(accumulate, "device_side_flags", lambda device: flags == "device")

    loaded = load_model(ModelConfig(path=str(tiny_model_dir("llama")), attn_implementation="eager"))
    model, adapter = loaded.model, adapter_for(loaded.model)
    samples = random_samples(8, seed=4)
    bad_loss, bad_grad = 250, 251  # marker tokens (random_samples draws ids < 128)
    samples[2].input_ids[3] = bad_loss
    samples[5].input_ids[4] = bad_grad

    def poison(module, args, output):
        ids = poison.ids
        loss_rows = (ids == bad_loss).any(1)
        output = torch.where(loss_rows[:, None, None], torch.full_like(output, float("nan")), output)
        return _PoisonGradient.apply(output, (ids == bad_grad).any(1))

    def record_ids(module, args, kwargs):
        poison.ids = kwargs["input_ids"]

    handles = [model.register_forward_pre_hook(record_ids, with_kwargs=True),
               model.model.layers[1].mlp.register_forward_hook(poison)]
    from fisher_pipeline.config import FisherConfig

    result = compute_fisher(model, adapter, samples, FisherConfig(batch_size=4, fold_kernel=fold_kernel), pad_id=0)
    for handle in handles:
        handle.remove()
    reasons = dict(result.skipped)
    assert set(reasons) == {samples[2].id, samples[5].id}
    assert reasons[samples[2].id] == "non-finite loss"
    assert reasons[samples[5].id].startswith("non-finite gradient in ")
    clean = [s for k, s in enumerate(samples) if k not in (2, 5)]
    reference = compute_fisher(model, adapter, clean, FisherConfig(batch_size=4), pad_id=0).accumulator
    assert result.accumulator.count == reference.count == 6
    # The poisoned sample's batch had folded the chunks of every parameter that backward
    # reached before layer 1's MLP; they were taken back out exactly (M2 included).
    ours = result.accumulator
    assert any(ours.fisher[name].m2 is not None for name in reference.shapes)
    for name in reference.shapes:
        for state in ("fisher", "grad", "group", "saliency"):
            mine, theirs = getattr(ours, state)[name], getattr(reference, state)[name]
            # batched differently (3 + 3 vs 4 + 2 samples): float32 sums within a batch round
            # differently, which a signed mean near 0 shows relative to its scale only
            scale = theirs.mean.abs().max().item()
            torch.testing.assert_close(mine.mean, theirs.mean, rtol=1e-5, atol=1e-6 * scale + 1e-30)
            if theirs.m2 is not None:
                torch.testing.assert_close(mine.m2, theirs.m2, rtol=1e-5, atol=1e-6 * theirs.m2.abs().max().item())
    assert set(ours.input_sq) == set(reference.input_sq) and ours.input_sq
    for name, theirs in reference.input_sq.items():  # the skipped samples' inputs left no trace either
        assert ours.input_sq[name].count == theirs.count
        torch.testing.assert_close(ours.input_sq[name].mean, theirs.mean, rtol=1e-6, atol=0)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist \(config key model.path\)"):
        load_model(ModelConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="Pickled weights"):
        load_model(ModelConfig(path=str(tmp_path / "pickled")))


@pytest.mark.parametrize("slice_elements", [None, 7])
def test_statistics_files_are_the_arrays_zarr_would_write(tmp_path, monkeypatch, slice_elements):
    """The statistics' `zarr.json` and chunk files are written directly (not through zarr's
    API, for speed): each must equal what zarr itself writes, and hold the right numbers,
    also when each array is converted and written in many slices (7 elements, not a
    divisor of any shape: every array ends with a short slice)."""
    from store_factory import llama_layout, make_store

    if slice_elements is not None:
        monkeypatch.setattr("fisher_pipeline.store.writer._STATISTICS_SLICE", slice_elements)

    names = sorted(llama_layout()[0])[:6]
    path = make_store(tmp_path / "s.zarr", n_samples=5, seed=3, per_sample=tuple(names))
    store = open_store(path)
    for name in names:
        g = store.per_sample(name).astype(np.float64)
        expected = {"fisher": (g**2).mean(0), "grad_mean": g.mean(0)}
        for kind in ("fisher", "grad_mean", "group", "group_m2"):
            data = store.array(kind, name)[...]
            if kind in expected:
                np.testing.assert_allclose(data, expected[kind], rtol=1e-5, atol=1e-7)
            reference = zarr.create_array(tmp_path / "ref" / kind / name, data=data, compressors=None,
                                          chunks=data.shape)
            assert (path / kind / name / "zarr.json").read_bytes() == \
                (tmp_path / "ref" / kind / name / "zarr.json").read_bytes()
            np.testing.assert_array_equal(zarr.open_array(path / kind / name)[...], reference[...])
    # the consolidated metadata, computed in memory, is the one zarr computes on the folder
    import shutil
    import warnings

    copy = shutil.copytree(path, tmp_path / "copy.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(copy)
    assert (copy / "zarr.json").read_bytes() == (path / "zarr.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_per_sample_shards_are_the_files_zarr_would_write(tmp_path, dtype):
    """Whole-shard micro-batches are written as shard files directly (not through zarr's
    API): each file must equal zarr's own for the same rows, byte for byte, including a
    last shard with fewer rows; a micro-batch straddling shards goes through zarr."""
    from fisher_pipeline.store.rows import SampleRows, _direct_shard_rows

    rng = np.random.default_rng(5)
    shapes = {"w": (6, 5), "b": (7,)}
    data = {name: (rng.standard_normal((11, *shape)) + 3).astype(dtype) for name, shape in shapes.items()}

    def arrays(root):
        return {name: root.create_array(f"per_sample/{name}", shape=(11, *shape), chunks=(1, *shape),
                                        shards=(4, *shape), dtype=dtype, compressors=None, fill_value=0)
                for name, shape in shapes.items()}

    ours_root = zarr.open_group(tmp_path / "ours.zarr", mode="w")
    ours_arrays = arrays(ours_root)
    assert all(_direct_shard_rows(array) == 4 for array in ours_arrays.values())  # the direct path is taken
    rows = SampleRows(ours_arrays, dtype, tmp_path / "ours.zarr")
    for start, stop in ((0, 4), (4, 8), (8, 11)):  # whole shards, then a short last one
        rows.append([f"s{k}" for k in range(start, stop)], torch.ones(stop - start), torch.ones(stop - start),
                    {name: torch.from_numpy(x[start:stop]) for name, x in data.items()})
    assert rows.finish(ours_root) == 11
    zarr_root = zarr.open_group(tmp_path / "zarr.zarr", mode="w")
    for name, array in arrays(zarr_root).items():
        array[...] = data[name]
    for name in shapes:
        files = sorted(p.relative_to(tmp_path / "ours.zarr" / "per_sample" / name)
                       for p in (tmp_path / "ours.zarr" / "per_sample" / name).rglob("c/**/*") if p.is_file())
        assert len(files) == 3
        for file in files:
            assert (tmp_path / "ours.zarr" / "per_sample" / name / file).read_bytes() == \
                (tmp_path / "zarr.zarr" / "per_sample" / name / file).read_bytes(), f"{name} {file}"
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "ours.zarr")["per_sample"][name][...], data[name])
    # rows 0-2, then 3-6: the second straddles two shards and goes through zarr
    mixed_root = zarr.open_group(tmp_path / "mixed.zarr", mode="w")
    mixed = SampleRows(arrays(mixed_root), dtype, tmp_path / "mixed.zarr")
    for start, stop in ((0, 3), (3, 7)):
        mixed.append(["x"] * (stop - start), torch.ones(stop - start), torch.ones(stop - start),
                     {name: torch.from_numpy(x[start:stop]) for name, x in data.items()})
    mixed.finish(mixed_root)
    for name in shapes:
        np.testing.assert_array_equal(zarr.open_group(tmp_path / "mixed.zarr")["per_sample"][name][...],
                                      data[name][:7])
