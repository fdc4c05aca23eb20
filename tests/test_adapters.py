"""Architecture adapters: head slices proven by perturbing the real models, group specs
proven to partition their tensors, unsupported models refused with a useful message.

Nothing here re-derives a layout: the perturbation tests only use what the adapter
says (slices, head counts, the o_proj module) and what the model computes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from fisher_pipeline.errors import UnsupportedArchitectureError
from fisher_pipeline.models.adapters import (
    ADAPTERS,
    ArchitectureAdapter,
    TensorSlice,
    adapter_for,
    supported_model_types,
)
from fisher_pipeline.roles import HEAD_BLOCKS as BLOCKS
from tiny_models import FAMILIES, build_tiny

# Every family as built, plus configs that stress the GQA map and the residual path.
CASES: list[tuple[str, dict]] = [(family, {}) for family in FAMILIES] + [
    ("llama", {"num_key_value_heads": 4}),  # plain multi-head attention
    ("llama", {"num_key_value_heads": 1}),  # multi-query attention
    ("qwen2", {"num_key_value_heads": 1}),
    ("phi3", {"num_key_value_heads": 1}),
    ("phi3", {"num_key_value_heads": 4}),
    ("gpt_neox", {"use_parallel_residual": False}),
    # q/k/v (and o, MLP) biases in the Llama layout; Qwen2, GPT-2 and GPT-NeoX have them as built.
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"attention_bias": True, "num_key_value_heads": 1}),
    ("qwen3", {"attention_bias": True}),
]
IDS = [family + "".join(f"-{k}={v}" for k, v in overrides.items()) for family, overrides in CASES]

UNCHANGED_ATOL = 1e-7  # heads the perturbation must not reach
CHANGED_MIN = 1e-4  # heads it must reach
NOISE = 0.5


#: The cases whose attention projections have q/k/v biases (the bias tests run on these).
BIAS_CASES = [(family, overrides) for family, overrides in CASES
              if family in ("qwen2", "gpt2", "gpt_neox") or overrides.get("attention_bias")]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request) -> tuple[nn.Module, ArchitectureAdapter]:
    family, overrides = request.param
    model = build_tiny(family, **overrides)
    return model, adapter_for(model)


@pytest.fixture(scope="module", params=BIAS_CASES, ids=[IDS[CASES.index(c)] for c in BIAS_CASES])
def bias_case(request) -> tuple[nn.Module, ArchitectureAdapter]:
    family, overrides = request.param
    model = build_tiny(family, **overrides)
    adapter = adapter_for(model)
    assert _has_qkv_biases(adapter), f"{family} {overrides} was expected to have q/k/v biases"
    return model, adapter


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
def _perturbed(adapter: ArchitectureAdapter, layer: int, block: str, head: int, how: str,
               biases_only: bool = False) -> Iterator[None]:
    """Noise (`how="noise"`) or zero (`"zero"`) exactly the slices of (layer, block, head); restore after.

    `biases_only`: touch only the pieces that lie in 1-D parameters (biases).
    """
    pieces = adapter.head_slices(layer, block, head)
    if biases_only:
        pieces = [piece for piece in pieces if adapter.params[piece.param].dim() == 1]
    with _perturbed_pieces(adapter, pieces, how):
        yield


@contextmanager
def _perturbed_pieces(adapter: ArchitectureAdapter, pieces: list[TensorSlice], how: str) -> Iterator[None]:
    """Noise or zero exactly the positions `pieces` name; restore the parameters after."""
    saved: dict[str, torch.Tensor] = {}
    noise = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            for piece in pieces:
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


# --- biases of q/k/v heads --------------------------------------------------------

#: Biases of the attention input projections of a layer, in every family's naming.
_QKV_BIAS = r"\.(self_attn|attn|attention)\.(q_proj|k_proj|v_proj|qkv_proj|c_attn|query_key_value)\.bias$"


def _qkv_biases(adapter: ArchitectureAdapter, layer: int) -> list[str]:
    return sorted(n for n in adapter.params if re.search(rf"\.{layer}{_QKV_BIAS}", n))


def _has_qkv_biases(adapter: ArchitectureAdapter) -> bool:
    return any(_qkv_biases(adapter, layer) for layer in range(adapter.n_layers))


def _heads_and_keys(model: nn.Module, adapter: ArchitectureAdapter, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: `layer`'s o_proj input per head `[B, T, H, d]` and its key states
    `[B, H_kv, T, d]` (after rotary / k norm, as the KV cache holds them)."""
    seen: dict[str, torch.Tensor] = {}

    def capture(mod, args):
        seen["input"] = args[0].detach().clone()

    handle = adapter.o_proj_module(layer).register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            cache = model(_input_ids(), use_cache=True).past_key_values
    finally:
        handle.remove()
    return _per_head(seen["input"], adapter), cache.layers[layer].keys.detach().clone()


def test_qkv_biases_are_in_head_slices(bias_case):
    """Every position of every q/k/v bias lies in some head's slices, at the same positions
    as the head's weight slice of that module; o's bias is shared and in no head."""
    _, adapter = bias_case
    for layer in range(adapter.n_layers):
        biases = _qkv_biases(adapter, layer)
        assert biases, f"layer {layer} has no q/k/v biases while another layer has"
        covered = {name: torch.zeros(adapter.params[name].shape[0], dtype=torch.bool) for name in biases}
        for block in ("q", "k", "v"):
            for head in range(adapter.n_heads):
                pieces = adapter.head_slices(layer, block, head)
                by_param = {piece.param: piece for piece in pieces}
                bias_pieces = [piece for piece in pieces if adapter.params[piece.param].dim() == 1]
                where = f"layer {layer} {block} head {head}"
                assert bias_pieces, f"{where}: no bias in the head's slices {sorted(by_param)}"
                for piece in bias_pieces:
                    assert piece.param in covered, f"{where}: {piece.param} is no q/k/v bias"
                    covered[piece.param][piece.index] = True
                    weight = by_param.get(piece.param.removesuffix("bias") + "weight")
                    assert weight is not None, f"{where}: {piece.param} without its weight"
                    assert torch.equal(weight.index, piece.index), (where, weight.index, piece.index)
        for name, hit in covered.items():
            missing = torch.nonzero(~hit).flatten().tolist()
            assert not missing, f"positions {missing} of {name} are in no head's slices"
        for head in range(adapter.n_heads):
            pieces = adapter.head_slices(layer, "o", head)
            assert all(adapter.params[p.param].dim() == 2 for p in pieces), f"o head {head}: {pieces}"


@pytest.mark.parametrize("block", ["q", "k", "v"])
def test_qkv_bias_slices_reach_exactly_their_heads(bias_case, block):
    """Perturbing only the bias pieces of a head's slices reaches exactly that head.

    q and v: the o_proj input of the query head (q), of every query head sharing the KV
    head (v). k: the key states of exactly its KV head, and no o_proj input of other
    query heads. (A key bias adds q.b to every score of a query row; without rotary
    embeddings softmax cancels it, so GPT-2's head outputs cannot show it: the keys do.)
    """
    model, adapter = bias_case
    for layer in range(adapter.n_layers):
        base, base_keys = _heads_and_keys(model, adapter, layer)
        for head in range(adapter.n_heads):
            with _perturbed(adapter, layer, block, head, "noise", biases_only=True):
                out, keys = _heads_and_keys(model, adapter, layer)
            change = (out - base).abs().amax(dim=(0, 1, 3))  # [H]
            key_change = (keys - base_keys).abs().amax(dim=(0, 2, 3))  # [H_kv]
            owner = adapter.kv_head if block in ("k", "v") else (lambda h: h)
            expected = torch.tensor([owner(h) == owner(head) for h in range(adapter.n_heads)])
            where = (f"layer {layer} {block} bias head {head}: change per head {change.tolist()}, "
                     f"keys {key_change.tolist()}")
            assert (change[~expected] <= UNCHANGED_ATOL).all(), where
            if block == "k":
                expected_keys = torch.arange(adapter.n_kv_heads) == adapter.kv_head(head)
                assert (key_change[expected_keys] > CHANGED_MIN).all(), where
                assert (key_change[~expected_keys] <= UNCHANGED_ATOL).all(), where
            else:
                assert (change[expected] > CHANGED_MIN).all(), where
                assert (key_change <= UNCHANGED_ATOL).all(), where


def test_biases_are_grouped_like_their_weights_outputs(case):
    """A bias shares its weight's partition when the weight is grouped along its outputs
    (q/k/v heads, MLP input neurons); otherwise (o, MLP output, norms) it stays whole."""
    model, adapter = case
    specs = adapter.group_specs()
    for name in adapter.params:
        if not name.endswith(".bias"):
            continue
        module_name = name.removesuffix(".bias")
        output_dim = 1 if isinstance(model.get_submodule(module_name), Conv1D) else 0  # Conv1D: [in, out]
        weight_spec = specs.get(f"{module_name}.weight")
        bias_spec = specs.get(name)
        if weight_spec is not None and weight_spec.dim == output_dim:
            assert bias_spec is not None, f"{name} has no groups; its weight has {weight_spec.names[:4]}..."
            assert bias_spec.dim == 0, name
            assert bias_spec.names == weight_spec.names, name
            assert torch.equal(bias_spec.labels, weight_spec.labels), name
        else:
            assert bias_spec is None or tuple(bias_spec.names) == ("all",), (
                f"{name} grouped as {bias_spec.names[:4]}...")


# --- MLP neurons -------------------------------------------------------------------

#: The MLP output projection of each family; its input is the neuron activations `[..., I]`.
_MLP_OUT = r"\.mlp\.(down_proj|c_proj|dense_4h_to_h)$"


@dataclass
class _MLP:
    """One layer's MLP: the module, its output projection, the input the model feeds it,
    and the group specs of its parameters.

    Attributes:
        inputs: every MLP parameter outside the output projection -> its spec (None when
            the adapter gives it no groups).
        outputs: the grouped parameters of the output projection -> spec.
    """

    module: nn.Module
    out_module: nn.Module
    x: torch.Tensor
    inputs: dict
    outputs: dict

    def run(self, pre_hook: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP alone on `x`: the output projection's input (neuron activations, after
        `pre_hook`) and output."""
        seen: dict[str, torch.Tensor] = {}

        def capture(mod, args, output):
            seen["input"], seen["output"] = args[0].detach().clone(), output.detach().clone()

        handles = [self.out_module.register_forward_hook(capture)]
        if pre_hook is not None:
            handles.append(self.out_module.register_forward_pre_hook(pre_hook))
        try:
            with torch.no_grad():
                self.module(self.x)
        finally:
            for handle in handles:
                handle.remove()
        return seen["input"], seen["output"]


def _mlp_layout(model: nn.Module, adapter: ArchitectureAdapter, layer: int) -> _MLP:
    """`layer`'s MLP with the input the model gives it (one forward pass)."""
    found = [(n, m) for n, m in model.named_modules() if re.search(rf"\.{layer}{_MLP_OUT}", n)]
    assert len(found) == 1, f"layer {layer}: MLP output projection {[n for n, _ in found]}"
    out_name, out_module = found[0]
    mlp_name = out_name.rpartition(".")[0]
    module = model.get_submodule(mlp_name)
    x, _ = _o_proj_io(model, module)  # the MLP's own input: nothing in it depends on the MLP
    specs = adapter.group_specs()
    params = [n for n in adapter.params if n.startswith(mlp_name + ".")]
    inputs = {n: specs.get(n) for n in params if not n.startswith(out_name + ".")}
    outputs = {n: specs[n] for n in params if n.startswith(out_name + ".") and n in specs}
    return _MLP(module, out_module, x, inputs, outputs)


def _neuron_pieces(specs: dict, neuron: int) -> list[TensorSlice]:
    """The positions the group specs assign to `neuron.{neuron}`, one piece per parameter."""
    pieces = []
    for name, spec in specs.items():
        group = spec.names.index(f"neuron.{neuron}")
        pieces.append(TensorSlice(name, spec.dim, torch.nonzero(spec.labels == group).flatten()))
    return pieces


def _sample_neurons(width: int, layer: int) -> list[int]:
    """The first and last neuron and 6 random ones in between."""
    inner = torch.randperm(width - 2, generator=torch.Generator().manual_seed(10 + layer))[:6] + 1
    return sorted({0, width - 1, *inner.tolist()})


def test_mlp_parameters_are_grouped_per_neuron(case):
    """Every MLP input parameter (weights and biases) and the output projection's weight are
    partitioned into exactly the neurons the output projection reads; its bias stays whole."""
    model, adapter = case
    for layer in range(adapter.n_layers):
        mlp = _mlp_layout(model, adapter, layer)
        width = mlp.run()[0].shape[-1]
        neurons = {f"neuron.{n}" for n in range(width)}
        assert mlp.inputs and mlp.outputs, f"layer {layer}: inputs {sorted(mlp.inputs)}, outputs {sorted(mlp.outputs)}"
        for name, spec in {**mlp.inputs, **mlp.outputs}.items():
            assert spec is not None, f"{name} is not grouped per neuron"
            assert set(spec.names) == neurons and len(spec.names) == width, (name, spec.names[:4])
        assert all(name.endswith(".weight") for name in mlp.outputs), (
            f"shared output bias grouped: {sorted(mlp.outputs)}")


def test_mlp_neuron_input_slices_reach_exactly_their_neuron(case):
    """Noising only neuron n's input-side positions changes neuron n's activation, and no other."""
    model, adapter = case
    for layer in range(adapter.n_layers):
        mlp = _mlp_layout(model, adapter, layer)
        grouped = {name: spec for name, spec in mlp.inputs.items() if spec is not None}
        base = mlp.run()[0]
        width = base.shape[-1]
        for neuron in _sample_neurons(width, layer):
            with _perturbed_pieces(adapter, _neuron_pieces(grouped, neuron), "noise"):
                out = mlp.run()[0]
            change = (out - base).abs().flatten(0, -2).amax(0)  # [I]
            expected = torch.arange(width) == neuron
            changed = torch.nonzero(change > UNCHANGED_ATOL).flatten().tolist()
            where = f"layer {layer} neuron {neuron}: changed neurons {changed}"
            assert change[neuron] > CHANGED_MIN, where
            assert (change[~expected] <= UNCHANGED_ATOL).all(), where


def test_mlp_neuron_output_slice_is_what_reads_the_neuron(case):
    """Zeroing neuron n's positions in the output projection == zeroing its activation."""
    model, adapter = case
    for layer in range(adapter.n_layers):
        mlp = _mlp_layout(model, adapter, layer)
        x, base = mlp.run()
        for neuron in _sample_neurons(x.shape[-1], layer):

            def silence_neuron(mod, args, neuron=neuron):
                x = args[0].clone()
                x[..., neuron] = 0
                return (x, *args[1:])

            _, neuron_silenced = mlp.run(silence_neuron)
            with _perturbed_pieces(adapter, _neuron_pieces(mlp.outputs, neuron), "zero"):
                _, slice_zeroed = mlp.run()
            where = f"layer {layer} neuron {neuron}"
            assert (neuron_silenced - base).abs().max() > CHANGED_MIN, where
            torch.testing.assert_close(slice_zeroed, neuron_silenced, rtol=0, atol=1e-6, msg=where)


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
