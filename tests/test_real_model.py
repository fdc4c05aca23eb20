"""The bundled real model (SmolLM2-135M-Instruct, Llama architecture, GQA, tied embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisher_pipeline.config import BUNDLED_MODEL_PATH, ModelConfig
from fisher_pipeline.models.adapters import adapter_for
from fisher_pipeline.models.loading import bundled_gguf, load_model, prepare_bundled_model
from test_engine import assert_close, loop_reference, per_sample_from_hooks

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    path = ROOT / BUNDLED_MODEL_PATH
    if not (path / "model.safetensors").exists():  # `make test` prepares it; be self-sufficient anyway
        prepare_bundled_model(path)
    return load_model(ModelConfig(path=str(path)))


def test_bundled_model_layout(smollm2):
    adapter = adapter_for(smollm2.model)
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim) == (30, 9, 3, 64)
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008


def test_per_sample_gradients_equal_loop_on_real_model(smollm2):
    """Every parameter (tied embedding included), mixed lengths in one padded batch.

    In float64: on this trained model float32 itself is only good to ~1e-3 relative
    (the float32 loop differs from the float64 loop by that much), so float32 runs of
    two summation orders cannot be compared at 1e-5; float64 shows the engine is exact.
    """
    from fisher_pipeline.data import TokenizedSample

    model = smollm2.model.double()
    texts = ["The Fisher information of a model.", "def add(a, b):\n    return a + b  # sum", "Hello"]
    samples = []
    for k, text in enumerate(texts):
        ids = torch.tensor(smollm2.tokenizer(text)["input_ids"])
        mask = torch.ones(len(ids), dtype=torch.bool)
        mask[0] = False
        samples.append(TokenizedSample(f"real-{k}", ids, mask))
    try:
        reference = loop_reference(model, samples)
        fast = per_sample_from_hooks(model, samples, batch_size=3)
    finally:
        smollm2.model.float()
    assert set(fast) == set(reference)
    for name in reference:
        assert_close(fast[name], reference[name], name, rtol=1e-9)


def test_gguf_file_loads_like_converted_folder(smollm2):
    direct = load_model(ModelConfig(path=str(bundled_gguf())))
    assert type(direct.model) is type(smollm2.model)
    converted = dict(smollm2.model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(dict(direct.model.named_parameters())[name], converted[name], rtol=0, atol=0)
    assert direct.tokenizer("Hello world")["input_ids"] == smollm2.tokenizer("Hello world")["input_ids"]
