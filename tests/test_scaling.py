"""benchmarks/scale_table.py: its byte arithmetic against hand counts and against the real engine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]

# A tiny Llama: D = 64, FFN = 96, 3 layers, 4 heads of 16 over 2 KV heads, vocab 100, untied.
D, FFN, L, H, H_KV, V = 64, 96, 3, 4, 2, 100
TINY = dict(model_type="llama", hidden_size=D, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=H,
            num_key_value_heads=H_KV, vocab_size=V, tie_word_embeddings=False, max_position_embeddings=64)


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_table", ROOT / "benchmarks" / "scale_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(scale):
    return scale.model_sizes("tiny", scale.meta_model(TINY))


def test_element_counts_match_a_hand_count(tiny):
    head_dim = D // H
    q = o = D * D
    k = v = H_KV * head_dim * D
    attention = q + k + v + o  # per layer
    mlp = 3 * D * FFN
    assert tiny.per_sample("every") == L * attention == 36864
    assert tiny.per_sample("first_last") == 2 * attention  # layers 0 and 2
    assert tiny.per_sample("none") == 0
    assert tiny.params == 2 * V * D + L * (attention + mlp + 2 * D) + D == 105408
    assert tiny.m2() == 2 * attention and tiny.m2(all_layers=True) == L * attention
    # groups per layer: q 4, k 2, v 2, o 4 heads; gate, up, down FFN neurons each; 2 norms; + embed, lm_head, norm
    assert tiny.groups == L * (H + 2 * H_KV + H + 3 * FFN + 2) + 3


def test_bytes_match_a_hand_count(scale, tiny):
    s_every, s_first_last, params = 36864, 24576, 105408
    assert scale.fisher_state(tiny) == 16 * params + 8 * s_first_last + 16 * tiny.groups
    assert scale.fisher_state(tiny, m2_all_layers=True) == 16 * params + 8 * s_every + 16 * tiny.groups
    # two sets of B x S float16 buffers
    assert scale.per_sample_buffer(tiny, 4) == 2 * 4 * s_every * 2
    assert scale.per_sample_buffer(tiny, 4, "first_last") == 2 * 4 * s_first_last * 2
    assert scale.per_sample_buffer(tiny, 4, "every", width=4) == 2 * 4 * s_every * 4
    assert scale.writer_copies(tiny, 4) == 2 * 4 * s_every * 2
    assert scale.store_statistics(tiny) == 8 * params + 4 * s_first_last + 8 * tiny.groups
    assert scale.logits_bytes(tiny, 4, 10) == 3 * 4 * 4 * 10 * V
    assert scale.activation_bytes(tiny, 4, 10) == 4 * 4 * 10 * L * (8 * D + 4 * FFN)
    memory = scale.job_memory(tiny, 4, 10, 1 << 25)
    assert memory.weights == 4 * params
    assert memory.state == scale.fisher_state(tiny) and memory.buffer == 2 * 4 * s_every * 2
    assert memory.device() == memory.fixed + memory.state + memory.buffer
    assert memory.device(state_on_host=True) == memory.fixed + memory.buffer
    # host: the writer's copies (B = 4: 590 kB) are less than the float32 statistics (949 kB) built at close
    assert scale.host_memory(tiny, 4) == scale.store_statistics(tiny)
    assert scale.host_memory(tiny, 4, state_on_host=True) == scale.store_statistics(tiny) + memory.state


def test_largest_chunk_follows_hooks_chunking(tiny):
    # Whole parameters fit a chunk: the largest is B x the embedding (or LM head), V x D.
    assert tiny.largest_chunk(4, 1 << 25) == 4 * V * D
    # One row per chunk: the widest row is down_proj's, FFN columns.
    assert tiny.largest_chunk(4, 300) == 4 * FFN
    # 1000 // (4 * 64) = 3 rows of 64 columns; down_proj's 384-element rows give one row.
    assert tiny.largest_chunk(4, 1000) == 4 * 3 * D


@pytest.mark.parametrize("chunk_elements", [300, 1000, 1 << 25])
def test_largest_chunk_is_what_the_engine_materialises(tiny, chunk_elements):
    from fisher_pipeline.engine.hooks import PerSampleGradients

    config = dict(TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(config.pop("model_type"), **config)).eval()
    seen = []
    with PerSampleGradients(model, lambda name, start, stop, chunk: seen.append(chunk.numel()),
                            chunk_elements) as hooks:
        ids = torch.randint(0, V, (4, 10))
        model(input_ids=ids).logits.sum().backward()
        hooks.finish()
    assert max(seen) == tiny.largest_chunk(4, chunk_elements)


def test_state_bytes_are_the_accumulators(scale, tiny):
    from fisher_pipeline.accumulate import FisherAccumulator
    from fisher_pipeline.models.adapters import adapter_for

    geometry = adapter_for(scale.meta_model(TINY)).geometry()
    m2 = set(geometry.select("attention", [0, -1]))
    accumulator = FisherAccumulator({n: g.shape for n, g in geometry.params.items()},
                                    {n: g.groups for n, g in geometry.params.items()}, m2, set(),
                                    weights={n: torch.zeros(g.shape) for n, g in geometry.params.items()})

    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    state = sum(nbytes(w.total) + nbytes(w.m2) for states in (accumulator.fisher, accumulator.grad,
                                                               accumulator.group) for w in states.values())
    assert state == scale.fisher_state(tiny)


def test_param_shard_split(scale):
    # largest first: 5 -> a, 4 -> b, 3 -> b (7), 3 -> a (8)
    assert scale.largest_share([3, 5, 3, 4], 2) == 8
    assert scale.largest_share([3, 5, 3, 4], 1) == 15
    assert scale.largest_share([3, 5, 3, 4], 8) == 5  # the largest tensor bounds the share


def test_min_param_shards(scale, tiny):
    memory = scale.job_memory(tiny, 4, 10, 1 << 25)
    costs = scale.tensor_costs(tiny, 4)
    assert sum(costs) == memory.state + memory.buffer
    assert sum(scale.tensor_costs(tiny, 4, state_on_host=True)) == memory.buffer
    assert scale.min_param_shards(tiny, memory.fixed + memory.buffer, 4, 10, 1 << 25, state_on_host=True) == 1
    assert scale.min_param_shards(tiny, memory.fixed + sum(costs), 4, 10, 1 << 25) == 1
    two = scale.min_param_shards(tiny, memory.fixed + sum(costs) - 1, 4, 10, 1 << 25)
    assert two == 2 and scale.largest_share(costs, 2) + memory.fixed <= memory.fixed + sum(costs) - 1
    assert scale.min_param_shards(tiny, memory.fixed, 4, 10, 1 << 25) is None


def test_render_and_published_configs(scale, tiny):
    text = scale.render([tiny], 4, 10, 1 << 25)
    assert "### What fits one device" in text and "| tiny | attention, every layer | float16 | 73.7 kB |" in text
    bundled = ROOT / "resources" / "models" / "SmolLM2-135M-Instruct" / "config.json"
    if bundled.is_file():  # the hard-coded fallback is the bundled config
        config = json.loads(bundled.read_text())
        assert {k: config[k] for k in scale.CONFIGS["SmolLM2-135M"]} == scale.CONFIGS["SmolLM2-135M"]
