"""Sharded phase 1: shard jobs, partial stores and their merge give the one-job store.

A tiny Llama runs phase 1 on one task as one job and as K x P shard jobs; the merged
store must equal the one-job store to float rounding on every array and attribute,
including samples skipped for a non-finite loss or gradient (two planted ones). Merging
is independent of the order shards are given or finished in, refuses incomplete or
mixed sets of shards naming the shard and the fix, and the workflow runs sharded jobs
that resume after a failure without redoing finished shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

import fisher_pipeline.fisher as fisher_module
from fisher_pipeline.__main__ import main
from fisher_pipeline.atomic import staging_siblings
from fisher_pipeline.config import HELDOUT_KEYS, STORE_INVARIANT_KEYS, PipelineConfig, config_hash
from fisher_pipeline.data import TokenizedSample
from fisher_pipeline.errors import ConfigError, StoreFormatError, StoreMismatchError
from fisher_pipeline.fisher import phase1_config_hash, run_fisher, run_fisher_shard
from fisher_pipeline.layout import AttentionGeometry, GroupSpec, ModelGeometry, ParamGeometry
from fisher_pipeline.shard_plan import check_sample_shards, param_shares, shard_name, shard_ranges, share_weight
from fisher_pipeline.shards import merge_shards, merged_statistics, open_shards
from fisher_pipeline.store import open_store
from fisher_pipeline.store.integrity import write_manifest
from test_phase1 import _PoisonGradient
from test_workflow_phases import planned_jobs, snakemake, write_config

TASK = "prose"
N_SAMPLES = 7
LOSS_ROW, GRAD_ROW = 1, 4  # task positions of the samples made non-finite (loss, gradient)
GRIDS = [(2, 1), (3, 1), (1, 2), (2, 2)]  # (sample shards K, parameter shares P)


def make_config(model_dir, **fisher) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {TASK: {"source": "builtin:prose", "n_samples": N_SAMPLES, "max_length": 24},
                  "other": {"source": "builtin:code", "n_samples": 5, "max_length": 24}},
        "fisher": {"batch_size": 2, "per_sample_dtype": "float32", **fisher},
    })


# --- two samples made non-finite, the same way in every job ---------------------------------------
@contextlib.contextmanager
def poisoned_samples():
    """Phase 1 with task sample LOSS_ROW giving a NaN loss and GRAD_ROW a NaN gradient.

    Each is marked by a token id no sample uses; a hook on layer 1's MLP turns the
    marked rows' output (loss) or gradient NaN, whatever batch or shard they are in.
    """
    real_load_model, real_load_task = fisher_module.load_model, fisher_module.load_task
    markers: dict[str, int] = {}

    def load_task(task, tokenizer):
        samples = real_load_task(task, tokenizer)
        used = set(torch.cat([s.input_ids for s in samples]).tolist())
        free = [t for t in range(len(tokenizer) - 1, 0, -1) if t not in used]
        markers.update(loss=free[0], grad=free[1])
        for row, kind in ((LOSS_ROW, "loss"), (GRAD_ROW, "grad")):
            ids = samples[row].input_ids.clone()
            ids[1] = markers[kind]
            samples[row] = TokenizedSample(samples[row].id, ids, samples[row].label_mask)
        return samples

    def load_model(config, device="cpu"):
        loaded = real_load_model(config, device)
        seen = {}

        def record(module, args, kwargs):
            seen["ids"] = kwargs["input_ids"]

        def poison(module, args, output):
            ids = seen["ids"]
            nan_loss = (ids == markers["loss"]).any(1)
            output = torch.where(nan_loss[:, None, None], torch.full_like(output, float("nan")), output)
            return _PoisonGradient.apply(output, (ids == markers["grad"]).any(1))

        loaded.model.register_forward_pre_hook(record, with_kwargs=True)
        loaded.model.model.layers[1].mlp.register_forward_hook(poison)
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fisher_module, "load_task", load_task)
        patch.setattr(fisher_module, "load_model", load_model)
        yield


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phase1(tiny_model_dir, tmp_path_factory):
    """The one-job store and a cache of shard runs: (K, P, dtype) -> partial store paths."""
    root = tmp_path_factory.mktemp("shards")
    model = tiny_model_dir("llama")
    cache: dict[tuple, list[Path]] = {}
    references: dict[str, Path] = {}

    def reference(dtype: str = "float32") -> Path:
        if dtype not in references:
            with poisoned_samples():
                references[dtype] = run_fisher(make_config(model, per_sample_dtype=dtype), TASK,
                                               root / f"single-{dtype}.zarr", progress=False)
        return references[dtype]

    def shards(n_k: int, n_p: int, dtype: str = "float32", order=None, folder: str | None = None) -> list[Path]:
        key = (n_k, n_p, dtype, folder)
        if key not in cache:
            config = make_config(model, per_sample_dtype=dtype, shards=n_k, param_shards=n_p)
            where = root / (folder or f"k{n_k}p{n_p}-{dtype}")
            grid = list(itertools.product(range(n_k), range(n_p)))
            paths = {}
            with poisoned_samples():
                for k, p in (order or grid):
                    paths[k, p] = run_fisher_shard(config, TASK, where / shard_name(k, n_k, p, n_p), (k, n_k),
                                                   (p, n_p), progress=False)
            cache[key] = [paths[kp] for kp in grid]
        return cache[key]

    return {"model": model, "root": root, "reference": reference, "shards": shards}


def comparable(attrs: dict) -> dict:
    """Store attrs with the parameter a non-finite gradient was first seen in left out.

    Phase 1 names one parameter whose gradient was non-finite, the first its accumulator
    reports; a job over a share of the parameters can only name one of its own.
    """
    skipped = [{**item, "reason": item["reason"].split(" in ")[0]} for item in attrs["skipped"]]
    return {**attrs, "skipped": skipped}


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    root = open_store(path).root
    return {key: array[...] for key, array in root.members(max_depth=None) if isinstance(array, zarr.Array)}


def assert_same_within_rounding(key: str, got: np.ndarray, want: np.ndarray) -> None:
    """Equal, or for floats within 1e-6 relative (of the element and of the array's largest
    element, for sums that cancel) plus one unit in the last place of the stored dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape, key
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=key)
        return
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    scale = np.abs(want64).max() if want64.size else 0.0
    tolerance = 1e-6 * (np.abs(want64) + scale) + np.spacing(np.abs(want)).astype(np.float64)
    excess = np.abs(got64 - want64) - tolerance
    assert (excess <= 0).all(), f"{key}: {int((excess > 0).sum())} elements differ by more than float rounding"


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- how a task is split ---------------------------------------------------------------------------
def test_sample_ranges_are_contiguous_and_even():
    for n, k in [(7, 1), (7, 2), (7, 3), (7, 7), (100, 6), (5, 5)]:
        ranges = shard_ranges(n, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert shard_ranges(2, 3) == [(0, 0), (0, 1), (1, 2)]  # fewer usable samples than shards: empty shards


def test_parameter_shares_are_a_deterministic_balanced_partition(tiny_model_dir):
    from fisher_pipeline.models.adapters import adapter_for
    from fisher_pipeline.models.loading import load_model

    geometry = adapter_for(load_model(make_config(tiny_model_dir("llama")).model).model).geometry()
    m2 = {n for n in geometry.params if "self_attn" in n}
    weights = {n: share_weight(int(np.prod(g.shape)), n in m2, False, 4) for n, g in geometry.params.items()}
    for n_p in (1, 2, 3, 5, len(geometry.params)):
        shares = param_shares(geometry, n_p, m2, (), 4)
        assert shares == param_shares(geometry, n_p, sorted(m2, reverse=True), (), 4)  # deterministic
        assert len(shares) == n_p and all(shares) and all(s == sorted(s) for s in shares)
        assert sorted(itertools.chain(*shares)) == sorted(geometry.params)  # a partition
        loads = [sum(weights[n] for n in share) for share in shares]
        assert max(loads) - min(loads) <= max(weights.values())  # greedy balance bound
    with pytest.raises(ConfigError, match=rf"fisher.param_shards = 99 exceeds the {len(geometry.params)} parameter"):
        param_shares(geometry, 99)


def test_partition_balances_state_size_not_tensor_count():
    attention = AttentionGeometry(1, 1, 1, 1, (0,))

    def param(name, rows):
        return ParamGeometry(name, (rows, 10), None, "other", GroupSpec.whole((rows, 10)))

    geometry = ModelGeometry(attention, {n: param(n, r) for n, r in [("big", 90), ("a", 30), ("b", 30), ("c", 30)]})
    assert param_shares(geometry, 2) == [["big"], ["a", "b", "c"]]
    # per-sample storage makes a tensor heavier: "a" now weighs more than "big"
    assert param_shares(geometry, 2, per_sample_names={"a"}, batch_size=16) == [["a"], ["b", "big", "c"]]


def test_more_sample_shards_than_samples_is_a_config_error(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir("llama"), shards=6)
    with pytest.raises(ConfigError, match=r"fisher.shards = 6 exceeds tasks.other.n_samples = 5: .* at most 5"):
        check_sample_shards(config.fisher.shards, config.tasks.values())
    check_sample_shards(config.fisher.shards, [config.tasks[TASK]])
    with pytest.raises(ConfigError, match=r"fisher.shards = 9 exceeds tasks.prose.n_samples = 7"):
        run_fisher_shard(config, TASK, tmp_path / "s.zarr", (0, 9))
    with pytest.raises(ConfigError, match="sample shard 2 of 2 does not exist"):
        run_fisher_shard(config, TASK, tmp_path / "s.zarr", (2, 2))
    assert not any(tmp_path.iterdir())


def test_config_hash_ignores_the_split():
    def config(**fisher):
        return PipelineConfig.from_dict({"tasks": {TASK: {"source": "builtin:prose"}}, "fisher": fisher})

    base = phase1_config_hash(config(), TASK)
    assert phase1_config_hash(config(shards=3, param_shards=2), TASK) == base
    assert phase1_config_hash(config(state_device="cpu"), TASK) == base
    assert phase1_config_hash(config(fold_kernel="torch"), TASK) == base  # the same sums by another route
    assert phase1_config_hash(config(batch_size=3), TASK) != base
    # the keys are left out, not set to 1: stores written before they existed keep their hash
    plain = config()
    invariant = ("shards", "param_shards", "state_device", "fold_kernel")
    fisher = {k: v for k, v in dataclasses.asdict(plain.fisher).items() if k not in invariant}
    spec = {k: v for k, v in dataclasses.asdict(plain.tasks[TASK]).items() if k not in HELDOUT_KEYS}
    assert base == config_hash(spec, fisher) and set(invariant) == set(STORE_INVARIANT_KEYS) <= set(vars(plain.fisher))


# --- the merge equals one job ---------------------------------------------------------------------
@pytest.mark.parametrize(("n_k", "n_p"), GRIDS)
def test_merged_store_equals_the_single_job_store(phase1, tmp_path, n_k, n_p):
    reference = phase1["reference"]()
    merged = merge_shards(phase1["shards"](n_k, n_p), tmp_path / f"{TASK}.zarr", task=TASK)
    want, got = open_store(reference), open_store(merged)
    # config_hash, skipped samples (in task order), geometry, n_samples, ...
    assert comparable(got.attrs) == comparable(want.attrs)
    assert [item["reason"] for item in comparable(want.attrs)["skipped"]] == ["non-finite loss", "non-finite gradient"]
    assert got.attrs["skipped"][1]["reason"].startswith("non-finite gradient in model.")
    assert want.n_samples == N_SAMPLES - 2
    want_arrays, got_arrays = store_arrays(reference), store_arrays(merged)
    assert sorted(got_arrays) == sorted(want_arrays)
    kinds = {key.split("/")[0] for key in want_arrays}
    assert kinds == {"samples", "fisher", "grad_mean", "fisher_m2", "group", "group_m2", "per_sample", "gate",
                     "group_saliency", "group_saliency_m2", "input_sq"}
    assert len(want.input_sq_names) >= 7 * 2 and want.input_sq_tokens(want.input_sq_names[0]) > 0
    for key, values in want_arrays.items():
        assert_same_within_rounding(key, got_arrays[key], values)
    for kind in ("fisher", "per_sample", "gate"):  # the per-sample layout too: chunk one sample, shard a micro-batch
        key = f"{kind}/model.layers.0.self_attn.q_proj.weight"
        for attribute in ("chunks", "shards", "compressors", "fill_value"):
            assert getattr(got.root[key], attribute) == getattr(want.root[key], attribute), (key, attribute)


def test_merged_m2_is_the_m2_of_the_per_sample_gradients(phase1, tmp_path):
    """Independent of the one-job store: Chan's merge across shards gives the M2 of the data."""
    merged = open_store(merge_shards(phase1["shards"](3, 1), tmp_path / "m.zarr"))
    for name in merged.per_sample_names[:4]:
        contributions = merged.per_sample(name).astype(np.float64) ** 2
        m2 = ((contributions - contributions.mean(0)) ** 2).sum(0)
        np.testing.assert_allclose(merged.fisher_m2(name), m2, rtol=1e-4, atol=1e-6 * m2.max(), err_msg=name)
        group = merged.geometry[name]
        sums = np.stack([group.reduce_sum(c) for c in contributions])
        np.testing.assert_allclose(merged.group_m2(name), ((sums - sums.mean(0)) ** 2).sum(0), rtol=1e-4)


def test_float16_per_sample_gradients_merge_too(phase1, tmp_path):
    reference = phase1["reference"]("float16")
    merged = merge_shards(phase1["shards"](2, 2, "float16"), tmp_path / "m.zarr")
    assert comparable(open_store(merged).attrs) == comparable(open_store(reference).attrs)
    want, got = store_arrays(reference), store_arrays(merged)
    for key, values in want.items():
        assert_same_within_rounding(key, got[key], values)


def test_merge_order_never_changes_a_byte(phase1, tmp_path):
    paths = phase1["shards"](2, 2)
    first = tree_bytes(merge_shards(paths, tmp_path / "a.zarr"))
    assert len(first) > 20
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        again = merge_shards([paths[i] for i in order], tmp_path / f"{order[0]}.zarr")
        assert tree_bytes(again) == first, order
    # shard jobs that finished in another order (last first) write the same partial stores
    late_first = phase1["shards"](2, 2, order=[(1, 1), (1, 0), (0, 1), (0, 0)], folder="reversed")
    assert tree_bytes(merge_shards(late_first, tmp_path / "r.zarr")) == first


@pytest.mark.filterwarnings("ignore:task 'two'")
def test_fewer_usable_samples_than_shards_leaves_empty_shards(tiny_model_dir, tmp_path):
    """n_samples allows 3 shards, but the file holds 2 samples: one shard is empty, the merge still exact."""
    source = tmp_path / "two.jsonl"
    source.write_text("".join(json.dumps({"text": f"Sample number {i} says hello to the model."}) + "\n"
                              for i in range(2)))
    config = PipelineConfig.from_dict({
        "model": {"path": str(tiny_model_dir("llama"))},
        "tasks": {"two": {"source": str(source), "n_samples": 3, "max_length": 16}},
        "fisher": {"batch_size": 2, "per_sample_dtype": "float32", "shards": 3},
    })
    single = run_fisher(config, "two", tmp_path / "single.zarr", progress=False)
    paths = [run_fisher_shard(config, "two", tmp_path / shard_name(k, 3, 0, 1), (k, 3), progress=False)
             for k in range(3)]
    assert [open_store_attrs(p)["count"] for p in paths] == [0, 1, 1]
    merged = merge_shards(paths, tmp_path / "two.zarr", task="two")
    assert open_store(merged).attrs == open_store(single).attrs
    want, got = store_arrays(single), store_arrays(merged)
    assert sorted(got) == sorted(want)
    for key, values in want.items():
        assert_same_within_rounding(key, got[key], values)


def test_float64_states_are_merged_in_shard_index_order(phase1):
    """Chan's merge is exact only to rounding: the order is fixed (shard index), never the given one."""
    paths = phase1["shards"](3, 1)
    reference = merged_statistics(open_shards(paths))
    assert reference.count == N_SAMPLES - 2
    for order in ([2, 1, 0], [1, 2, 0], [2, 0, 1]):
        merged = merged_statistics(open_shards([paths[i] for i in order]))
        for kind in ("fisher", "grad", "group", "saliency", "input_sq"):
            states, expected = getattr(merged, kind), getattr(reference, kind)
            assert sorted(states) == sorted(expected) and len(states) > 10
            for name in states:
                got, want = states[name], expected[name]
                assert got.count == want.count
                assert got.count == N_SAMPLES - 2 or kind == "input_sq"  # input_sq counts token positions
                assert torch.equal(got.total, want.total), (order, kind, name)
                assert (got.m2 is None) == (want.m2 is None) and (got.m2 is None or torch.equal(got.m2, want.m2))


# --- merges that must fail ------------------------------------------------------------------------
def forge(source: Path, target: Path, **changes) -> Path:
    """A copy of partial store `source` whose attrs (nested: "shard.sample_shard") are changed."""
    shutil.copytree(source, target)
    group = zarr.open_group(target, mode="r+", use_consolidated=False)
    attrs = json.loads(json.dumps(dict(group.attrs)))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = attrs
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    group.attrs.put(attrs)
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(target)
    write_manifest(target)  # forged consistently: only the merge's own checks can refuse it
    return target


def open_store_attrs(path: Path) -> dict:
    return dict(zarr.open_group(path, mode="r").attrs)


def merge_error(paths, out: Path, **expect) -> str:
    with pytest.raises((StoreFormatError, StoreMismatchError)) as error:
        merge_shards(paths, out, **expect)
    assert not out.exists() and not staging_siblings(out)
    return str(error.value)


def test_a_damaged_shard_is_refused_by_name(phase1, tmp_path):
    """A shard whose bytes changed after its job (integrity record) stops the merge, naming it."""
    paths = phase1["shards"](2, 1)
    damaged = tmp_path / "copy" / paths[1].name
    shutil.copytree(paths[1], damaged)
    chunk = sorted(p for p in (damaged / "fisher_total").rglob("*") if p.is_file() and "/c/" in p.as_posix())[0]
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x10
    chunk.write_bytes(bytes(data))
    message = merge_error([paths[0], damaged], tmp_path / f"{TASK}.zarr")
    assert f"store {damaged} is damaged: chunk" in message and "of array fisher_total/" in message, message
    assert "does not hold the bytes that were written" in message and "--sample-shard k/K" in message


def test_incomplete_sets_of_shards_are_refused_by_name(phase1, tmp_path):
    paths = phase1["shards"](3, 1)
    out = tmp_path / f"{TASK}.zarr"
    message = merge_error(paths[:1] + paths[2:], out)
    assert f"shard {paths[1]} (task 'prose', sample shard 1 of 3, parameter share 0 of 1) is missing" in message
    assert "--sample-shard k/K" in message and "snakemake" in message
    gone = tmp_path / shard_name(1, 3, 0, 1)
    assert f"shard {gone} does not exist" in merge_error([paths[0], gone, paths[2]], out)
    # a failed or killed job leaves only its staging directory
    left = gone.with_name(f".{gone.name}.12345-0a1b2c3d.partial")
    shutil.copytree(paths[1], left)
    message = merge_error([paths[0], gone, paths[2]], out)
    assert f"shard {gone} is incomplete: its job failed or was interrupted (it left {left.name})" in message
    message = merge_error([paths[0], left, paths[2]], out)
    assert f"shard {left} is a partial shard (the unfinished output of a failed" in message
    assert f"pass {gone} once its job has finished" in message
    store = phase1["reference"]()
    assert f"{store} is a finished Fisher store, not a shard" in merge_error([store], out)
    # an earlier complete store at `out` survives a failed merge
    shutil.copytree(store, out)
    with pytest.raises(StoreFormatError):
        merge_shards(paths[:2], out)
    assert open_store(out).attrs == open_store(store).attrs


def test_duplicated_overlapping_and_mixed_shards_are_refused(phase1, tmp_path):
    paths = phase1["shards"](2, 2)
    out = tmp_path / f"{TASK}.zarr"
    message = merge_error(paths + [paths[1]], out)
    assert f"shards {paths[1]} and {paths[1]} are both sample shard 0 of 2, parameter share 1 of 2" in message
    thirds = phase1["shards"](3, 1)
    message = merge_error(paths + thirds[:1], out)
    assert f"shard {thirds[0]} belongs to a split into 3 sample shards x 1 parameter shares" in message
    assert "shards of different runs are mixed" in message
    moved = forge(paths[2], tmp_path / "moved.zarr", **{"shard.sample_start": 2})
    message = merge_error([paths[0], paths[1], moved, paths[3]], out)
    assert f"shard {moved} holds samples 2..7 of 7, but sample shard 1 of 2 covers 3..7 (overlapping" in message
    share0, share1 = (open_store_attrs(path)["shard"]["params"] for path in paths[:2])
    twice = share1 + share0[:1]
    overlaps = [forge(paths[i], tmp_path / f"overlap{i}.zarr", **{"shard.params": twice}) for i in (1, 3)]
    message = merge_error([paths[0], overlaps[0], paths[2], overlaps[1]], out)
    assert f"parameter {share0[0]} is in both {paths[0]} and {overlaps[0]} (overlapping parameter shares)" in message
    message = merge_error([paths[0], overlaps[0], paths[2], paths[3]], out)
    assert f"shards {overlaps[0]} and {paths[3]} hold different parameters for share 1" in message
    # parameter shares of one sample shard that skipped different samples
    skipped = forge(paths[1], tmp_path / "skipped.zarr", skipped=[])
    message = merge_error([paths[0], skipped, paths[2], paths[3]], out)
    assert f"shards {paths[0]} and {skipped} (parameter shares of sample shard 0) hold different" in message
    assert "fisher.param_shards: 1" in message


def test_shards_of_another_config_model_or_task_are_refused(phase1, tmp_path):
    paths = phase1["shards"](2, 1)
    out = tmp_path / f"{TASK}.zarr"
    config = make_config(phase1["model"], per_sample_dtype="float32")
    message = merge_error(paths, out, task="other")
    assert f"shard {paths[0]} was written with task 'prose', but this merge expects 'other'" in message
    message = merge_error(paths, out, config_hash=phase1_config_hash(make_config(phase1["model"], batch_size=3), TASK))
    assert f"shard {paths[0]} was written with config_hash" in message and "another config" in message
    merge_shards(paths, out, task=TASK, config_hash=phase1_config_hash(config, TASK))  # the right ones pass
    shutil.rmtree(out)
    other_model = forge(paths[1], tmp_path / "other.zarr", **{"store_attrs.weights_hash": "0123456789abcdef"})
    message = merge_error([paths[0], other_model], out)
    assert f"shards {paths[0]} and {other_model} differ in weights_hash" in message
    assert "Delete the stale one" in message


# --- the command line -----------------------------------------------------------------------------
def test_cli_writes_shards_and_merges_them(phase1, tmp_path, caplog):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": {"path": str(phase1["model"])},
        "tasks": {TASK: {"source": "builtin:prose", "n_samples": 3, "max_length": 16}},
        "fisher": {"batch_size": 2, "per_sample_params": "none", "fisher_m2_params": "none", "shards": 2},
    }))
    common = ["--config", str(config_file), "--task", TASK]
    shards = [tmp_path / shard_name(k, 2, 0, 1) for k in range(2)]
    for k, path in enumerate(shards):
        assert main(["fisher", *common, "--sample-shard", f"{k}/2", "--out", str(path), "--quiet"]) == 0
    assert main(["fisher", *common, "--out", str(tmp_path / "single.zarr"), "--quiet"]) == 0
    caplog.clear()
    assert main(["fisher-merge", *common, "--shards", str(shards[0]), "--out", str(tmp_path / "m.zarr")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"shard {shards[1]} (task 'prose', sample shard 1 of 2" in errors[0]
    assert main(["fisher-merge", *common, "--shards", *map(str, shards[::-1]), "--out", str(tmp_path / "m.zarr")]) == 0
    assert open_store(tmp_path / "m.zarr").attrs == open_store(tmp_path / "single.zarr").attrs
    with pytest.raises(SystemExit):
        main(["fisher", *common, "--sample-shard", "2/2", "--out", str(tmp_path / "x.zarr")])


# --- the workflow ---------------------------------------------------------------------------------
@pytest.mark.workflow
def test_workflow_plans_shard_jobs_and_a_merge_and_nothing_else_changes(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    plain = snakemake(tmp_path, write_config(tmp_path / "plain.yaml", model), "-n", "-p")
    sharded = snakemake(tmp_path, write_config(tmp_path / "sharded.yaml", model,
                                               fisher={"shards": 3, "param_shards": 2}), "-n", "-p")
    plain_jobs, sharded_jobs = planned_jobs(plain), planned_jobs(sharded)
    assert plain_jobs["fisher"] == 2 and "fisher_shard" not in plain_jobs
    assert sharded_jobs.pop("fisher_shard") == 2 * 3 * 2 and sharded_jobs.pop("fisher_merge") == 2
    plain_jobs.pop("fisher")
    assert sharded_jobs == plain_jobs  # every later phase: the same jobs
    assert '"shards"' not in plain and '"param_shards"' not in plain  # one-job params as before the keys
    assert "--sample-shard 2/3 --param-shard 1/2 --out results/fisher/shards/prose/s2of3-p1of2.zarr" in sharded
    too_many = write_config(tmp_path / "too_many.yaml", model, fisher={"shards": 4})
    output = snakemake(tmp_path, too_many, "-n", expect_failure=True)
    assert "invalid workflow config: fisher.shards = 4 exceeds tasks.code.n_samples = 3" in output



def _sabotage(folder: Path) -> Path:
    """A `sitecustomize` that makes the job of sample shard 1 of 2 of task prose fail (test only)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "argv = ' '.join(sys.argv)\n"
        "if '--sample-shard 1/2' in argv and '--task prose' in argv:\n"
        "    sys.exit('planted failure of shard 1 of prose')\n"
    )
    return folder


@pytest.mark.workflow
def test_sharded_workflow_resumes_and_matches_the_unsharded_run(tiny_run, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    configfile = write_config(workdir / "sharded.yaml", tiny_run["model"], fisher={"shards": 2})
    sabotage = _sabotage(tmp_path / "sabotage")
    env = {"PYTHONPATH": os.pathsep.join([str(sabotage), os.environ.get("PYTHONPATH", "")])}
    # phase 1 and the phases reading its statistics and its per-sample gradients (the other
    # phases read the same stores; the unsharded reference runs them all)
    targets = [f"results/{kind}/{task}" for kind in ("importance", "masks") for task in ("code", "prose")]
    targets += ["results/conflicts/code__prose"]
    output = snakemake(workdir, configfile, "--cores", "2", "--keep-going", "--", *targets, expect_failure=True,
                       env=env)
    assert "rule fisher_shard" in output
    shards = workdir / "results" / "fisher" / "shards"
    done, failed = shards / TASK / "s0of2-p0of1.zarr", shards / TASK / "s1of2-p0of1.zarr"
    assert done.is_dir() and not failed.exists() and not staging_siblings(failed)
    assert "planted failure" in (workdir / "logs/fisher/shards/prose/s1of2-p0of1.log").read_text()
    assert (workdir / "results/fisher/code.zarr").is_dir()
    assert not list((shards / "code").glob("*.zarr"))  # merged: its temp shards are gone
    done_log = workdir / "logs/fisher/shards/prose/s0of2-p0of1.log"
    before = (done.stat().st_mtime_ns, done_log.stat().st_mtime_ns)
    # The rerun plans only the failed shard, the merge and what depends on the task.
    plan = snakemake(workdir, configfile, "-n", "-p", "--", *targets)
    jobs = planned_jobs(plan)
    assert jobs["fisher_shard"] == 1 and jobs["fisher_merge"] == 1, jobs
    assert "--sample-shard 1/2" in plan and "--sample-shard 0/2" not in plan
    snakemake(workdir, configfile, "--cores", "2", "--", *targets)
    assert done_log.stat().st_mtime_ns == before[1]  # the finished shard was not redone
    assert not done.exists() and not list(shards.rglob("*.zarr"))  # temp: removed after the merge
    assert planned_jobs(snakemake(workdir, configfile, "-n", "--quiet", "rules", "--", *targets)) == {}
    assert (workdir / "logs/benchmarks/fisher/shards/prose/s0of2-p0of1.tsv").exists()
    assert (workdir / "logs/benchmarks/fisher/prose.merge.tsv").exists()
    # Same stores (attrs identical, arrays to float rounding) and the same downstream results.
    unsharded = tiny_run["workdir"]
    for task in ("code", "prose"):
        want, got = unsharded / f"results/fisher/{task}.zarr", workdir / f"results/fisher/{task}.zarr"
        assert open_store(got).attrs == open_store(want).attrs
        want_arrays, got_arrays = store_arrays(want), store_arrays(got)
        assert sorted(got_arrays) == sorted(want_arrays)
        for key, values in want_arrays.items():
            assert_same_within_rounding(f"{task}: {key}", got_arrays[key], values)
    tables = sorted(p.relative_to(workdir) for p in (workdir / "results").rglob("*.parquet"))
    assert len(tables) == 16, tables  # importance 6 x 2 tables, masks 1 x 2, conflicts 2
    for table in tables:
        want, got = pd.read_parquet(unsharded / table), pd.read_parquet(workdir / table)
        if table.name == "precision.parquet":  # sample counts: ceilings of the compared rel. SEs, may flip by 1
            want, got = (frame.drop(columns=[c for c in frame if c.startswith("samples_for_")])
                         for frame in (want, got))
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-4, atol=1e-9, obj=str(table))
