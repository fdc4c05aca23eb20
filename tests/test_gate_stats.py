"""What phase 1 keeps for structured pruning, against references computed here from scratch.

Per parameter and group G (the store's group order): each sample's gate gradient
`gate_i,G = sum_{k in G} g_i,k w_k` and group saliency `s_i,G = 0.5 sum_{k in G} (g_i,k w_k)^2`
(Welford mean and M2); per Linear / Conv1D weight used by one module, the mean over
scored token positions (those whose prediction enters the loss) of each input feature's
square. References: a float64 copy of each tiny model, one sample at a time, plain
autograd; and numpy on the inputs captured from the float32 model's padded batches.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from transformers.pytorch_utils import Conv1D

from fisher_pipeline.config import FisherConfig
from fisher_pipeline.engine.loss import collate
from fisher_pipeline.errors import StoreFormatError
from fisher_pipeline.fisher import compute_fisher, run_fisher
from fisher_pipeline.models.adapters import adapter_for
from fisher_pipeline.models.loading import load_model
from fisher_pipeline.store import open_store
from test_engine import random_samples
from tiny_models import FAMILIES, build_tiny

#: Relative to a parameter's scale (the largest `sum_{k in G} |g_i,k w_k|` over its samples and
#: groups): a float32 forward/backward and float32 sums put the gates and saliencies within a
#: few float32 ulps (6e-8) of that scale times the model's depth; 3.5e-7 was the worst seen
#: over these families. Scaling by the element instead would fail on gates that vanish
#: exactly (a head's q rows before Qwen3's q_norm, GPT-2's key biases: softmax-invariant).
RTOL = 1e-5


def linear_weights(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Weights of Linear / Conv1D layers not tied to the embedding -> (module, input dim)."""
    names = {id(p): n for n, p in model.named_parameters()}
    embedding = model.get_input_embeddings().weight
    return {names[id(m.weight)]: (m, 0 if isinstance(m, Conv1D) else 1) for m in model.modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m.weight is not embedding}


def batch1_reference(model: nn.Module, samples) -> dict:
    """float64, one sample at a time: gates and saliencies `[N, G]`, `sum |g w|` `[N, G]`, and
    per Linear weight the mean of x^2 over scored positions `[in]` with the position count."""
    model64 = copy.deepcopy(model).double()
    groups = {n: g.groups for n, g in adapter_for(model).geometry().params.items()}
    params = dict(model64.named_parameters())  # tied weights once: their .grad sums both uses
    layers = linear_weights(model64)
    per_sample: dict[str, dict[str, list]] = {"gate": {}, "saliency": {}, "abs": {}}
    squares = {name: 0.0 for name in layers}
    positions = 0
    for sample in samples:
        captured = {}
        handles = [module.register_forward_hook(
            lambda m, args, out, name=name, into=captured: into.__setitem__(name, args[0]))
            for name, (module, _) in layers.items()]
        model64.zero_grad(set_to_none=True)
        ids = sample.input_ids[None]
        logits = model64(input_ids=ids, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        (nll * sample.label_mask[1:]).sum().backward()
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            products = (g * p.detach())[None]
            per_sample["gate"].setdefault(name, []).append(groups[name].reduce(products)[0])
            per_sample["saliency"].setdefault(name, []).append(0.5 * groups[name].reduce(products.square())[0])
            per_sample["abs"].setdefault(name, []).append(groups[name].reduce(products.abs())[0])
        scored = sample.label_mask[1:]  # position t predicts token t + 1
        for name, x in captured.items():
            squares[name] = squares[name] + x[0, :-1][scored].detach().square().sum(0)
        positions += int(scored.sum())
    result = {kind: {n: torch.stack(v) for n, v in values.items()} for kind, values in per_sample.items()}
    result["input_sq"] = {name: total / positions for name, total in squares.items()}
    result["positions"] = positions
    return result


def run(model, samples, **config) -> tuple:
    """compute_fisher; the accumulator and every sample's gates `[N, G]`."""
    committed = []

    def keep(batch, losses, grads, gates):
        committed.append({name: g.clone() for name, g in gates.items()})

    options = FisherConfig(**{"batch_size": 4, "chunk_elements": 256, **config})
    accumulator = compute_fisher(model, adapter_for(model), samples, options, pad_id=0, on_commit=keep).accumulator
    return accumulator, {name: torch.cat([c[name] for c in committed]) for name in committed[0]}


def assert_within(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    error = ((got - want).abs() / scale.clamp_min(1e-300)).max().item()
    assert error <= rtol, f"{what}: error {error:.2e} of the parameter's scale > {rtol}"


@pytest.fixture(scope="module")
def references():
    made = {}

    def get(family: str):
        if family not in made:
            model = build_tiny(family)
            samples = random_samples(7, seed=5)
            made[family] = (model, samples, batch1_reference(model, samples))
        return made[family]

    return get


@pytest.mark.parametrize("engine", ["hooks", "loop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gates_saliencies_and_input_sq_equal_float64_batch1_reference(references, family, engine):
    """Both engines (hooks: batches of 4 right-padded samples, weights in row chunks; loop:
    batch 1) against the float64 reference, every parameter of every family."""
    model, samples, reference = references(family)
    accumulator, gates = run(model, samples, engine=engine)
    assert accumulator.count == len(samples) and set(gates) == set(reference["gate"])
    for name, want in reference["gate"].items():
        scale = reference["abs"][name].max()
        assert gates[name].shape == want.shape, name
        assert_within(gates[name], want, scale, f"{family}/{engine} gate {name}")
        saliency = reference["saliency"][name]
        state = accumulator.saliency[name]
        assert_within(state.mean, saliency.mean(0), saliency.max(), f"{family}/{engine} saliency {name}")
        m2 = ((saliency - saliency.mean(0)) ** 2).sum(0)
        assert_within(state.m2, m2, m2.max(), f"{family}/{engine} saliency M2 {name}", rtol=3 * RTOL)
    assert set(accumulator.input_dims) == set(reference["input_sq"]), family
    layers = linear_weights(model)
    for name, want in reference["input_sq"].items():
        assert accumulator.input_dims[name] == layers[name][1], name
        assert accumulator.input_sq[name].count == reference["positions"], name
        assert_within(accumulator.input_sq[name].mean, want, want, f"{family}/{engine} input_sq {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_kernel_and_torch_operations_agree(family):
    """`fisher.fold_kernel: torch` gives the compiled kernel's gates and saliencies to float32
    rounding (both sum float32 products within a chunk row, then float64), and the same input moments."""
    from fisher_pipeline import kernels

    if kernels.load() is None:
        pytest.skip("no working C compiler with OpenMP here")
    model = build_tiny(family)
    samples = random_samples(6, seed=8)
    fast, fast_gates = run(model, samples, fold_kernel="auto")
    slow, slow_gates = run(model, samples, fold_kernel="torch")
    assert fast._kernel is not None and slow._kernel is None
    for name in fast.shapes:
        scale = slow_gates[name].abs().max().clamp_min(slow.saliency[name].mean.max().sqrt())
        assert_within(fast_gates[name], slow_gates[name], scale, f"{family} gate {name}", rtol=1e-6)
        mean = slow.saliency[name].mean
        assert_within(fast.saliency[name].mean, mean, mean.max(), f"{family} saliency {name}", rtol=1e-6)
        m2 = slow.saliency[name].m2
        assert_within(fast.saliency[name].m2, m2, m2.max(), f"{family} saliency M2 {name}", rtol=1e-5)
    for name, state in slow.input_sq.items():
        assert torch.equal(fast.input_sq[name].total, state.total) and fast.input_sq[name].count == state.count


@pytest.mark.parametrize("family", FAMILIES)
def test_input_sq_equals_numpy_on_captured_inputs_and_the_label_mask(family):
    """Each Linear / Conv1D layer's input, captured from the float32 model on the same padded
    batches, squared and summed in float64 numpy over positions t with label_mask[t + 1]."""
    model = build_tiny(family)
    samples = random_samples(9, seed=3)
    accumulator, _ = run(model, samples)
    layers = linear_weights(model)
    sums = {name: 0.0 for name in layers}
    positions = 0
    for start in range(0, len(samples), 4):
        batch = collate(samples[start:start + 4], pad_id=0)
        captured = {}
        handles = [module.register_forward_hook(
            lambda m, args, out, name=name, into=captured: into.__setitem__(name, args[0].numpy().astype(np.float64)))
            for name, (module, _) in layers.items()]
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        for handle in handles:
            handle.remove()
        label_mask = batch.label_mask.numpy()
        scored = np.zeros_like(label_mask)
        scored[:, :-1] = label_mask[:, 1:]
        assert (~scored | batch.attention_mask.numpy().astype(bool)).all()  # scored positions are real tokens
        for name, x in captured.items():
            sums[name] = sums[name] + np.square(x[scored]).sum(0)
        positions += int(scored.sum())
    assert set(accumulator.input_sq) == set(layers)
    # float32 squares summed within a sample (at most 24 positions), float64 across samples
    rtol = 24 * 2.0**-24
    for name, total in sums.items():
        assert accumulator.input_sq[name].count == positions
        np.testing.assert_allclose(accumulator.input_sq[name].mean.numpy(), total / positions, rtol=rtol, atol=0,
                                   err_msg=f"{family} {name}")


# --- the store ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def store_and_model(request, tiny_model_dir, tmp_path_factory):
    from test_phase1 import make_config

    config = make_config(tiny_model_dir(request.param), per_sample_dtype="float32", per_sample_params="attention")
    path = run_fisher(config, "prose", tmp_path_factory.mktemp("gates") / "prose.zarr", progress=False)
    return request.param, open_store(path), load_model(config.model).model


def test_store_readers(store_and_model):
    family, store, model = store_and_model
    n = store.n_samples
    weights = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    for name in store.param_names:
        gates = store.gate(name)
        groups = store.group_spec(name)
        assert gates.shape == (n, len(store.group_names(name))) and gates.dtype == np.float64
        ids = [store.sample_ids[3], store.sample_ids[0]]
        np.testing.assert_array_equal(store.gate(name, ids), gates[[3, 0]])
        np.testing.assert_allclose(store.gate_fisher(name), np.mean(gates**2, 0), rtol=1e-12)
        np.testing.assert_allclose(store.gate_fisher_se(name), np.std(gates**2, 0, ddof=1) / np.sqrt(n), rtol=1e-12)
        # mean_i 0.5 sum_{k in G} g_i,k^2 w_k^2 = 0.5 sum_{k in G} F_k w_k^2 (float32 F and saliency)
        expected = 0.5 * groups.reduce(torch.from_numpy(store.fisher(name) * weights[name] ** 2)[None])[0].numpy()
        np.testing.assert_allclose(store.group_saliency(name), expected, rtol=1e-5, atol=1e-6 * expected.max(),
                                   err_msg=name)
        m2 = store.array("group_saliency_m2", name)[...].astype(np.float64)
        np.testing.assert_allclose(store.group_saliency_se(name), np.sqrt(m2 / (n - 1) / n), rtol=1e-12)
    layers = linear_weights(model)
    assert store.input_sq_names == sorted(layers)
    assert "lm_head.weight" not in store.input_sq_names  # tied to the embedding in both tiny models
    for name, (_, dim) in layers.items():
        assert store.input_dim(name) == dim == (0 if family == "gpt2" else 1)
        values = store.input_sq(name)
        assert values.dtype == np.float64 and values.shape == (weights[name].shape[dim],) and (values > 0).all()
        # prose labels every token after the first: the scored positions are the labelled tokens
        assert store.input_sq_tokens(name) == store.n_tokens.sum()
    with pytest.raises(KeyError, match="only the weights of Linear / Conv1D"):
        store.input_sq(store.param_names[0] if store.param_names[0] not in layers else "no.such.weight")


def test_an_older_store_asks_for_a_rerun(tmp_path):
    """A format 2 store (no gates, saliencies or input moments) opens; their readers say what is
    missing and what to do."""
    from store_factory import make_store

    path = make_store(tmp_path / "old.zarr", n_samples=4)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert open_store(path).gate(name).shape == (4, 4)
    root = zarr.open_group(path, mode="r+")
    for kind in ("gate", "group_saliency", "group_saliency_m2", "input_sq"):
        del root[kind]
    attrs = dict(root.attrs)
    del attrs["input_sq"]
    root.attrs.put({**attrs, "format_version": 2})
    with warnings.catch_warnings():  # consolidated metadata is a zarr-python extension to v3
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(path)
    (path / "integrity.json").unlink()  # version 2 had no integrity record
    with pytest.warns(UserWarning, match=r"old\.zarr has no integrity record .*: a missing or damaged chunk in it "
                                         r"cannot be detected; rerun phase 1 for this task to add one"):
        store = open_store(path)
    assert store.fisher(name).shape == (8, 6)
    for read in (store.gate, store.gate_fisher, store.gate_fisher_se, store.group_saliency, store.group_saliency_se):
        with pytest.raises(StoreFormatError, match=rf"has no \w+/{name}.*older phase 1.*rerun phase 1 for this task"):
            read(name)
    with pytest.raises(StoreFormatError, match="has no input_sq.*rerun phase 1 for this task"):
        _ = store.input_sq_names
    with pytest.raises(KeyError, match="not in store"):
        store.gate("no.such.weight")
