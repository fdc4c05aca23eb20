"""Phase 1 speed and memory, side by side: floor vs batch-1 loop vs our phase 1 (vs Opacus).

    .venv/bin/python benchmarks/phase1.py                 # SmolLM2-135M, T=128, B=8 and 16
    .venv/bin/python benchmarks/phase1.py --variants floor loop ours opacus   # with Opacus
    .venv/bin/python benchmarks/phase1.py --rss-scaling   # peak RSS at N=32 vs N=256
    .venv/bin/python benchmarks/phase1.py --fixed-cost    # one-off cost per store

Each measurement runs in its own subprocess (so peak RSS is that variant's alone),
after one warm-up micro-batch; variants are interleaved over repeats and the table
reports medians. Variants:
  floor  plain batched forward + backward (parameter .grad summed over the batch)
  loop   batch-1 forward/backward per sample, accumulating g^2 (the seeds' method)
  ours   phase 1: full-model Fisher + Welford + per-sample attention gradients of all
         layers written to a zarr store (float16), store completed and renamed; M2 of
         g^2 for the first and last layer's attention, as in config/config.yaml
  ours-torch  ours with `fold_kernel: torch` (chunks folded by torch operations instead
         of the compiled one-pass kernel), to measure what the kernel gains
  opacus Opacus's GradSampleModule (benchmarks/requirements.txt; not in the default
         --variants: `--variants floor loop ours opacus`): per-sample gradients of every
         parameter, same model, batches and token-sum loss (loss_reduction="sum"), g^2
         summed over each micro-batch in float32 and added into float64 state. Opacus
         keeps the tied embedding / LM-head weight's two uses summed (its per-parameter
         forward counter); LlamaRMSNorm gets a registered grad sampler (`opacus_grad_sample`);
         rotary embeddings hold no parameters. It holds every parameter's per-sample
         gradients at once after the backward (B x 0.54 GB on SmolLM2) besides the
         summed .grad. `opacus_vs_hooks` checks its per-sample gradients against ours
         (tests/test_benchmark_scripts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from harness import ROOT, floor_pass, peak_rss_mb, random_samples, run_phase1, run_worker


def _model(kind: str):
    import torch
    import transformers

    if kind == "smollm2":
        from fisher_pipeline.config import BUNDLED_MODEL_PATH, ModelConfig
        from fisher_pipeline.models.loading import load_model

        return load_model(ModelConfig(path=str(ROOT / BUNDLED_MODEL_PATH))).model
    torch.manual_seed(0)  # "small": a 4-layer Llama, d_model 256, for the RSS-scaling check
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _loop(model, batches, state: dict) -> None:
    import torch

    from fisher_pipeline.engine.loss import per_sample_loss

    for batch in batches:
        for row in range(batch.input_ids.shape[0]):
            model.zero_grad(set_to_none=True)
            ids = batch.input_ids[row:row + 1]
            logits = model(input_ids=ids, use_cache=False).logits
            per_sample_loss(logits, ids, batch.label_mask[row:row + 1]).sum().backward()
            for name, p in model.named_parameters():
                state.setdefault(name, torch.zeros_like(p)).add_(p.grad.square())


def _llama_rms_norm_grad_sample(layer, activations, backprops):
    """Opacus grad sampler for LlamaRMSNorm (`w * n(x)`): per sample, `sum_s grad_out * n(x)`."""
    import torch
    from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

    x = activations[0].float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(activations[0].dtype)
    return {layer.weight: sum_over_all_but_batch_and_last_n(backprops * normed, layer.weight.dim())}


@contextmanager
def opacus_grad_sample(model):
    """`model` wrapped in Opacus's GradSampleModule as a user would for per-sample gradients.

    loss_reduction="sum" (the loss is the sum of per-sample token-sum losses), batch_first.
    Tied weights (SmolLM2's embed_tokens / lm_head) need nothing: Opacus counts each
    parameter's uses in the forward pass and sums their per-sample gradients. LlamaRMSNorm
    has no built-in grad sampler (only torch.nn.RMSNorm does), so one is registered;
    without it Opacus would fall back to functorch for that layer. Opacus records
    activations only in training mode, so the model is put in train() for the duration
    (Llama has no dropout: the forward pass is unchanged). On exit the hooks and the
    attributes Opacus put on the parameters are removed and the mode is restored.
    """
    from opacus.grad_sample import GradSampleModule, register_grad_sampler
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if LlamaRMSNorm not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(LlamaRMSNorm)(_llama_rms_norm_grad_sample)
    training = model.training
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        yield gsm
    finally:
        gsm.to_standard_module()
        model.train(training)


def opacus_per_sample_grads(gsm, batch) -> dict:
    """One micro-batch through Opacus: parameter name -> per-sample gradients `[b, *shape]`.

    Same loss as ours: the sum over samples of `per_sample_loss` (token-sum NLL).
    """
    from fisher_pipeline.engine.loss import per_sample_loss

    gsm.zero_grad(set_to_none=True)
    logits = gsm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    with warnings.catch_warnings():  # the embedding's input (token ids) needs no gradient: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        per_sample_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
    return {name: p.grad_sample for name, p in gsm._module.named_parameters() if p.requires_grad}


def opacus_vs_hooks(model, batch) -> dict[str, float]:
    """Max relative difference per parameter between Opacus's per-sample gradients and
    our hooks engine's (`PerSampleGradients`) on one micro-batch; a name missing from
    either side is reported as infinity."""
    import torch

    from fisher_pipeline.engine.hooks import PerSampleGradients
    from fisher_pipeline.engine.loss import per_sample_loss

    ours: dict[str, dict[int, object]] = {}

    def sink(name, start, stop, rows):
        ours.setdefault(name, {})[start] = rows.clone()

    with PerSampleGradients(model, sink) as hooks:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        per_sample_loss(logits, batch.input_ids, batch.label_mask).sum().backward()
        hooks.finish()
    ours_full = {name: torch.cat([rows for _, rows in sorted(parts.items())], dim=1) for name, parts in ours.items()}
    with opacus_grad_sample(model) as gsm:
        theirs = {name: g.detach().clone() if g is not None else None
                  for name, g in opacus_per_sample_grads(gsm, batch).items()}
    errors: dict[str, float] = {}
    for name in sorted(set(ours_full) | set(theirs)):
        a, b = ours_full.get(name), theirs.get(name)
        if a is None or b is None or a.shape != b.shape:
            errors[name] = float("inf")
            continue
        errors[name] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    return errors


def _opacus(model, batches, state: dict) -> None:
    import torch

    with opacus_grad_sample(model) as gsm:
        for batch in batches:
            grads = opacus_per_sample_grads(gsm, batch)
            for name, g in grads.items():
                # In place: the per-sample tensor is not needed afterwards (no extra [b, *shape] copy).
                folded = g.square_().sum(0)
                state.setdefault(name, torch.zeros(folded.shape, dtype=torch.float64)).add_(folded)
            del grads
            gsm.zero_grad(set_to_none=True)  # drops grad_sample before the next forward


def worker(args: argparse.Namespace) -> None:
    import torch

    from fisher_pipeline.engine.loss import collate

    torch.set_num_threads(args.threads)
    model = _model(args.model)
    vocab = model.config.vocab_size
    warm = random_samples(args.batch, args.length, vocab, seed=1)
    samples = random_samples(args.n, args.length, vocab)
    batches = [collate(samples[i:i + args.batch], 0) for i in range(0, len(samples), args.batch)]
    extra: dict = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.worker == "floor":
            floor_pass(model, [collate(warm, 0)])
            start = time.perf_counter()
            floor_pass(model, batches)
        elif args.worker == "loop":
            _loop(model, [collate(warm[:1], 0)], {})
            start = time.perf_counter()
            _loop(model, batches, {})
        elif args.worker == "opacus":
            _opacus(model, [collate(warm, 0)], {})
            start = time.perf_counter()
            _opacus(model, batches, {})
        else:  # ours: the compiled fold; ours-torch: the same with torch operations (fold_kernel: torch)
            fold_kernel = "torch" if args.worker == "ours-torch" else "auto"
            run_phase1(model, warm, args.batch, Path(tmp) / "warm.zarr", "attention", fold_kernel=fold_kernel)
            start = time.perf_counter()
            extra = run_phase1(model, samples, args.batch, Path(tmp) / "bench.zarr", "attention", args.trace_rss,
                          fold_kernel)
        elapsed = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    print(json.dumps({"variant": args.worker, "batch": args.batch, "n": args.n,
                      "sec_per_sample": elapsed / args.n, "peak_rss_mb": peak_mb, **extra}))


def fixed_cost(model_kind: str, out: Path) -> dict:
    """One-off costs of a store, apart from the model load: the float64 state, the writer
    (its ~120 per-sample arrays) and `close` (~1,100 statistics arrays, consolidation,
    rename) for a store with one sample's worth of state (values do not matter)."""
    from fisher_pipeline.accumulate import FisherAccumulator
    from fisher_pipeline.config import FisherConfig
    from fisher_pipeline.engine.inputs import input_features
    from fisher_pipeline.fisher import stored_selections
    from fisher_pipeline.models.adapters import adapter_for
    from fisher_pipeline.store import StoreWriter

    model = _model(model_kind)
    geometry = adapter_for(model).geometry()
    per_sample, m2 = stored_selections(geometry, FisherConfig(fisher_m2_layers=(0, -1)))
    start = time.perf_counter()
    accumulator = FisherAccumulator({n: g.shape for n, g in geometry.params.items()},
                                    {n: g.groups for n, g in geometry.params.items()}, m2, per_sample,
                                    weights=dict(model.named_parameters()), input_dims=input_features(model))
    state = time.perf_counter()
    # planned N = N written (0): the usual case, where `close` resizes no per-sample array
    writer = StoreWriter(out, {"task": "bench"}, geometry, per_sample, "float16", 0, 16)
    opened = time.perf_counter()
    for states in (accumulator.fisher, accumulator.grad, accumulator.group, accumulator.saliency,
                   accumulator.input_sq):
        for welford in states.values():
            welford.count = 1
    writer.close(accumulator)
    end = time.perf_counter()
    return {"state_s": state - start, "writer_s": opened - state, "close_s": end - opened, "total_s": end - start}


def _run(variant: str, batch: int, n: int, args: argparse.Namespace, trace_rss: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(batch), "--n", str(n),
           *(["--trace-rss"] if trace_rss else []),
           "--length", str(args.length), "--threads", str(args.threads), "--model", args.model,
           "--dir", str(args.dir)]
    return run_worker(cmd[1], cmd[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["floor", "loop", "ours", "ours-torch", "opacus", "fixed"])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--n", type=int, default=32, help="samples timed per run")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["floor", "loop", "ours"])
    parser.add_argument("--rss-scaling", action="store_true", help="peak RSS of ours at N=32 vs N=256")
    parser.add_argument("--trace-rss", action="store_true", help=argparse.SUPPRESS)  # worker: peaks per micro-batch
    parser.add_argument("--fixed-cost", action="store_true", help="one-off cost per store (state, writer, close)")
    parser.add_argument("--dir", type=Path, default=ROOT / "benchmarks",
                        help="folder the stores are written in (file creation costs differ between disks)")
    args = parser.parse_args()
    if args.worker == "fixed":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print(json.dumps(fixed_cost(args.model, Path(tmp) / "fixed.zarr")))
        return
    if args.worker:
        worker(args)
        return

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, threads={args.threads}, T={args.length}, model={args.model}, "
          f"stores in {args.dir}")
    if args.fixed_cost:
        runs = [_run("fixed", 0, 0, args) for _ in range(args.repeats)]
        print("| part | seconds, median | runs |\n|---|---|---|")
        for key in ("state_s", "writer_s", "close_s", "total_s"):
            values = [run[key] for run in runs]
            print(f"| {key[:-2]} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
        return
    if args.rss_scaling:
        runs = {n: [_run("ours", args.batch, n, args, trace_rss=True) for _ in range(args.repeats)] for n in (32, 256)}
        small, large = (statistics.median(run["peak_rss_mb"] for run in runs[n]) for n in (32, 256))
        print(f"# MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset)')}")
        print("| N | peak RSS (MB), median | runs |\n|---|---|---|")
        for n, value in ((32, small), (256, large)):
            print(f"| {n} | {value:.0f} | {', '.join(str(round(run['peak_rss_mb'])) for run in runs[n])} |")
        print(f"growth N=32 -> 256: {100 * (large / small - 1):+.1f}%")
        for n in (32, 256):
            for run in runs[n]:
                peaks = run["batch_peak_rss_mb"]
                half = len(peaks) // 2
                print(f"N={n}: peak RSS per micro-batch (MB, sampled every 2 ms): {peaks}; "
                      f"median of the first half {statistics.median(peaks[:max(half, 1)]):.0f}, "
                      f"of the second half {statistics.median(peaks[half:]):.0f}")
        return
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for batch in args.batches:
            for variant in args.variants:
                results.setdefault((variant, batch), []).append(_run(variant, batch, args.n, args))
    print("| B | variant | s/sample (median) | ratio to floor | steady s/sample, ratio | fixed s (setup + close) "
          "| peak RSS MB | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        floor = statistics.median(r["sec_per_sample"] for r in results[("floor", batch)]) \
            if ("floor", batch) in results else float("nan")
        for variant in args.variants:
            runs = results[(variant, batch)]
            sec = statistics.median(r["sec_per_sample"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            times = ", ".join(f"{r['sec_per_sample']:.3f}" for r in runs)
            steady = fixed = "-"
            if "steady_sec_per_sample" in runs[0]:
                value = statistics.median(r["steady_sec_per_sample"] for r in runs)
                steady = f"{value:.3f}, {value / floor:.2f}x"
                fixed = f"{statistics.median(r['setup_s'] + r['close_s'] for r in runs):.1f}"
            print(f"| {batch} | {variant} | {sec:.3f} | {sec / floor:.2f}x | {steady} | {fixed} | {rss:.0f} "
                  f"| {times} |")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "phase1.json").write_text(json.dumps({f"{v}@{b}": r for (v, b), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
