"""The fast path (hooks, batched, padded) against the slow obvious one (batch-1 loop)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fisher_pipeline.config import FisherConfig
from fisher_pipeline.data import TokenizedSample
from fisher_pipeline.engine.hooks import PerSampleGradients, UnsupportedLayerError
from fisher_pipeline.fisher import compute_fisher
from fisher_pipeline.models.adapters import adapter_for
from tiny_models import FAMILIES, VOCAB, build_tiny


def random_samples(n: int, seed: int, min_len: int = 5, max_len: int = 24) -> list[TokenizedSample]:
    """Samples of mixed lengths (so batches are padded), some with prompt-only prefixes."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        mask = torch.ones(length, dtype=torch.bool)
        mask[: 1 + (k % 3) * 2] = False  # vary the unlabelled prefix
        samples.append(TokenizedSample(f"s{seed}-{k}", ids, mask))
    return samples


def loop_reference(model, samples, labels: str = "empirical") -> dict[str, torch.Tensor]:
    """Per-sample gradients, one sample at a time, plain autograd: name -> [n, *shape]."""
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, p in model.named_parameters()}
    for sample in samples:
        model.zero_grad(set_to_none=True)
        ids = sample.input_ids[None]
        logits = model(input_ids=ids, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        (nll * sample.label_mask[1:]).sum().backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    return {n: torch.stack(g) for n, g in grads.items()}


def per_sample_from_hooks(model, samples, batch_size: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients from the hooks engine, batched and right-padded."""
    from fisher_pipeline.engine.loss import collate, per_sample_loss

    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collate(chunk, pad_id=0)
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}

        def sink(name, r0, r1, rows, pieces=pieces):
            pieces.setdefault(name, []).append((r0, rows.clone()))

        with PerSampleGradients(model, sink, chunk_elements=256) as hooks:  # tiny chunks: chunking is exercised
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            per_sample_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
            hooks.finish()
        for name, parts in pieces.items():
            parts.sort(key=lambda x: x[0])
            collected.setdefault(name, []).append(torch.cat([p for _, p in parts], dim=1))
    return {n: torch.cat(g) for n, g in collected.items()}


def assert_close(fast: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    scale = ref.abs().max().clamp_min(1e-12)
    err = (fast - ref).abs().max() / scale
    assert err <= rtol, f"{name}: max relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_gradients_equal_batch1_loop(family):
    model = build_tiny(family)
    samples = random_samples(7, seed=1)
    reference = loop_reference(model, samples)
    fast = per_sample_from_hooks(model, samples, batch_size=4)
    names = dict(model.named_parameters())  # tied weights appear once
    assert set(fast) == set(names), f"missing per-sample grads: {set(names) - set(fast)}"
    for name in names:
        assert fast[name].shape == reference[name].shape
        assert_close(fast[name], reference[name], f"{family}:{name}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_equals_mean_of_squares_of_loop(family, attn):
    """Full phase 1 (hooks, batches of 4 right-padded samples, chunked rows) against float64
    E[g^2], E[g] and per-group E[sum g^2] of the batch-1 loop (no padding); (E g)^2 must fail."""
    model = build_tiny(family, attn_implementation=attn)
    adapter = adapter_for(model)
    samples = random_samples(9, seed=2)
    assert all(len({len(s.input_ids) for s in samples[k:k + 4]}) > 1 for k in (0, 4)), "batches not padded"
    config = FisherConfig(batch_size=4, chunk_elements=256)  # tiny chunks: weights are split into row chunks
    acc = compute_fisher(model, adapter, samples, config, pad_id=0).accumulator
    reference = loop_reference(model, samples)
    assert acc.count == len(samples)
    assert set(acc.shapes) == set(dict(model.named_parameters()))
    assert any(acc.fisher[name].m2 is not None for name in acc.shapes)
    for name in acc.shapes:
        g = reference[name].double()
        expected = g.square().mean(0)
        assert_close(acc.fisher[name].mean, expected, f"{family}/{attn} E[g^2] {name}")
        assert_close(acc.grad[name].mean, g.mean(0), f"{family}/{attn} E[g] {name}")
        if acc.fisher[name].m2 is not None:  # the attention projections, by default
            m2 = (g.square() - expected).square().sum(0)
            assert_close(acc.fisher[name].m2, m2, f"{family}/{attn} M2 of g^2 {name}")
        groups = adapter.group_spec(name, tuple(g.shape[1:])).reduce(g.square()).mean(0)
        assert_close(acc.group[name].mean, groups, f"{family}/{attn} group {name}")
        wrong = g.mean(0).square()
        err = (acc.fisher[name].mean - wrong).abs().max() / expected.abs().max()
        assert err > 1e-2, f"{name}: Fisher indistinguishable from (E g)^2"


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_fisher_hooks_equal_loop_engine(family):
    """Sampled labels: the batched hooks engine and the batch-1 loop engine draw the same
    labels per sample and give the same statistics."""
    model = build_tiny(family)
    adapter = adapter_for(model)
    samples = random_samples(9, seed=2)
    base = FisherConfig(batch_size=4, labels="sampled", chunk_elements=256)
    fast = compute_fisher(model, adapter, samples, base, pad_id=0).accumulator
    slow = compute_fisher(model, adapter, samples, dataclasses.replace(base, engine="loop"), pad_id=0).accumulator
    assert fast.count == slow.count == len(samples)
    for name in fast.shapes:
        assert_close(fast.fisher[name].mean, slow.fisher[name].mean, f"fisher {name}")
        assert_close(fast.grad[name].mean, slow.grad[name].mean, f"grad_mean {name}")
        assert_close(fast.group[name].mean, slow.group[name].mean, f"group {name}")


def test_group_m2_matches_per_sample_group_sums():
    model = build_tiny("llama")
    adapter = adapter_for(model)
    samples = random_samples(6, seed=3)
    acc = compute_fisher(model, adapter, samples, FisherConfig(batch_size=4), pad_id=0).accumulator
    reference = loop_reference(model, samples)
    name = "model.layers.1.self_attn.q_proj.weight"
    per_sample = adapter.group_spec(name, reference[name].shape[1:]).reduce(reference[name].double().square())
    torch.testing.assert_close(acc.group[name].mean, per_sample.mean(0), rtol=1e-5, atol=0)
    m2 = ((per_sample - per_sample.mean(0)) ** 2).sum(0)
    torch.testing.assert_close(acc.group[name].m2, m2, rtol=1e-4, atol=0)


def test_unsupported_layer_is_named():
    model = build_tiny("llama")
    model.extra = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        PerSampleGradients(model, lambda *a: None)


# --- CUDA ----------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device visible to torch: the CUDA path is checked where one is")


def _phase1_with_per_sample(model, samples, config):
    """compute_fisher on `model`'s device; returns the accumulator, and per-sample g_i and gates on the CPU."""
    collected: dict[str, list[torch.Tensor]] = {}

    def keep(batch, losses, grads, gates):
        for name, g in grads.items():
            collected.setdefault(name, []).append(g.float().cpu().clone())
        for name, gate in gates.items():
            collected.setdefault(f"gate/{name}", []).append(gate.cpu().clone())

    acc = compute_fisher(model, adapter_for(model), samples, config, pad_id=0, on_commit=keep)
    return acc.accumulator, {name: torch.cat(parts) for name, parts in collected.items()}


@needs_cuda
@pytest.mark.parametrize("state_device", [None, "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_phase1_equals_cpu(family, state_device):
    """Phase 1 with the model on the GPU (float32 compute; the float64 state on the GPU or,
    with `state_device: cpu`, in host memory) gives the CPU's per-sample gradients and statistics."""
    model = build_tiny(family)
    samples = random_samples(9, seed=2)
    config = FisherConfig(batch_size=4, chunk_elements=256, per_sample_dtype="float32", state_device=state_device)
    cpu, cpu_grads = _phase1_with_per_sample(model, samples, config)
    gpu, gpu_grads = _phase1_with_per_sample(model.cuda(), samples, config)
    assert gpu.count == cpu.count == len(samples) and set(gpu_grads) == set(cpu_grads)
    for name, g in cpu_grads.items():
        if name.startswith("gate/"):  # a gate may vanish exactly (Qwen3's q rows): scaled by the group's |g w|
            scale = torch.maximum(g.abs().max(), (2 * cpu.saliency[name[5:]].mean.max()).sqrt())
            assert ((gpu_grads[name] - g).abs().max() / scale.clamp_min(1e-30)) <= 1e-4, f"{family} {name}"
        else:
            assert_close(gpu_grads[name], g, f"{family} per-sample {name}", rtol=1e-4)
    for name in cpu.shapes:
        expected_device = "cpu" if state_device == "cpu" else "cuda"
        assert gpu.fisher[name].total.device.type == expected_device
        for state in ("fisher", "grad", "group", "saliency"):
            ours, theirs = getattr(gpu, state)[name], getattr(cpu, state)[name]
            assert_close(ours.mean.cpu(), theirs.mean, f"{family} {state} {name}", rtol=1e-4)
            if theirs.m2 is not None:
                assert_close(ours.m2.cpu(), theirs.m2, f"{family} {state} M2 {name}", rtol=1e-4)
    assert set(gpu.input_sq) == set(cpu.input_sq) and cpu.input_sq
    for name, theirs in cpu.input_sq.items():
        assert gpu.input_sq[name].count == theirs.count
        assert_close(gpu.input_sq[name].mean.cpu(), theirs.mean, f"{family} input_sq {name}", rtol=1e-4)
