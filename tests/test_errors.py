"""Errors a user can cause: each is a `FisherPipelineError` naming the input and the fix,
and the command line prints it on one line, without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fisher_pipeline.__main__ import main
from fisher_pipeline.atomic import staging_siblings
from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.errors import ConfigError, FisherPipelineError, StoreContentError, StoreMismatchError, TaskError
from fisher_pipeline.fisher import resolve_device, run_fisher
from fisher_pipeline.phases import MaskOptions, compute_masks, run_importance
from fisher_pipeline.phases.common import open_stores
from fisher_pipeline.store import check_same_model, open_store
from store_factory import llama_layout, make_store

ROOT = Path(__file__).resolve().parents[1]


def config_for(model_dir, max_length: int = 24, **fisher) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 4, "max_length": max_length}},
        "fisher": {"batch_size": 2, **fisher},
    })


def test_cuda_without_a_gpu_names_the_key_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"fisher.device is 'cuda' but no CUDA device.*Set fisher.device to 'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_every_sample_skipped_leaves_no_partial_store(tiny_model_dir, tmp_path):
    """A model whose weights are NaN: every loss is non-finite; nothing is stored, no .partial stays."""
    broken = tmp_path / "broken"
    broken.mkdir()
    source = Path(tiny_model_dir("llama"))
    for file in source.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "prose.zarr"
    with pytest.raises(TaskError, match=r"task 'prose': all 4 samples were skipped \(non-finite.*prose:"):
        run_fisher(config_for(broken), "prose", out, progress=False)
    assert not out.exists() and not staging_siblings(out)


def test_per_sample_selection_matching_nothing_is_named(tiny_model_dir, tmp_path):
    out = tmp_path / "prose.zarr"
    with pytest.raises(ConfigError, match=r"fisher.per_sample_params = 'attention\\\\.q_proj'.*matches no parameter.*"
                                          r"model\.layers\.0\."):
        run_fisher(config_for(tiny_model_dir("llama"), per_sample_params=r"attention\.q_proj"), "prose", out,
                   progress=False)
    assert not staging_siblings(out)
    with pytest.raises(ConfigError, match=r"fisher.fisher_m2_layers = \[5\]: layer\(s\) \[5\] out of range; the model"):
        run_fisher(config_for(tiny_model_dir("llama"), fisher_m2_layers=[5]), "prose", out, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_max_length_above_the_context_is_refused(tiny_model_dir, tmp_path, family):
    """GPT-2 used to crash with an IndexError; RoPE models ran silently past their trained context."""
    with pytest.raises(ConfigError, match=r"tasks.prose.max_length = 65 exceeds the model's context length "
                                          r"\(64 positions.*Set max_length <= 64"):
        run_fisher(config_for(tiny_model_dir(family), max_length=65), "prose", tmp_path / "p.zarr", progress=False)


def test_mask_include_matching_nothing_lists_real_names(tmp_path):
    store = open_store(make_store(tmp_path / "a.zarr"))
    with pytest.raises(ConfigError, match=r"masks.include = 'mlp.{1,3}gate_up'.*matches no parameter.*"
                                          r"model\.embed_tokens\.weight"):
        compute_masks(store, MaskOptions(include=r"mlp\.gate_up"))


def test_all_zero_fisher_is_refused_where_shares_need_it(tmp_path):
    shapes, _ = llama_layout()
    zeros = {name: np.zeros((4, *shape), np.float32) for name, shape in shapes.items()}
    path = make_store(tmp_path / "zero.zarr", n_samples=4, grads=zeros)
    with pytest.raises(StoreContentError, match="zero for every parameter.*labelled tokens"):
        run_importance(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pair_stores_must_match(tmp_path):
    q = "model.layers.0.self_attn.q_proj.weight"
    base = make_store(tmp_path / "a.zarr", task="a", per_sample=(q,))
    cases = {
        "weights_hash": make_store(tmp_path / "w.zarr", task="w", per_sample=(q,), weights_hash="other-weights"),
        "fisher_kind": make_store(tmp_path / "k.zarr", task="k", per_sample=(q,), attrs={"fisher_kind": "sampled"}),
        "per_sample_params": make_store(tmp_path / "p.zarr", task="p",
                                        per_sample=(q, "model.layers.1.self_attn.q_proj.weight")),
    }
    for key, other in cases.items():
        stores = {"a": open_store(base), "b": open_store(other)}
        with pytest.raises(StoreMismatchError, match=rf"tasks 'a' .* and 'b' .* differ in {key}.*rerun phase 1"):
            check_same_model(stores, per_sample=True)
    # Without per-sample data, only the per-sample selection may differ.
    check_same_model({"a": open_store(base), "p": open_store(cases["per_sample_params"])})
    with pytest.raises(StoreMismatchError, match="fisher_kind"):
        open_stores({"a": base, "k": cases["fisher_kind"]})


def test_every_package_error_is_a_fisher_pipeline_error():
    for cls in (ConfigError, StoreContentError, StoreMismatchError, TaskError):
        assert issubclass(cls, FisherPipelineError)


def test_cli_prints_errors_without_a_traceback(tiny_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir("gpt2"))},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 4, "max_length": 500}},
    }))
    args = ["fisher", "--config", str(config), "--task", "prose", "--out", str(tmp_path / "p.zarr"), "--quiet"]
    assert main(args) == 2
    done = subprocess.run([sys.executable, "-m", "fisher_pipeline", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "tasks.prose.max_length = 500 exceeds the model's context length (64 positions" in done.stderr
