"""Tiny random-weight causal LMs, one per supported architecture family, for tests.

Each is float32, 2 layers, vocab 128, at most 64 positions, and built the same way
every time: the global RNG is seeded before construction (HF init draws from it),
then every parameter gets small seeded noise so that biases and norm weights, which
HF initialises to 0 and 1, are not trivial (a slice bug hidden by a zero bias or a
unit norm would otherwise go unnoticed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 128
MAX_POSITIONS = 64
NOISE = 0.02


def _llama() -> transformers.PretrainedConfig:
    # GQA (4 query heads over 2 KV heads), tied embeddings, no biases.
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
    )


def _qwen2() -> transformers.PretrainedConfig:
    # Qwen2 always has q/k/v biases (o_proj has none); GQA.
    return transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )


def _qwen3() -> transformers.PretrainedConfig:
    # q/k norms; head_dim 16 != hidden / heads = 8, so q_proj is [64, 32]; GQA.
    return transformers.Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
    )


def _gpt2() -> transformers.PretrainedConfig:
    # Conv1D c_attn / c_proj, learned positions, LayerNorm with bias, tied head.
    return transformers.GPT2Config(
        n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_POSITIONS,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,  # defaults 50256 lie outside VOCAB
    )


def _gpt_neox() -> transformers.PretrainedConfig:
    # Fused per-head-interleaved query_key_value, rotary on half of each head, untied embed_out.
    return transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


def _phi3() -> transformers.PretrainedConfig:
    # Fused qkv_proj (Q, K, V blocks) with GQA, fused gate_up_proj.
    # pad_token_id defaults to 32000, outside the tiny vocabulary.
    return transformers.Phi3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "phi3": _phi3,
}

FAMILIES: list[str] = list(_CONFIGS)


def build_tiny(family: str, attn_implementation: str = "eager", **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny seeded random causal LM of `family`; `overrides` set config fields."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    config = _CONFIGS[family]()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # named_parameters() deduplicates tied weights: each tensor is perturbed once.
        for _, param in sorted(model.named_parameters()):
            param.add_(NOISE * torch.randn(param.shape, generator=noise, dtype=param.dtype))
    return model.eval()
