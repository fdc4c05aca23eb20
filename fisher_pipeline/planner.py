"""What each job of a run needs (host memory, device memory, disk, time), from the model's shapes.

The model is built from its `config.json` on PyTorch's `meta` device (shapes, no weights,
no memory) and described by the package's architecture adapter, so the parameter
selections are exactly those phase 1 resolves from `fisher.per_sample_*` and
`fisher.fisher_m2_*`. Everything else is arithmetic on those shapes. Bytes are decimal
(1 GB = 1e9 B). Index conventions: `N` samples of a task, `B` micro-batch
(`fisher.batch_size`), `T` tokens per sample (`max_length`), `S` elements of the
per-sample selection, `P` parameters, `L` layers, `D` hidden size, `I` MLP width, `V`
vocabulary.

Phase 1, one job, by part (docs/scaling.md explains each term and how far to trust it):

* weights: `P x` the width of `model.dtype` (float32 4 B, bfloat16 / float16 2 B);
* activations kept for the backward, in `model.dtype`: `B T L (8 D + 4 I)` values (Llama
  family; an estimate);
* logits: about three `[B, T, V]` tensors at the start of the backward (the logits in
  `model.dtype`, the float32 log-softmax and its gradient);
* chunk workspace: `B x` the largest row chunk of any parameter that fits
  `fisher.chunk_elements` (`engine/hooks.py`), float32 (per-sample products are float32
  whatever the model's dtype);
* Fisher state: float64 Welford totals of `g^2` and `g` (16 B/param), the elementwise M2 of
  the `fisher_m2` selection (8 B per element) and the group statistics (16 B per group);
* per-sample buffers: two sets of `B x S` in `fisher.per_sample_dtype`;
* host extras: the store writer's copies of two micro-batches of `g_i` (on a GPU; on the
  CPU the writer reads the buffers), the float32 statistics built when the store closes,
  and the interpreter with torch and transformers (`RUNTIME_BYTES`, measured).

On the CPU every term is host memory. On a GPU the device holds the weights, the
forward/backward, the buffers and (unless `fisher.state_device: cpu`) the state, plus the
CUDA context (`CUDA_CONTEXT_BYTES`); the host holds the weights while loading, the
writer's copies, the statistics at close and the state where it lives there.

Time is a rough, conservative rule (`SECONDS_PER_TOKEN_PARAM`): phase 1 on this project's
2-core CPU machine took 1.13 s per sample of SmolLM2 at T = 128 (docs/benchmarks.md),
6.6e-11 s per token-parameter; the planner takes 3x that on the CPU and, on a GPU, a tenth
of it (an assumption, not a measurement: profiles may override `runtime`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, ModelLoadError

# --- bytes per element ---------------------------------------------------------------------
STATE_BYTES = 16  # float64 Welford totals of g^2 and g
M2_BYTES = 8  # float64 elementwise M2 of g^2
GROUP_BYTES = 16  # float64 total and M2 per group
F32 = 4
F64 = 8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: The interpreter with torch, transformers and zarr imported: 0.39 GB peak RSS measured on
#: the CPU machine (`import fisher_pipeline.fisher, transformers, zarr`), plus the tokenizer and data.
RUNTIME_BYTES = 500_000_000
#: A CUDA context and the caching allocator's slack: a few hundred MB to ~1 GB.
CUDA_CONTEXT_BYTES = 1_000_000_000
#: Phase 1 seconds per token x parameter on the CPU: 1.13 s per SmolLM2 sample (134.5 M
#: parameters, T = 128) measured on 2 cores, times 3 for slower or busier machines.
SECONDS_PER_TOKEN_PARAM = 3 * 1.13 / (134.5e6 * 128)
#: How much faster a GPU is taken to be (assumed, not measured here).
GPU_SPEEDUP = 10
#: Disk read by the analysis phases per second (a conservative figure for network filesystems).
READ_BYTES_PER_SECOND = 50e6
#: Minutes every job is given on top of its estimate (start-up, model load, store writes).
FIXED_MINUTES = 5
#: Published configs (the keys of `config.json` that fix parameter shapes), for a model
#: named but not yet on disk (the bundled model before its first run) and for docs/scaling.md.
PUBLISHED_CONFIGS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct; the bundled copy is used when present.
    "SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    # Qwen/Qwen2.5-1.5B: q/k/v projections carry biases (Qwen2 architecture). Qwen2.5-Math-1.5B
    # has the same shapes (its context is 4096 positions).
    "Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    # meta-llama/Llama-3.1-8B
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072),
}


# --- shapes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorShape:
    """One parameter as phase 1 sees it: elements, rows (the hook engine's chunking unit), groups."""

    name: str
    numel: int
    rows: int
    groups: int


def meta_model(config: dict):
    """A causal LM of `config` (a `config.json` mapping with `model_type`) on the meta device."""
    import torch
    import transformers

    config = dict(config)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def model_geometry(model):
    """The adapter's geometry of `model` (works on meta tensors)."""
    from .models.adapters import adapter_for

    return adapter_for(model).geometry()


def tensor_shapes(geometry) -> tuple[TensorShape, ...]:
    """Every parameter of `geometry`, sorted by name."""
    return tuple(TensorShape(name, math.prod(geo.shape), geo.shape[0] if geo.shape else 1, geo.n_groups)
                 for name, geo in sorted(geometry.params.items()))


def largest_chunk(tensors: Iterable[TensorShape], batch_size: int, chunk_elements: int) -> int:
    """Per-sample elements materialised at once for the largest parameter chunk (engine/hooks.py)."""
    largest = 0
    for t in tensors:
        cols = t.numel // t.rows
        step = max(1, chunk_elements // max(batch_size * cols, 1))
        largest = max(largest, batch_size * min(step, t.rows) * cols)
    return largest


def largest_share(costs: Sequence[int], shards: int) -> int:
    """The largest shard when whole tensors of `costs` are split over `shards` jobs, largest first
    (as `shard_plan.param_shares` splits them)."""
    bins = [0] * shards
    for cost in sorted(costs, reverse=True):
        heapq.heapreplace(bins, bins[0] + cost)
    return max(bins)


# --- bytes ---------------------------------------------------------------------------------
def fisher_state_bytes(params: int, m2_elements: int, groups: int) -> int:
    """Float64 Fisher state: 16 B/param + 8 B per M2 element + 16 B per group."""
    return STATE_BYTES * params + M2_BYTES * m2_elements + GROUP_BYTES * groups


def store_statistics_bytes(params: int, m2_elements: int, groups: int) -> int:
    """A store's float32 statistics (fisher, grad_mean, fisher_m2, group and group_m2), uncompressed."""
    return 2 * F32 * params + F32 * m2_elements + 2 * F32 * groups


def per_sample_buffer_bytes(batch_size: int, per_sample_elements: int, width: int = 2) -> int:
    """The accumulator's two sets of `B x S` per-sample buffers (`width` bytes each), used in turn."""
    return 2 * width * batch_size * per_sample_elements


def logits_bytes(batch_size: int, seq_len: int, vocab: int, width: int = F32) -> int:
    """About three `[B, T, V]` tensors at the start of the backward: logits in the model's dtype
    (`width`), the float32 log-softmax and its gradient."""
    return (width + 2 * F32) * batch_size * seq_len * vocab


def activation_bytes(batch_size: int, seq_len: int, n_layers: int, hidden: int, intermediate: int,
                     width: int = F32) -> int:
    """Rough activations kept for the backward: `B T L (8 D + 4 I)` values of `width` bytes (Llama family)."""
    return width * batch_size * seq_len * n_layers * (8 * hidden + 4 * intermediate)


@dataclass(frozen=True)
class Phase1Memory:
    """Memory of one phase 1 job (one task, whole model), by part, in bytes."""

    weights: int
    activations: int
    logits: int
    chunk: int
    state: int  # Fisher state
    buffer: int  # per-sample buffers
    writer: int  # the store writer's host copies of two micro-batches (GPU only)
    statistics: int  # float32 statistics built when the store closes

    @property
    def fixed(self) -> int:
        """What every parameter shard pays in full: weights and the forward/backward."""
        return self.weights + self.activations + self.logits + self.chunk

    def device(self, state_on_host: bool = False) -> int:
        """Bytes where the model runs, the Fisher state there or in host memory."""
        return self.fixed + self.buffer + (0 if state_on_host else self.state)


def phase1_memory(tensors: Sequence[TensorShape], *, n_layers: int, hidden: int, intermediate: int, vocab: int,
                  per_sample: set[str] | frozenset[str], m2: set[str] | frozenset[str], batch_size: int,
                  seq_len: int, chunk_elements: int, model_width: int = F32,
                  per_sample_width: int = 2) -> Phase1Memory:
    """The parts of one phase 1 job over all of `tensors` (see the module docstring)."""
    params = sum(t.numel for t in tensors)
    per_sample_elements = sum(t.numel for t in tensors if t.name in per_sample)
    m2_elements = sum(t.numel for t in tensors if t.name in m2)
    groups = sum(t.groups for t in tensors)
    return Phase1Memory(
        weights=model_width * params,
        activations=activation_bytes(batch_size, seq_len, n_layers, hidden, intermediate, model_width),
        logits=logits_bytes(batch_size, seq_len, vocab, model_width),
        chunk=F32 * largest_chunk(tensors, batch_size, chunk_elements),
        state=fisher_state_bytes(params, m2_elements, groups),
        buffer=per_sample_buffer_bytes(batch_size, per_sample_elements, per_sample_width),
        writer=per_sample_buffer_bytes(batch_size, per_sample_elements, per_sample_width),
        statistics=store_statistics_bytes(params, m2_elements, groups),
    )


def tensor_costs(tensors: Sequence[TensorShape], per_sample: set[str] | frozenset[str],
                 m2: set[str] | frozenset[str], batch_size: int, per_sample_width: int = 2,
                 state_on_host: bool = False) -> list[int]:
    """Per tensor: the bytes a parameter shard holds for it where the model runs (state unless on
    the host, per-sample buffers)."""
    return [(0 if state_on_host else STATE_BYTES * t.numel + M2_BYTES * t.numel * (t.name in m2)
             + GROUP_BYTES * t.groups)
            + 2 * per_sample_width * batch_size * t.numel * (t.name in per_sample) for t in tensors]


# --- the model of a config -----------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: sizes and every parameter's shape and selections."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    checkpoint_dtype: str | None
    tensors: tuple[TensorShape, ...]
    per_sample: frozenset[str]  # the config's per-sample selection
    m2: frozenset[str]  # the config's elementwise-M2 selection
    per_sample_largest: int = 0  # elements of the largest stored tensor (what the pair phases read per sample)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def per_sample_elements(self) -> int:
        return sum(t.numel for t in self.tensors if t.name in self.per_sample)


def read_model_config(model) -> tuple[dict, str]:
    """The `config.json` mapping of `model.path` (a folder, a hub id in the cache, or a GGUF
    file) and a name for it; the bundled model's published config when it is not built yet.

    Raises:
        ModelLoadError: no config can be found (the message names `model.path` and the fix).
    """
    from .config import BUNDLED_MODEL_PATH
    from .models.hub import is_hub_id, resolve

    path = Path(model.path)
    if not path.exists() and is_hub_id(model.path):
        path = resolve(model.path, model.revision)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()), path.name
    if path.is_file() and path.suffix == ".gguf":
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return hf_config.to_dict(), path.name
    if model.path == BUNDLED_MODEL_PATH:
        return {**PUBLISHED_CONFIGS["SmolLM2-135M"], "torch_dtype": "float32"}, "SmolLM2-135M-Instruct"
    raise ModelLoadError(
        f"model.path {model.path!r}: no config.json there (nor a .gguf file, nor a hub id in the local cache), "
        f"so its shapes are unknown. Point model.path at a HuggingFace model folder, a .gguf file, or a hub id "
        f"fetched with `python -m fisher_pipeline download-model org/name`."
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("FISHER_PLAN_CACHE", Path.home() / ".cache" / "fisher_pipeline" / "plan"))


def model_shape(model_config: dict, fisher, name: str = "model") -> ModelShape:
    """The `ModelShape` of a `config.json` mapping under phase 1 options `fisher` (a `FisherConfig`).

    The meta-device build takes seconds (importing torch and transformers); its result is kept
    in a small JSON file per (model config, selections) under `$FISHER_PLAN_CACHE`
    (default `~/.cache/fisher_pipeline/plan`), so a workflow parses fast the second time.
    """
    from . import __version__

    selections = [fisher.per_sample_params, fisher.per_sample_layers, fisher.fisher_m2_params,
                  fisher.fisher_m2_layers]
    key = hashlib.sha256(json.dumps([__version__, model_config, selections], sort_keys=True,
                                    default=list).encode()).hexdigest()[:20]
    cache = _cache_dir() / f"{key}.json"
    if cache.is_file():
        try:
            raw = json.loads(cache.read_text())
            raw["tensors"] = tuple(TensorShape(**t) for t in raw["tensors"])
            raw["per_sample"], raw["m2"] = frozenset(raw["per_sample"]), frozenset(raw["m2"])
            return ModelShape(**{**raw, "name": name})
        except (ValueError, TypeError, KeyError):
            pass  # a stale or damaged entry: build again
    shape = _build_shape(model_config, fisher, name)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        raw = asdict(shape)
        raw["per_sample"], raw["m2"] = sorted(shape.per_sample), sorted(shape.m2)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw))
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable cache only costs time
    return shape


def _build_shape(model_config: dict, fisher, name: str) -> ModelShape:
    from .fisher import stored_selections

    config = {key: value for key, value in model_config.items()
              if key not in ("quantization_config", "auto_map", "architectures", "transformers_version")}
    if "model_type" not in config:
        raise ModelLoadError(f"the config.json of {name!r} names no model_type: is it a HuggingFace model folder?")
    try:
        model = meta_model(config)
    except (ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot build {name!r} ({config['model_type']}) from its config.json: {err}") from None
    geometry = model_geometry(model)
    per_sample, m2 = stored_selections(geometry, fisher)
    tensors = tensor_shapes(geometry)
    attention = geometry.attention
    hf = model.config
    return ModelShape(
        name=name, model_type=config["model_type"], n_layers=attention.n_layers, n_heads=attention.n_heads,
        n_kv_heads=attention.n_kv_heads, hidden=getattr(hf, "hidden_size", 0),
        intermediate=getattr(hf, "intermediate_size", None) or 4 * getattr(hf, "hidden_size", 0),
        vocab=hf.vocab_size, checkpoint_dtype=model_config.get("torch_dtype") or model_config.get("dtype"),
        tensors=tensors, per_sample=frozenset(per_sample), m2=frozenset(m2),
        per_sample_largest=max((t.numel for t in tensors if t.name in per_sample), default=0))


# --- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobPlan:
    """What one job of rule `rule` needs (bytes, minutes), and how many such jobs a run has."""

    rule: str
    count: int
    host: int  # host memory (RSS)
    device: int  # memory on the GPU; 0 on the CPU
    disk: int  # bytes written
    runtime: int  # minutes
    note: str = ""

    @property
    def mem_mb(self) -> int:
        return max(1000, math.ceil(self.host / 1e6 / 100) * 100)

    @property
    def disk_mb(self) -> int:
        return max(100, math.ceil(self.disk / 1e6 / 100) * 100)


@dataclass(frozen=True)
class RunPlan:
    """The jobs of a run, with the settings they were planned for."""

    model: ModelShape
    on_gpu: bool
    model_dtype: str
    jobs: tuple[JobPlan, ...]
    phase1_rules: tuple[str, ...] = field(default=("fisher", "fisher_shard", "fisher_heldout"))

    def job(self, rule: str) -> JobPlan:
        for job in self.jobs:
            if job.rule == rule:
                return job
        raise KeyError(f"no job of rule {rule!r} in this plan (rules: {', '.join(j.rule for j in self.jobs)})")

    def resources(self) -> dict[str, dict[str, int]]:
        """Rule -> {mem_mb, disk_mb, runtime} (MB and minutes, as Snakemake takes them)."""
        return {job.rule: {"mem_mb": job.mem_mb, "disk_mb": job.disk_mb, "runtime": job.runtime}
                for job in self.jobs}


def model_dtype_width(model_dtype: str, checkpoint_dtype: str | None) -> tuple[str, int]:
    """The dtype phase 1 runs the model in (`auto`: the checkpoint's, float32 where it names none)."""
    name = checkpoint_dtype if model_dtype == "auto" else model_dtype
    name = name if name in DTYPE_BYTES else "float32"
    return name, DTYPE_BYTES[name]


def _minutes(seconds: float) -> int:
    return FIXED_MINUTES + math.ceil(seconds / 60)


def plan_run(config, model: ModelShape | None = None) -> RunPlan:
    """Plan every job of the run of `config` (a `PipelineConfig`).

    Args:
        config: the run's config.
        model: its model's shape (default: read from `config.model`, see `model_shape`).

    Returns:
        The plan: one `JobPlan` per rule, for the largest task where tasks differ.
    """
    from .config import BUNDLED_MODEL_PATH

    fisher = config.fisher
    if model is None:
        raw, name = read_model_config(config.model)
        model = model_shape(raw, fisher, name)
    on_gpu = fisher.device == "cuda" or (fisher.device == "auto" and _cuda_visible())
    dtype, width = model_dtype_width(config.model.dtype, model.checkpoint_dtype)
    ps_width = DTYPE_BYTES[fisher.per_sample_dtype]
    tasks = list(config.tasks.values())
    n = max((t.n_samples for t in tasks), default=fisher.batch_size)
    n_heldout = max((t.n_heldout for t in tasks), default=0)
    seq = max((t.max_length for t in tasks), default=128)
    n_tasks = max(len(tasks), 1)
    batch = min(fisher.batch_size, n)
    memory = phase1_memory(model.tensors, n_layers=model.n_layers, hidden=model.hidden,
                           intermediate=model.intermediate, vocab=model.vocab, per_sample=model.per_sample,
                           m2=model.m2, batch_size=batch, seq_len=seq, chunk_elements=fisher.chunk_elements,
                           model_width=width, per_sample_width=ps_width)
    state_on_host = fisher.state_device == "cpu"
    seconds_per_sample = SECONDS_PER_TOKEN_PARAM * seq * model.params / (GPU_SPEEDUP if on_gpu else 1)

    def phase1(rule: str, samples: int, share: float, count: int, note: str) -> JobPlan:
        """A phase 1 job over `samples` samples and a `share` of the parameters' state and buffers."""
        shards = fisher.param_shards if share < 1 else 1
        every = tensor_costs(model.tensors, model.per_sample, model.m2, batch, ps_width)
        fraction = largest_share(every, shards) / max(sum(every), 1)  # the largest share's part of the model
        held = largest_share(tensor_costs(model.tensors, model.per_sample, model.m2, batch, ps_width,
                                          state_on_host), shards)  # kept where the model runs
        state, statistics = memory.state * fraction, memory.statistics * fraction
        if rule == "fisher_shard":  # a partial store keeps float64 totals and M2
            statistics = state
        closing = statistics
        if on_gpu:
            device = memory.fixed + held + CUDA_CONTEXT_BYTES
            host = RUNTIME_BYTES + max(memory.weights, memory.writer * fraction, closing) \
                + (state if state_on_host else 0)
        else:
            device = 0
            host = RUNTIME_BYTES + max(memory.fixed + held + (state if state_on_host else 0), closing)
        stored = samples * model.per_sample_elements * ps_width * fraction
        disk = statistics + stored
        return JobPlan(rule, count, int(host), int(device), int(disk),
                       _minutes(samples * seconds_per_sample), note)

    jobs = []
    if fisher.shards > 1 or fisher.param_shards > 1:
        k, p = fisher.shards, fisher.param_shards
        jobs.append(phase1("fisher_shard", math.ceil(n / k), 1.0 / p if p > 1 else 1.0, n_tasks * k * p,
                           f"samples 1/{k}, parameters 1/{p} per job"))
        merge_disk = memory.statistics + n * model.per_sample_elements * ps_width
        jobs.append(JobPlan("fisher_merge", n_tasks, RUNTIME_BYTES + memory.state, 0, int(merge_disk),
                            _minutes(2 * (memory.state * k + merge_disk) / READ_BYTES_PER_SECOND),
                            "float64 state of the merged shards"))
    else:
        jobs.append(phase1("fisher", n, 1.0, n_tasks, "one job per task"))
    if n_heldout:
        jobs.append(phase1("fisher_heldout", n_heldout, 1.0, n_tasks, "held-out samples"))

    store_read = memory.statistics + n * model.per_sample_elements * ps_width
    largest = max((t.numel for t in model.tensors), default=0)
    def pair_memory(section: str) -> int:
        """Both tasks' per-sample rows of a block of samples (`<section>.sample_block`) of the largest stored
        tensor: three operand copies per task in the compute dtype (the converted rows, `x w`, `x^2 w` or
        `|x|`: `sample_pairs`; float32 for `bfloat16`, plus a bfloat16 copy of what is multiplied), three stored
        blocks (the one in use, the one read ahead, the reader's assembly),
        and the float64 N x N matrices of a parameter's heads (one per head, the whole parameter, the test's
        temporaries). Plus 15% for the allocator: qkov on SmolLM2-shaped stores peaked at 3.11 GB (N = 256)
        and 3.21 GB (N = 512) against 3.51 and 3.54 GB planned (docs/benchmarks.md, the N sweep)."""
        options = getattr(config, section)
        block = min(n, getattr(options, "sample_block", n))
        dtype = getattr(options, "compute_dtype", "float32")
        operand = F64 if dtype == "float64" else F32
        products = 2 * 2 if dtype == "bfloat16" else 0  # each side's product operand again, in bfloat16
        operands = block * model.per_sample_largest * (2 * 3 * operand + products + 3 * ps_width)
        return int(1.15 * (RUNTIME_BYTES + operands + (model.n_heads + 4) * F64 * n * n))

    light = RUNTIME_BYTES + 4 * F32 * largest + 2 * F32 * sum(t.groups for t in model.tensors)
    weights32 = F32 * model.params
    sparsities = len(getattr(config.masks, "sparsities", ()) or ()) or 1
    criteria = 1 + len(getattr(config.masks, "baselines", ()) or ())
    eval_batch = getattr(config.mask_eval, "batch_size", 8)
    forward = width * model.params * 2 + logits_bytes(eval_batch, seq, model.vocab, width) \
        + activation_bytes(eval_batch, seq, model.n_layers, model.hidden, model.intermediate, width) // 4

    def read_minutes(nbytes: float) -> int:
        return _minutes(nbytes / READ_BYTES_PER_SECOND)

    pairs = n_tasks * (n_tasks - 1) // 2
    pair_jobs = pairs if model.per_sample else 0  # no per-sample gradients: the pair phases run nothing
    jobs += [
        JobPlan("importance", n_tasks, light, 0, 100_000_000, read_minutes(memory.statistics),
                "statistics read a tensor at a time"),
        JobPlan("rank_agreement", 1, light, 0, 100_000_000, read_minutes(memory.statistics), ""),
        JobPlan("masks", n_tasks, RUNTIME_BYTES + 6 * F32 * model.params, 0,
                sparsities * criteria * model.params, read_minutes(memory.statistics + weights32),
                "weights, Fisher and every criterion's scores at once"),
        JobPlan("mask_eval", 1, RUNTIME_BYTES + forward, 0, 100_000_000,
                read_minutes(sparsities * criteria * model.params * n_tasks) + math.ceil(
                    sparsities * criteria * n_tasks * n_tasks * getattr(config.mask_eval, "n_samples", 4)
                    * seconds_per_sample / 3 / 60), "forward passes of every mask on held-out samples"),
        JobPlan("overlap", 1, RUNTIME_BYTES + 2 * sparsities * model.params, 0, 100_000_000,
                read_minutes(n_tasks * sparsities * model.params), ""),
        JobPlan("scaled", n_tasks, light, 0, 100_000_000, read_minutes(memory.statistics), ""),
        JobPlan("scaled_cross", 1, RUNTIME_BYTES + 2 * F32 * largest * n_tasks, 0, 100_000_000,
                read_minutes(n_tasks * memory.statistics), ""),
        JobPlan("intervention", pairs, RUNTIME_BYTES + 2 * width * model.params + 2 * F32 * model.params * n_tasks
                + logits_bytes(eval_batch, seq, model.vocab, width), 0, 100_000_000,
                read_minutes(n_tasks * memory.statistics), "the model and every task's Fisher and mean gradient"),
        JobPlan("conflicts", pair_jobs, pair_memory("conflicts"), 0, 100_000_000, read_minutes(2 * store_read),
                "two tasks' per-sample slices"),
        JobPlan("qkov", 2 * pair_jobs, pair_memory("qkov"), 0, 100_000_000, read_minutes(2 * store_read),
                "two tasks' per-sample slices"),
        JobPlan("replication", 2 * pair_jobs, pair_memory("qkov"), 0, 100_000_000,
                read_minutes(2 * store_read), "held-out per-sample slices"),
    ]
    # the bundled SmolLM2, dequantised once in float32 (float32 GGUF read, model, saved copy)
    bundled = config.model.path == BUNDLED_MODEL_PATH
    smollm2 = 134_515_008 * F32
    jobs.append(JobPlan("bundled_model", int(bundled), RUNTIME_BYTES + 3 * smollm2, 0, smollm2, FIXED_MINUTES + 5,
                        "the bundled model, dequantised once"))
    return RunPlan(model, on_gpu, dtype, tuple(jobs))


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --- fitting the machine -------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Memory of the machine the jobs run on: host RAM and (when a GPU runs the model) device memory."""

    host: int
    device: int | None = None


def this_machine(on_gpu: bool, options=None) -> Machine:
    """The memory the jobs get: `options` (the config's `plan` section) where it names it; else host
    RAM (psutil when installed, else /proc/meminfo; a cgroup's limit where smaller) and the first
    CUDA device's memory."""
    host = getattr(options, "host_memory_mb", None)
    host = int(host * 1e6) if host else _host_memory()
    device = getattr(options, "device_memory_mb", None)
    device = int(device * 1e6) if device else None
    if on_gpu and device is None:
        import torch

        if torch.cuda.is_available():
            device = int(torch.cuda.get_device_properties(0).total_memory)
    return Machine(host, device if on_gpu else None)


def _host_memory() -> int:
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        total = 0
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    return min(total, int(limit)) if limit.isdigit() else total


def fit_problems(plan: RunPlan, machine: Machine) -> list[str]:
    """The phase 1 jobs of `plan` that exceed `machine`, one line each (empty: everything fits)."""
    problems = []
    for job in plan.jobs:
        if job.rule not in plan.phase1_rules:
            continue
        if job.host > machine.host:
            problems.append(f"{job.rule}: {fmt_bytes(job.host)} of host memory, the machine has "
                            f"{fmt_bytes(machine.host)}")
        if machine.device is not None and job.device > machine.device:
            problems.append(f"{job.rule}: {fmt_bytes(job.device)} of GPU memory, the device has "
                            f"{fmt_bytes(machine.device)}")
    return problems


def settings_that_fit(config, model: ModelShape, machine: Machine) -> list[str]:
    """Changes of the config (one line each) under which every phase 1 job fits `machine`."""
    import dataclasses

    fisher = config.fisher
    candidates: list[tuple[str, dict, dict]] = []
    if config.model.dtype in ("float32", "auto"):
        candidates.append(("model.dtype: bfloat16", {"dtype": "bfloat16"}, {}))
    if plan_run(config, model).on_gpu and fisher.state_device != "cpu":
        candidates.append(("fisher.state_device: cpu", {}, {"state_device": "cpu"}))
    for batch in (8, 4, 2, 1):
        if batch < fisher.batch_size:
            candidates.append((f"fisher.batch_size: {batch}", {}, {"batch_size": batch}))
    for shards in (2, 4, 8, 16, 32):
        if shards > fisher.param_shards:
            candidates.append((f"fisher.param_shards: {shards}", {}, {"param_shards": shards}))
    def fits(*changes: tuple[str, dict, dict]) -> bool:
        model_changes = {k: v for c in changes for k, v in c[1].items()}
        fisher_changes = {k: v for c in changes for k, v in c[2].items()}
        changed = dataclasses.replace(config, model=dataclasses.replace(config.model, **model_changes),
                                      fisher=dataclasses.replace(fisher, **fisher_changes))
        return not fit_problems(plan_run(changed, model), machine)

    def key(candidate: tuple[str, dict, dict]) -> str:
        return candidate[0].split(":")[0]

    found, settled = [], set()
    for candidate in candidates:  # one setting alone: the largest batch, the fewest shards that fit
        if key(candidate) not in settled and fits(candidate):
            found.append(candidate[0])
            settled.add(key(candidate))
    if not found:  # two settings together, the first few that fit
        for i, first in enumerate(candidates):
            for second in candidates[i + 1:]:
                pair = f"{first[0]} with {second[0]}"
                if key(first) != key(second) and (key(first), key(second)) not in settled and fits(first, second):
                    found.append(pair)
                    settled.add((key(first), key(second)))
            if len(found) >= 3:
                break
    if not found:
        found.append("none of model.dtype: bfloat16, a smaller fisher.batch_size, fisher.state_device: cpu or "
                     "fisher.param_shards up to 32, alone or two together: combine more of them, or use a "
                     "machine with more memory")
    return found


def check_fit(config, plan: RunPlan | None = None, machine: Machine | None = None) -> None:
    """Stop a run whose phase 1 jobs do not fit this machine, naming the plan and settings that would fit.

    Raises:
        ConfigError: a phase 1 job's host or device memory exceeds the machine (the message shows the
            plan of the phase 1 jobs, the machine, and the settings that would fit; `plan.check: false`
            runs anyway).
    """
    plan = plan or plan_run(config)
    machine = machine or this_machine(plan.on_gpu, config.plan)
    problems = fit_problems(plan, machine)
    if not problems:
        return
    fits = settings_that_fit(config, plan.model, machine)
    table = render_jobs([j for j in plan.jobs if j.rule in plan.phase1_rules], plan.on_gpu)
    raise ConfigError(
        "the plan of phase 1 does not fit this machine:\n  " + "\n  ".join(problems) + "\n" + table
        + "\nSettings that would fit (any one): " + "; ".join(fits)
        + ".\nSee `python -m fisher_pipeline plan` and docs/scaling.md; set plan.check: false to run anyway."
    )


# --- samples needed ------------------------------------------------------------------------
def precision_tables(results: str | os.PathLike, tasks: Iterable[str]) -> dict[str, Path]:
    """Task -> phase 2's precision table (`results/importance/{task}/precision.csv`) where it exists."""
    found = {}
    for task in tasks:
        path = Path(results) / "importance" / task / "precision.csv"
        if path.is_file():
            found[task] = path
    return found


def samples_needed_rows(tables: dict[str, Path], target: float) -> list[list[str]]:
    """Per task and unit kind: N, relative SE (median, p90) and the samples for `target` (median, p90)."""
    import csv

    from .phases.importance.precision import samples_needed

    rows = []
    for task, path in tables.items():
        with path.open() as handle:
            for row in csv.DictReader(handle):
                n = int(row["n_samples"])
                median, p90 = float(row["rel_se_median"]), float(row["rel_se_p90"])
                rows.append([task, row["unit"], str(n), f"{median:.3f}", f"{p90:.3f}",
                             str(samples_needed(n, median, target)), str(samples_needed(n, p90, target))])
    return rows


# --- text ----------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """Decimal units, 3 significant digits: 1.77 MB, 53.1 MB, 2.68 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_jobs(jobs: Sequence[JobPlan], on_gpu: bool) -> str:
    """The jobs as a table: rule, jobs, host and device memory, disk, runtime, note (rules without jobs left out)."""
    return table(["rule", "jobs", "host memory", "GPU memory", "disk", "runtime", "note"],
                 [[j.rule, j.count, fmt_bytes(j.host), fmt_bytes(j.device) if on_gpu and j.device else "-",
                   fmt_bytes(j.disk), f"{j.runtime} min", j.note] for j in jobs if j.count])


def render_plan(config, plan: RunPlan, machine: Machine | None = None) -> str:
    """The whole plan as text: the model, each job, whether phase 1 fits, the advised shards."""
    m = plan.model
    fisher = config.fisher
    lines = [f"model: {m.name} ({m.model_type}), {m.params / 1e6:.1f} M parameters, {m.n_layers} layers, "
             f"{m.n_heads} / {m.n_kv_heads} heads, {plan.model_dtype} on the {'GPU' if plan.on_gpu else 'CPU'}",
             f"per-sample selection: {m.per_sample_elements / 1e6:.2f} M elements "
             f"({fisher.per_sample_dtype}), fisher.batch_size {fisher.batch_size}, "
             f"shards {fisher.shards} x param_shards {fisher.param_shards}", "",
             render_jobs(plan.jobs, plan.on_gpu), ""]
    if machine is not None:
        problems = fit_problems(plan, machine)
        where = f"{fmt_bytes(machine.host)} host memory" + (
            f", {fmt_bytes(machine.device)} GPU memory" if machine.device is not None else "")
        if problems:
            lines += [f"phase 1 does NOT fit this machine ({where}):", *(f"  {p}" for p in problems),
                      "settings that would fit (any one): " + "; ".join(settings_that_fit(config, m, machine))]
        else:
            lines.append(f"phase 1 fits this machine ({where}).")
    return "\n".join(lines)
