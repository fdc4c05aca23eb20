"""Architecture adapters: head slices proven by perturbing the real models, group specs
proven to partition their tensors, unsupported models refused with a useful message.

Nothing here re-derives a layout: the perturbation tests only use what the adapter
says (slices, head counts, the o_proj module) and what the model computes.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
import torch
import transformers
from torch import nn

from fisher_pipeline.errors import UnsupportedArchitectureError
from fisher_pipeline.models.adapters import ADAPTERS, BLOCKS, ArchitectureAdapter, adapter_for, supported_model_types
from tiny_models import FAMILIES, build_tiny

# Every family as built, plus configs that stress the GQA map and the residual path.
CASES: list[tuple[str, dict]] = [(family, {}) for family in FAMILIES] + [
    ("llama", {"num_key_value_heads": 4}),  # plain multi-head attention
    ("llama", {"num_key_value_heads": 1}),  # multi-query attention
    ("qwen2", {"num_key_value_heads": 1}),
    ("phi3", {"num_key_value_heads": 1}),
    ("phi3", {"num_key_value_heads": 4}),
    ("gpt_neox", {"use_parallel_residual": False}),
]
IDS = [family + "".join(f"-{k}={v}" for k, v in overrides.items()) for family, overrides in CASES]

UNCHANGED_ATOL = 1e-7  # heads the perturbation must not reach
CHANGED_MIN = 1e-4  # heads it must reach
NOISE = 0.5


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request) -> tuple[nn.Module, ArchitectureAdapter]:
    family, overrides = request.param
    model = build_tiny(family, **overrides)
    return model, adapter_for(model)


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))


def _o_proj_io(
    model: nn.Module, module: nn.Module, pre_hook: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (after `pre_hook`) and output of `module` in one forward pass."""
    seen: dict[str, torch.Tensor] = {}

    def capture(mod, args, output):
        seen["input"], seen["output"] = args[0].detach().clone(), output.detach().clone()

    handles = [module.register_forward_hook(capture)]
    if pre_hook is not None:
        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model(_input_ids())
    finally:
        for handle in handles:
            handle.remove()
    return seen["input"], seen["output"]


def _per_head(x: torch.Tensor, adapter: ArchitectureAdapter) -> torch.Tensor:
    """`[B, T, H*d]` head-major o_proj input -> `[B, T, H, d]`."""
    assert x.shape[-1] == adapter.n_heads * adapter.head_dim
    return x.reshape(*x.shape[:-1], adapter.n_heads, adapter.head_dim)


@contextmanager
def _perturbed(adapter: ArchitectureAdapter, layer: int, block: str, head: int, how: str) -> Iterator[None]:
    """Noise (`how="noise"`) or zero (`"zero"`) exactly the slices of (layer, block, head); restore after."""
    saved: dict[str, torch.Tensor] = {}
    noise = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            for piece in adapter.head_slices(layer, block, head):
                param = adapter.params[piece.param]
                saved.setdefault(piece.param, param.detach().clone())
                old = piece.take(param)
                new = torch.zeros_like(old) if how == "zero" else old + NOISE * torch.randn(old.shape, generator=noise)
                param.index_copy_(piece.dim, piece.index, new)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                adapter.params[name].copy_(value)


@pytest.mark.parametrize("block", ["q", "k", "v"])
def test_qkv_slices_reach_exactly_their_heads(case, block):
    model, adapter = case
    for layer in range(adapter.n_layers):
        o_proj = adapter.o_proj_module(layer)
        base = _per_head(_o_proj_io(model, o_proj)[0], adapter)
        for head in range(adapter.n_heads):
            with _perturbed(adapter, layer, block, head, "noise"):
                out = _per_head(_o_proj_io(model, o_proj)[0], adapter)
            change = (out - base).abs().amax(dim=(0, 1, 3))  # [H]
            # q reaches its own head; k/v reach every query head sharing the KV head.
            owner = adapter.kv_head if block in ("k", "v") else (lambda h: h)
            expected = torch.tensor([owner(h) == owner(head) for h in range(adapter.n_heads)])
            where = f"layer {layer} {block} head {head}: change per head {change.tolist()}"
            assert (change[expected] > CHANGED_MIN).all(), where
            assert (change[~expected] <= UNCHANGED_ATOL).all(), where


def test_o_slice_is_what_reads_the_head(case):
    """Zeroing head h's o-slice weights == zeroing head h's features entering o_proj."""
    model, adapter = case
    d = adapter.head_dim
    for layer in range(adapter.n_layers):
        o_proj = adapter.o_proj_module(layer)
        _, base = _o_proj_io(model, o_proj)
        for head in range(adapter.n_heads):

            def silence_head(mod, args, head=head):
                x = args[0].clone()
                x[..., head * d : (head + 1) * d] = 0  # head-major input: head h is this block
                return (x, *args[1:])

            _, head_silenced = _o_proj_io(model, o_proj, silence_head)
            with _perturbed(adapter, layer, "o", head, "zero"):
                _, slice_zeroed = _o_proj_io(model, o_proj)
            where = f"layer {layer} o head {head}"
            assert (head_silenced - base).abs().max() > CHANGED_MIN, where
            torch.testing.assert_close(slice_zeroed, head_silenced, rtol=0, atol=1e-6, msg=where)


def test_group_specs_partition_their_tensors(case):
    _, adapter = case
    specs = adapter.group_specs()
    assert specs, "an adapter with no groups"
    noise = torch.Generator().manual_seed(4)
    for name, spec in specs.items():
        assert name in adapter.params, f"group spec for unknown parameter {name}"
        shape = tuple(adapter.params[name].shape)
        assert spec.labels.shape == (shape[spec.dim],), name
        assert torch.equal(spec.labels.unique(), torch.arange(len(spec.names))), f"{name}: unused or missing group ids"
        assert all(re.fullmatch(r"[qkvo]\.h\d+|neuron\.\d+", group) for group in spec.names), (name, spec.names)
        x = torch.randn(shape, generator=noise, dtype=torch.float64)
        reduced = spec.reduce(x[None])
        assert reduced.shape == (1, len(spec.names)), name
        torch.testing.assert_close(reduced.sum(), x.sum(), msg=name)
    # Every layer has attention heads and MLP neurons grouped.
    for layer in range(adapter.n_layers):
        names = {g for n, s in specs.items() if re.search(rf"\.{layer}\.", n) for g in s.names}
        for group in [f"{b}.h0" for b in BLOCKS] + ["neuron.0"]:
            assert group in names, f"layer {layer} has no group {group}"


def test_head_slices_cover_attention_exactly_and_match_groups(case):
    """q/o positions are hit once, k/v once per query head sharing them; each slice
    lies in the group of its own head."""
    _, adapter = case
    specs = adapter.group_specs()
    shares = adapter.n_heads // adapter.n_kv_heads
    for layer in range(adapter.n_layers):
        cover: dict[str, torch.Tensor] = {}  # param -> coverage, in units of "expected hits"
        weight_rows = {block: 0 for block in BLOCKS}
        for block in BLOCKS:
            hits: dict[str, torch.Tensor] = {}
            for head in range(adapter.n_heads):
                owner = adapter.kv_head(head) if block in ("k", "v") else head
                for piece in adapter.head_slices(layer, block, head):
                    size = adapter.params[piece.param].shape[piece.dim]
                    count = hits.setdefault(piece.param, torch.zeros(size))
                    count.index_add_(0, piece.index, torch.ones(len(piece.index)))
                    spec = specs[piece.param]
                    assert spec.dim == piece.dim, piece.param
                    groups = {spec.names[i] for i in spec.labels[piece.index].tolist()}
                    assert groups == {f"{block}.h{owner}"}, (piece.param, block, head, groups)
            expected = shares if block in ("k", "v") else 1
            for param, count in hits.items():
                assert set(count.unique().tolist()) <= {0.0, float(expected)}, (param, block)
                cover[param] = cover.get(param, torch.zeros_like(count)) + count / expected
                if adapter.params[param].dim() == 2:
                    weight_rows[block] += int((count > 0).sum())
        for param, total in cover.items():
            assert torch.equal(total, torch.ones_like(total)), f"{param} not covered exactly once: {total.tolist()}"
        width = {"q": adapter.n_heads, "k": adapter.n_kv_heads, "v": adapter.n_kv_heads, "o": adapter.n_heads}
        assert weight_rows == {b: width[b] * adapter.head_dim for b in BLOCKS}, (layer, weight_rows)


def test_every_family_has_its_adapter():
    for family in FAMILIES:
        model = build_tiny(family)
        adapter = adapter_for(model)
        assert model.config.model_type in type(adapter).model_types
    assert set(supported_model_types()) >= {"llama", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3"}


def _unsupported_models() -> list[nn.Module]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    bert = transformers.BertModel(config)
    fake = nn.Linear(4, 4)
    fake.config = SimpleNamespace(model_type="mamba")
    return [bert, fake, nn.Linear(4, 4)]


@pytest.mark.parametrize("model", _unsupported_models(), ids=["bert", "fake-config", "no-config"])
def test_unsupported_architecture_lists_supported_types(model):
    with pytest.raises(UnsupportedArchitectureError) as error:
        adapter_for(model)
    message = str(error.value)
    assert type(model).__name__ in message
    for model_type in (t for adapter in ADAPTERS for t in adapter.model_types):
        assert model_type in message
