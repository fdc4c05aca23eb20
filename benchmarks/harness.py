"""What the benchmark scripts share: random token samples, the forward+backward floor, phase 1
into a store with per-micro-batch timing, peak memory, and running one measurement in a fresh
process. Every script measures side by side in one run; this module only holds the pieces.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_samples(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    from fisher_pipeline.data import TokenizedSample

    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(length, dtype=torch.bool)
    mask[0] = False
    return [TokenizedSample(f"b{k}", torch.randint(0, vocab, (length,), generator=gen), mask) for k in range(n)]


def floor_pass(model, batches) -> None:
    from fisher_pipeline.engine.loss import per_sample_loss

    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        per_sample_loss(logits, batch.input_ids, batch.label_mask).sum().backward()


class RssSampler:
    """Largest resident set size seen between two `mark()`s, sampled every 2 ms by a thread.

    ru_maxrss gives the peak of the whole run only; these per-micro-batch peaks show
    whether memory accumulates (a trend) or only fluctuates (the run's peak is then the
    largest of more draws the more micro-batches there are). Sampling can miss a peak
    shorter than 2 ms: the values are lower bounds.
    """

    def __init__(self) -> None:
        import threading

        self.peaks: list[int] = []
        self._current = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._current = max(self._current, self.rss_mb())

    def mark(self) -> None:
        self.peaks.append(max(self._current, self.rss_mb()))
        self._current = 0

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run_phase1(model, samples, batch_size: int, out: Path, per_sample: str, trace_rss: bool = False,
          fold_kernel: str = "auto") -> dict:
    """Phase 1 into a store; returns the steady per-sample time and the fixed costs."""
    from fisher_pipeline.config import FisherConfig
    from fisher_pipeline.fisher import compute_fisher, stored_selections
    from fisher_pipeline.models.adapters import adapter_for
    from fisher_pipeline.store import StoreWriter

    start = time.perf_counter()
    # the shipped default (config/config.yaml): M2 of g^2 for the first and last layer's attention
    config = FisherConfig(batch_size=batch_size, per_sample_params=per_sample, fisher_m2_layers=(0, -1),
                          fold_kernel=fold_kernel)
    adapter = adapter_for(model)
    geometry = adapter.geometry()
    writer = StoreWriter(out, {"task": "bench"}, geometry, stored_selections(geometry, config)[0], "float16",
                         len(samples), batch_size)
    commits: list[float] = []
    sampler = RssSampler() if trace_rss else None

    def on_commit(batch, losses, grads, gates):
        writer.append(batch.ids, batch.n_tokens, losses, grads, gates, lent=True)  # as run_fisher does
        commits.append(time.perf_counter())
        if sampler is not None:
            sampler.mark()

    result = compute_fisher(model, adapter, samples, config, pad_id=0, on_commit=on_commit)
    before_close = time.perf_counter()
    writer.close(result.accumulator)
    end = time.perf_counter()
    steady = (commits[-1] - commits[0]) / (len(samples) - batch_size) if len(commits) > 1 else float("nan")
    extra = {"batch_peak_rss_mb": sampler.stop()} if sampler is not None else {}
    return {"steady_sec_per_sample": steady, "close_s": end - before_close,
            "setup_s": commits[0] - start - steady * batch_size, **extra}


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MB.

    Linux's `VmHWM` where there is one: `ru_maxrss` survives `execve`, so a worker started
    by a parent that once held 1 GB would report at least that.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str | Path, args: list[str]) -> dict:
    """Run `script --worker ... args` in a fresh process (its own peak RSS, no warm caches of
    another variant) and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])
