"""Phase 1 cost ratio per architecture family: our phase 1 / plain batched forward+backward.

    .venv/bin/python benchmarks/families.py

For each family a random model with d_model 256, 4 layers, 4 heads (2 KV heads where
the family has GQA), vocab 8192; T=128, B=8, 32 samples, 2 threads. Each measurement
runs in its own subprocess after a warm-up batch; medians of the repeats. "ours" is
phase 1 as in benchmarks/phase1.py (full-model Fisher + Welford + per-sample attention
gradients written to a store), in steady state: the per-sample time between the first
and last committed micro-batch, without the store's one-off creation and finalisation. A regression in one
family's per-sample path shows as
that family's ratio moving away from the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FAMILIES = ("llama", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3")


def family_model(family: str):
    """A d_model-256, 4-layer random model of `family` (seeded)."""
    import torch
    import transformers

    common = dict(vocab_size=8192, tie_word_embeddings=family in ("llama", "qwen3", "gpt2"))
    llama_like = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, **common)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "qwen2": lambda: transformers.Qwen2Config(**llama_like),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=64, **llama_like),
        "phi3": lambda: transformers.Phi3Config(pad_token_id=0, **llama_like),
        "gpt2": lambda: transformers.GPT2Config(n_embd=256, n_inner=1024, n_layer=4, n_head=4, n_positions=512,
                                                bos_token_id=0, eos_token_id=0, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                                       num_attention_heads=4, max_position_embeddings=512, **common),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


def worker(family: str, variant: str, batch: int, n: int, length: int, threads: int) -> dict:
    import torch
    from harness import floor_pass, random_samples, run_phase1

    from fisher_pipeline.engine.loss import collate

    torch.set_num_threads(threads)
    model = family_model(family)
    vocab = model.config.vocab_size
    warm, samples = random_samples(batch, length, vocab, seed=1), random_samples(n, length, vocab)
    batches = [collate(samples[i:i + batch], 0) for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "floor":
            floor_pass(model, [collate(warm, 0)])
            start = time.perf_counter()
            floor_pass(model, batches)
            return {"sec_per_sample": (time.perf_counter() - start) / n}
        run_phase1(model, warm, batch, Path(tmp) / "warm.zarr", "attention")
        # steady state: the store's one-off creation and finalisation are left out here
        return {"sec_per_sample": run_phase1(model, samples, batch, Path(tmp) / "bench.zarr",
                                        "attention")["steady_sec_per_sample"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "VARIANT"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.n, args.length, args.threads)))
        return
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for family in args.families:
            for variant in ("floor", "ours"):
                cmd = [sys.executable, __file__, "--worker", family, variant, "--batch", str(args.batch),
                       "--n", str(args.n), "--length", str(args.length), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env={**os.environ, "TQDM_DISABLE": "1"})
                seconds = json.loads(out.stdout.splitlines()[-1])["sec_per_sample"]
                results.setdefault((family, variant), []).append(seconds)
    print(f"# d_model 256, 4 layers, T={args.length}, B={args.batch}, N={args.n}, threads={args.threads}, "
          f"medians of {args.repeats}")
    print("| family | floor ms/sample | ours ms/sample | ratio |\n|---|---|---|---|")
    for family in args.families:
        floor, ours = (statistics.median(results[(family, v)]) for v in ("floor", "ours"))
        print(f"| {family} | {1e3 * floor:.1f} | {1e3 * ours:.1f} | {ours / floor:.2f}x |")


if __name__ == "__main__":
    main()
