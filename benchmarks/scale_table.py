"""Phase 1 memory and disk at scale, from published model configs (no weights, nothing timed).

    .venv/bin/python benchmarks/scale_table.py            # the tables of docs/scaling.md
    .venv/bin/python benchmarks/scale_table.py --batch-size 8 --seq-len 512

Each model is built on PyTorch's `meta` device (shapes only, no memory) and described by
our own architecture adapter (`adapter_for(model).geometry()`), so the parameter
selections are exactly those phase 1 resolves from `fisher.per_sample_params`,
`fisher.per_sample_layers` and `fisher.fisher_m2_*`. Everything below is arithmetic on
those shapes, done by `fisher_pipeline.planner` (which `python -m fisher_pipeline plan` and
the workflow's resources use); this script lays it out for the selections compared below.
Bytes are decimal (1 GB = 1e9 bytes).

What is counted, per task (one phase 1 job):

* per-sample storage: `N x S x 2` bytes (float16) or `x 4` (float32), `S` = elements of
  the per-sample selection;
* Fisher state: float64 Welford totals of `g^2` and `g` of every parameter (16 B/param),
  plus the elementwise M2 of the `fisher_m2` selection (8 B/param selected), plus the
  head/neuron group statistics (float64 total and M2 per group);
* model weights in float32 (phase 1 loads float32);
* per-sample buffers: the accumulator's two sets of `B x S` in the stored dtype (float16),
  used in turn so that the store writer reads one while the next micro-batch fills the
  other;
* the chunk workspace: `B x` the largest row chunk of any parameter (`chunk_elements`,
  as in `engine/hooks.py`), float32;
* logits: `[B, T, V]` float32, about three copies alive at the start of the backward
  (logits, the saved log-softmax, their gradient);
* activations: a rough estimate for the Llama family, `B x T x L x (8 D + 4 I)` float32
  values (residual stream, normed inputs, rotated Q/K, V, attention output, the MLP's
  gate, up, activation and product); measure before relying on it;
* host memory: the store writer's copies of two micro-batches of `g_i`, the float32
  statistics `StoreWriter.close` builds before writing, and the Fisher state itself
  with `fisher.state_device: cpu`.

"Fits" adds weights, activations, logits, chunk workspace and one job's share of the
Fisher state (unless it lives in host memory) and per-sample buffers, and compares with
the device's memory. Parameter shards (`fisher.param_shards: P`) give each job a share
of whole tensors; the share is computed with a greedy largest-first split of the real
tensors (as `fisher_pipeline.shard_plan.param_shares` does), so the largest tensor (the
embedding) bounds how far P helps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fisher_pipeline import planner  # noqa: E402
from fisher_pipeline.planner import (  # noqa: E402 (the arithmetic, shared with the planner)
    F32,
    GROUP_BYTES,
    M2_BYTES,
    STATE_BYTES,
    TensorShape,
    fmt_bytes,
    largest_share,
    meta_model,
    table,
)

SMOLLM2_DIR = ROOT / "resources" / "models" / "SmolLM2-135M-Instruct"

#: Published configs (config.json of each checkpoint), the keys that fix parameter shapes.
CONFIGS: dict[str, dict] = planner.PUBLISHED_CONFIGS

N_SAMPLES = (32, 256, 1024)
DEVICES_GB = (24, 80)
FIRST_LAST = (0, -1)


def published_config(name: str) -> dict:
    """The config of model `name`; SmolLM2's from the bundled model folder when present."""
    if name == "SmolLM2-135M" and (SMOLLM2_DIR / "config.json").is_file():
        bundled = json.loads((SMOLLM2_DIR / "config.json").read_text())
        return {key: bundled[key] for key in CONFIGS[name] if key in bundled}
    return dict(CONFIGS[name])


@dataclass(frozen=True)
class Tensor:
    """One parameter as phase 1 sees it, with the selections the tables compare."""

    name: str
    numel: int
    rows: int
    groups: int
    per_sample: bool  # in the default per-sample selection (attention, every layer)
    per_sample_first_last: bool  # in attention, layers [0, -1]
    m2: bool  # in the config.yaml fisher_m2 selection (attention, layers [0, -1])
    m2_all: bool  # in the schema-default fisher_m2 selection (attention, every layer)

    def stored(self, selection: str) -> bool:
        """Whether per-sample selection `selection` (`every`, `first_last`, `none`) stores this tensor."""
        return {"every": self.per_sample, "first_last": self.per_sample_first_last, "none": False}[selection]


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of one model, from its geometry."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    tensors: tuple[Tensor, ...]

    @property
    def params(self) -> int:
        """Trainable parameters, tied weights once."""
        return sum(t.numel for t in self.tensors)

    def per_sample(self, selection: str = "every") -> int:
        """Elements of one sample's stored `g_i` under `selection` (see `SELECTIONS`)."""
        return sum(t.numel for t in self.tensors if t.stored(selection))

    def m2(self, all_layers: bool = False) -> int:
        """Elements with an elementwise M2: attention of layers [0, -1] (config.yaml) or of every layer."""
        return sum(t.numel for t in self.tensors if (t.m2_all if all_layers else t.m2))

    @property
    def groups(self) -> int:
        """Head / neuron / whole-tensor groups over all parameters."""
        return sum(t.groups for t in self.tensors)

    def shapes(self) -> tuple[TensorShape, ...]:
        return tuple(TensorShape(t.name, t.numel, t.rows, t.groups) for t in self.tensors)

    def names(self, selection: str) -> set[str]:
        """Parameters stored per sample under `selection`."""
        return {t.name for t in self.tensors if t.stored(selection)}

    def largest_chunk(self, batch_size: int, chunk_elements: int) -> int:
        """Per-sample elements materialised at once for the largest parameter chunk (engine/hooks.py)."""
        return planner.largest_chunk(self.shapes(), batch_size, chunk_elements)


def model_sizes(name: str, model) -> ModelSizes:
    """Describe `model` through our architecture adapter (works on meta tensors)."""
    geometry = planner.model_geometry(model)
    per_sample = set(geometry.select("attention"))
    first_last = set(geometry.select("attention", FIRST_LAST))
    tensors = tuple(
        Tensor(name=t.name, numel=t.numel, rows=t.rows, groups=t.groups, per_sample=t.name in per_sample,
               per_sample_first_last=t.name in first_last, m2=t.name in first_last, m2_all=t.name in per_sample)
        for t in planner.tensor_shapes(geometry)
    )
    config = model.config
    return ModelSizes(name, geometry.attention.n_layers, geometry.attention.n_heads, geometry.attention.n_kv_heads,
                      config.hidden_size, config.intermediate_size, config.vocab_size,
                      bool(getattr(config, "tie_word_embeddings", False)), tensors)


# --- bytes: fisher_pipeline.planner's arithmetic on the selections compared -----------------

def fisher_state(sizes: ModelSizes, m2_all_layers: bool = False) -> int:
    """Bytes of the Fisher state: 16 B/param + 8 B per M2 element + group statistics."""
    return planner.fisher_state_bytes(sizes.params, sizes.m2(m2_all_layers), sizes.groups)


def store_statistics(sizes: ModelSizes) -> int:
    """Bytes of a store's statistics on disk before compression: fisher, grad_mean, fisher_m2, groups (float32)."""
    return planner.store_statistics_bytes(sizes.params, sizes.m2(), sizes.groups)


def per_sample_buffer(sizes: ModelSizes, batch_size: int, selection: str = "every", width: int = 2) -> int:
    """Bytes of the accumulator's two sets of `B x S` per-sample buffers in the stored dtype."""
    return planner.per_sample_buffer_bytes(batch_size, sizes.per_sample(selection), width)


def writer_copies(sizes: ModelSizes, batch_size: int, selection: str = "every", width: int = 2) -> int:
    """Host bytes of the store writer: a micro-batch being written and the next one's copy."""
    return planner.per_sample_buffer_bytes(batch_size, sizes.per_sample(selection), width)


def logits_bytes(sizes: ModelSizes, batch_size: int, seq_len: int) -> int:
    """About three `[B, T, V]` float32 tensors at the start of the backward."""
    return planner.logits_bytes(batch_size, seq_len, sizes.vocab)


def activation_bytes(sizes: ModelSizes, batch_size: int, seq_len: int) -> int:
    """Rough float32 activations kept for the backward: `B T L (8 D + 4 I)` values (Llama family)."""
    return planner.activation_bytes(batch_size, seq_len, sizes.n_layers, sizes.hidden, sizes.intermediate)


def job_memory(sizes: ModelSizes, batch_size: int, seq_len: int, chunk_elements: int,
               selection: str = "every") -> planner.Phase1Memory:
    """One phase 1 job (float32 model, `fisher_m2` on layers [0, -1]), by part."""
    return planner.phase1_memory(sizes.shapes(), n_layers=sizes.n_layers, hidden=sizes.hidden,
                                 intermediate=sizes.intermediate, vocab=sizes.vocab,
                                 per_sample=sizes.names(selection), m2={t.name for t in sizes.tensors if t.m2},
                                 batch_size=batch_size, seq_len=seq_len, chunk_elements=chunk_elements)


def host_memory(sizes: ModelSizes, batch_size: int, selection: str = "every", state_on_host: bool = False) -> int:
    """Host bytes of one job on a GPU (no shards) after loading: the writer's copies while running, then
    the float32 statistics `StoreWriter.close` builds; plus the Fisher state if it lives there."""
    during = max(writer_copies(sizes, batch_size, selection), store_statistics(sizes))
    return during + (fisher_state(sizes) if state_on_host else 0)


def tensor_costs(sizes: ModelSizes, batch_size: int, selection: str = "every",
                 state_on_host: bool = False) -> list[int]:
    """Per tensor: the device bytes a parameter shard holds for it (state unless on the host, buffers)."""
    return planner.tensor_costs(sizes.shapes(), sizes.names(selection), {t.name for t in sizes.tensors if t.m2},
                                batch_size, state_on_host=state_on_host)


def min_param_shards(sizes: ModelSizes, capacity: int, batch_size: int, seq_len: int, chunk_elements: int,
                     selection: str = "every", state_on_host: bool = False, limit: int = 64) -> int | None:
    """Fewest parameter shards whose every job fits `capacity` device bytes; None if none up to `limit` does."""
    memory = job_memory(sizes, batch_size, seq_len, chunk_elements, selection)
    costs = tensor_costs(sizes, batch_size, selection, state_on_host)
    for shards in range(1, limit + 1):
        if memory.fixed + largest_share(costs, shards) <= capacity:
            return shards
    return None


# --- tables -----------------------------------------------------------------------------

def fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


#: Per-sample selections compared: key -> label (`fisher.per_sample_params` / `per_sample_layers`).
SELECTIONS = {"every": "attention, every layer", "first_last": "attention, layers [0, -1]", "none": "none"}


def render(models: Sequence[ModelSizes], batch_size: int, seq_len: int, chunk_elements: int) -> str:
    """The markdown tables of docs/scaling.md."""
    every, first_last = "every", "first_last"
    out = ["### Models\n", table(
        ["model", "parameters", "layers", "heads / KV heads", "per-sample elements: attention, every layer",
         "attention, layers [0, -1]", "weights float32"],
        [[m.name, fmt_count(m.params), m.n_layers, f"{m.n_heads} / {m.n_kv_heads}", fmt_count(m.per_sample(every)),
          fmt_count(m.per_sample(first_last)), fmt_bytes(F32 * m.params)] for m in models])]

    rows = []
    for m in models:
        for selection in (every, first_last):
            for dtype, width in (("float16", 2), ("float32", 4)):
                per = width * m.per_sample(selection)
                rows.append([m.name, SELECTIONS[selection], dtype, fmt_bytes(per),
                             *(fmt_bytes(n * per) for n in N_SAMPLES)])
    out += ["\n### Per-sample gradients on disk, per task\n",
            table(["model", "per-sample selection", "dtype", "per sample", *(f"N = {n}" for n in N_SAMPLES)], rows)]

    out += [f"\n### Phase 1 memory of one job (B = {batch_size}, T = {seq_len}, chunk_elements = {chunk_elements})\n",
            table(["model", "weights float32", "Fisher state, 16 B/param", "+ M2, attention [0, -1]",
                   "(M2, attention every layer)", "+ group stats", "per-sample buffers 2 x B x S float16, every layer",
                   "(layers [0, -1])", "chunk workspace", "logits, 3 x B T V", "activations (estimate)"],
                  [[m.name, fmt_bytes(F32 * m.params), fmt_bytes(STATE_BYTES * m.params),
                    fmt_bytes(M2_BYTES * m.m2()), f"({fmt_bytes(M2_BYTES * m.m2(True))})",
                    fmt_bytes(GROUP_BYTES * m.groups), fmt_bytes(per_sample_buffer(m, batch_size, every)),
                    f"({fmt_bytes(per_sample_buffer(m, batch_size, first_last))})",
                    fmt_bytes(F32 * m.largest_chunk(batch_size, chunk_elements)),
                    fmt_bytes(logits_bytes(m, batch_size, seq_len)),
                    fmt_bytes(activation_bytes(m, batch_size, seq_len))]
                   for m in models])]

    def fit(m: ModelSizes, batch: int, selection: str, gb: int, state_on_host: bool) -> str:
        memory = job_memory(m, batch, seq_len, chunk_elements, selection)
        shards = min_param_shards(m, int(gb * 1e9), batch, seq_len, chunk_elements, selection, state_on_host)
        if shards is None:
            return ("no: float32 weights alone" if memory.weights > gb * 1e9 else
                    "no: every shard's part alone" if memory.fixed > gb * 1e9 else "no: the largest tensor's share")
        if shards == 1:
            return "yes"
        share = largest_share(tensor_costs(m, batch, selection, state_on_host), shards)
        return f"param_shards: {shards} ({fmt_bytes(memory.fixed + share)} per job)"

    batches = sorted({batch_size, 4}, reverse=True)
    cases = [(m, selection, batch) for m in models for selection in SELECTIONS for batch in batches]
    rows = []
    for m, selection, batch in cases:
        memory = job_memory(m, batch, seq_len, chunk_elements, selection)
        rows.append([m.name, SELECTIONS[selection], batch, fmt_bytes(memory.device()), fmt_bytes(memory.fixed),
                     *(fit(m, batch, selection, gb, False) for gb in DEVICES_GB)])
    out += [f"\n### What fits one device, state on the device (T = {seq_len})\n",
            table(["model", "per-sample selection", "B", "one job", "every shard pays (weights, activations, "
                   "logits, chunk)", *(f"{gb} GB device" for gb in DEVICES_GB)], rows)]

    rows = []
    for m, selection, batch in cases:
        memory = job_memory(m, batch, seq_len, chunk_elements, selection)
        rows.append([m.name, SELECTIONS[selection], batch, fmt_bytes(memory.device(state_on_host=True)),
                     fmt_bytes(host_memory(m, batch, selection, state_on_host=True)),
                     *(fit(m, batch, selection, gb, True) for gb in DEVICES_GB)])
    out += [f"\n### What fits one device, state in host memory (`fisher.state_device: cpu`, T = {seq_len})\n",
            table(["model", "per-sample selection", "B", "one job: device", "one job: host",
                   *(f"{gb} GB device" for gb in DEVICES_GB)], rows)]

    out += ["\n### Statistics on disk and host memory, per task\n",
            table(["model", "store statistics, float32 (fisher, grad_mean, fisher_m2 [0, -1], groups)",
                   "partial store statistics, float64, per sample shard", "float32 weights (loading)",
                   f"store writer copies, 2 x B x S float16, every layer (B = {batch_size})"],
                  [[m.name, fmt_bytes(store_statistics(m)), fmt_bytes(fisher_state(m)), fmt_bytes(F32 * m.params),
                    fmt_bytes(writer_copies(m, batch_size))] for m in models])]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="fisher.batch_size (default 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample, T (default 128)")
    parser.add_argument("--chunk-elements", type=int, default=1 << 21, help="fisher.chunk_elements")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    models = [model_sizes(name, meta_model(published_config(name))) for name in args.models]
    print(render(models, args.batch_size, args.seq_len, args.chunk_elements), end="")


if __name__ == "__main__":
    main()
