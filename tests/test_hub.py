"""Models by hub id: `model.path: org/name` resolves through a HuggingFace cache folder the
tests build (the layout `huggingface_hub` reads: refs/<revision> -> snapshots/<commit>/),
offline; safetensors only; a missing id names the command that fills the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fisher_pipeline.__main__ import main
from fisher_pipeline.config import ModelConfig
from fisher_pipeline.errors import ModelLoadError
from fisher_pipeline.models.hub import FILES, is_hub_id, resolve
from fisher_pipeline.models.loading import load_model, weights_hash

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-llama"
MAIN, TAGGED = "a" * 40, "b" * 40


def cache_model(cache: Path, repo_id: str, model_dir: Path, commit: str, ref: str = "main") -> Path:
    """Put `model_dir` in `cache` as snapshot `commit` of hub repo `repo_id`, named by `ref`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache_model(cache, REPO, Path(tiny_model_dir("llama")), MAIN)
    cache_model(cache, REPO, Path(tiny_model_dir("qwen2")), TAGGED, ref="v1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("meta-llama/Llama-3.2-1B")
    assert not is_hub_id("resources/models/SmolLM2-135M-Instruct")  # three parts: a local path
    assert not is_hub_id("models/model.gguf") and not is_hub_id("SmolLM2") and not is_hub_id("/abs/path")
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org/name")  # an existing folder wins
    finally:
        os.chdir(ROOT)


def test_a_hub_id_loads_from_the_cache_offline(hub_cache, tiny_model_dir):
    loaded = load_model(ModelConfig(path=REPO))
    assert loaded.model_id == f"{REPO}@{MAIN[:12]} (LlamaForCausalLM)"
    assert loaded.weights_hash == weights_hash(tiny_model_dir("llama"))
    tagged = load_model(ModelConfig(path=REPO, revision="v1"))
    assert tagged.model_id == f"{REPO}@{TAGGED[:12]} (Qwen2ForCausalLM)"
    assert tagged.weights_hash == weights_hash(tiny_model_dir("qwen2"))


def test_a_hub_id_missing_from_the_cache_names_the_command_that_fills_it(hub_cache):
    with pytest.raises(ModelLoadError, match=rf"model.path other/model is a hub id that is not in the HuggingFace "
                                             rf"cache \({hub_cache}\), and runs are offline \(HF_HUB_OFFLINE=1\): "
                                             r"fill the cache once with `HF_HUB_OFFLINE=0 \.venv/bin/python -m "
                                             r"fisher_pipeline download-model other/model`"):
        load_model(ModelConfig(path="other/model"))
    with pytest.raises(ModelLoadError, match=r"\(revision v9\).*download-model tiny-org/tiny-llama --revision v9`"):
        load_model(ModelConfig(path=REPO, revision="v9"))


def test_a_cached_snapshot_with_pickled_weights_is_refused(hub_cache, tiny_model_dir):
    snapshot = cache_model(hub_cache, "pickle/model", Path(tiny_model_dir("llama")), "c" * 40)
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights. Pickled weights .* are refused"):
        load_model(ModelConfig(path="pickle/model"))


def test_download_model_fetches_only_what_loading_needs(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshots" / MAIN)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the command is the one online step, whatever the setting
    assert main(["download-model", "Qwen/Qwen2.5-0.5B", "--revision", "v1"]) == 0
    assert calls == [("Qwen/Qwen2.5-0.5B", {"revision": "v1", "allow_patterns": FILES, "local_files_only": False})]
    assert not any("bin" in pattern or "py" in pattern or "pt" == pattern[-2:] for pattern in FILES)
    assert capsys.readouterr().out.strip().endswith(MAIN)
    assert resolve.__module__ == "fisher_pipeline.models.hub"


def test_the_workflow_plans_a_hub_model_and_names_a_missing_one(hub_cache, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": REPO},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 2, "n_heldout": 1, "max_length": 16}},
    }))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
               str(tmp_path / "work"), "--configfile", str(config), "-n", "--cores", "1", "results/fisher/prose.zarr"]
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"input: {hub_cache}/models--tiny-org--tiny-llama/snapshots/{MAIN}" in result.stdout
    config.write_text(config.read_text().replace(REPO, "other/model"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "download-model other/model" in result.stdout + result.stderr
