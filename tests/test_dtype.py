"""`model.dtype`: a bfloat16 / float16 model, with float32 per-sample products and float32 /
float64 statistics, against the float32 path.

Tolerances, from the unit roundoff `u` of the model's dtype (2^-8 for bfloat16, 2^-11 for
float16; float32's 2^-24 is negligible here). The half-precision run rounds every weight
(relative error u/2) and every activation and output gradient along the path (u/2 each, a
handful per layer of these two-layer models). A per-sample gradient is a product of an
input and an output gradient, each off by about 2u. The Fisher squares it: about 2 x 2 x 2u
= 8u. That is the bound for any sum of Fisher values (a tensor, a group) and for the
elementwise L1 error. Measured: at most 3.9u over every family and both dtypes. The loss
is computed from float32 log-probabilities of half-precision logits (relative error u).

The bound alone would also pass half-precision *products*, whose rounding is u/2 more.
`test_half_model_per_sample_products_are_float32_products` catches those: it compares the
products with float64 ones of the very same half-precision inputs, to float32 precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.engine.hooks import PerSampleGradients
from fisher_pipeline.fisher import run_fisher
from fisher_pipeline.store import open_store
from tiny_models import FAMILIES, build_tiny

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _store(model_dir, dtype: str, out, engine: str = "hooks"):
    config = PipelineConfig.from_dict({
        "model": {"path": str(model_dir), "dtype": dtype},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 8, "max_length": 24}},
        "fisher": {"batch_size": 4, "per_sample_params": "attention", "engine": engine},
    })
    return open_store(run_fisher(config, "prose", out, progress=False))


def _errors(reference, other) -> dict[str, float]:
    """Largest relative errors of `other`'s statistics against `reference`'s, over parameters."""
    tensor, elementwise, group = [], [], []
    for name in reference.param_names:
        a, b = reference.fisher(name).astype(np.float64), other.fisher(name).astype(np.float64)
        tensor.append(abs(b.sum() - a.sum()) / a.sum())
        elementwise.append(np.abs(b - a).sum() / np.abs(a).sum())
        ga, gb = reference.group_fisher(name).astype(np.float64), other.group_fisher(name).astype(np.float64)
        group.append(np.abs(gb - ga).max() / np.abs(ga).max())
    loss = np.abs(other.losses - reference.losses).max() / np.abs(reference.losses).max()
    return {"tensor": max(tensor), "elementwise": max(elementwise), "group": max(group), "loss": float(loss)}


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_stores_match_float32_within_rounding(family, tiny_model_dir, tmp_path):
    path = tiny_model_dir(family)
    reference = _store(path, "float32", tmp_path / "float32.zarr")
    assert reference.attrs["model_dtype"] == "float32"
    errors = {}
    for dtype, u in UNIT_ROUNDOFF.items():
        store = _store(path, dtype, tmp_path / f"{dtype}.zarr")
        assert store.attrs["model_dtype"] == dtype
        assert store.attrs["per_sample_dtype"] == reference.attrs["per_sample_dtype"]
        errors[dtype] = _errors(reference, store)
        for kind in ("tensor", "elementwise", "group"):
            assert errors[dtype][kind] <= 8 * u, (dtype, kind, errors[dtype])
        assert errors[dtype]["loss"] <= u, (dtype, errors[dtype])
    # the differences are rounding: float16 (3 more bits) is several times closer than bfloat16
    assert errors["float16"]["elementwise"] < errors["bfloat16"]["elementwise"] / 3, errors


def test_the_loop_reference_runs_a_half_model_too(tiny_model_dir, tmp_path):
    """The batch-1 loop (plain autograd, half-precision parameter gradients folded as float32)
    agrees with the hooks engine on a bfloat16 model within the same bound."""
    path = tiny_model_dir("llama")
    hooks = _store(path, "bfloat16", tmp_path / "hooks.zarr")
    loop = _store(path, "bfloat16", tmp_path / "loop.zarr", engine="loop")
    errors = _errors(hooks, loop)
    assert max(errors["tensor"], errors["elementwise"], errors["group"]) <= 8 * UNIT_ROUNDOFF["bfloat16"], errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_per_sample_products_are_float32_products(dtype):
    """A LayerNorm -> Linear model in half precision: the hooks hand out float32 chunks equal
    to float64 products of the layer's own half-precision inputs and output gradients (a
    half-precision product would be off by ~u/2 = 2e-3 for bfloat16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).to(dtype)
    x = torch.randn(3, 5, 16).to(dtype)
    captured, chunks = {}, {}

    def keep_input(module, args, output):
        captured["input"] = args[0].detach()
        output.register_hook(lambda grad: captured.__setitem__("grad_out", grad.detach()))

    model[1].register_forward_hook(keep_input)
    names = {"0.weight", "1.weight"}

    def sink(name, start, stop, rows):
        chunks[name] = rows.clone()

    with PerSampleGradients(model, sink, only=names) as grads:
        model(x).float().square().sum().backward()
        grads.finish()
    assert {chunk.dtype for chunk in chunks.values()} == {torch.float32}
    inputs, grad_out = captured["input"].double(), captured["grad_out"].double()
    expected = torch.einsum("bso,bsi->boi", grad_out, inputs)
    torch.testing.assert_close(chunks["1.weight"].double(), expected, rtol=1e-5, atol=1e-6)


def test_auto_takes_the_checkpoint_dtype(tiny_tokenizer, tmp_path):
    model = build_tiny("llama", attn_implementation="sdpa", vocab_size=len(tiny_tokenizer),
                       pad_token_id=tiny_tokenizer.pad_token_id)
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        model.to(dtype).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        store = _store(folder, "auto", tmp_path / f"{dtype}.zarr")
        assert store.attrs["model_dtype"] == str(dtype).removeprefix("torch.")
