"""Phase 1: per-sample gradients -> Welford Fisher statistics -> the task's store.

Two engines feed the same accumulator:
  * `hooks` (default): one batched forward/backward per micro-batch, per-sample
    gradients from module hooks (`engine/hooks.py`);
  * `loop`: one forward/backward per sample with plain autograd -- slow and obvious,
    kept as the reference the tests hold the fast path to.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .accumulate import FisherAccumulator
from .config import FisherConfig, PipelineConfig, TaskConfig, config_hash, phase1_settings
from .data import TokenizedSample, load_task
from .data.tasks import load_heldout
from .engine.engines import HookEngine, LoopEngine
from .engine.hooks import compute_dtype
from .engine.inputs import input_features
from .engine.loss import Batch, collate
from .errors import ConfigError
from .layout import ModelGeometry
from .models.adapters import ArchitectureAdapter, adapter_for
from .models.loading import LoadedModel, load_model
from .shard_plan import check_sample_shards, param_shares, shard_ranges
from .shards import ShardInfo, ShardWriter, all_skipped_error
from .store import StoreWriter

log = logging.getLogger(__name__)

#: on_commit(batch, losses `[b]`, per-sample gradients {name: `[b, *shape]`}, per-sample gates {name: `[b, G]`}).
CommitCallback = Callable[[Batch, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]], None]


def stored_selections(geometry: ModelGeometry, config: FisherConfig) -> tuple[set[str], set[str]]:
    """Parameters whose per-sample gradients are stored, and those with elementwise M2.

    Raises:
        ConfigError: a selection that should select something matches no parameter.
    """
    per_sample = geometry.select(config.per_sample_params, config.per_sample_layers,
                                 what="fisher.per_sample_params", layers_what="fisher.per_sample_layers")
    m2 = geometry.select(config.fisher_m2_params, config.fisher_m2_layers,
                         what="fisher.fisher_m2_params", layers_what="fisher.fisher_m2_layers")
    return set(per_sample), set(m2)


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "fisher.device is 'cuda' but no CUDA device is visible to torch (torch.cuda.is_available() is "
            "False: no GPU, no driver, or a CPU-only torch build). Set fisher.device to 'cpu', or 'auto' "
            "to use a GPU only where there is one."
        )
    return torch.device(device)


def check_context_length(adapter: ArchitectureAdapter, task: TaskConfig) -> None:
    """Refuse a task whose `max_length` exceeds the positions the model was trained for."""
    context = adapter.context_length
    if context is not None and task.max_length > context:
        raise ConfigError(
            f"tasks.{task.name}.max_length = {task.max_length} exceeds the model's context length "
            f"({context} positions, max_position_embeddings of {type(adapter.model).__name__}): positions "
            f"past it have no learned embedding or were never trained. Set max_length <= {context}."
        )


@dataclass
class Phase1Result:
    """What phase 1 measured, before it is written anywhere."""

    accumulator: FisherAccumulator
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)


def compute_fisher(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    samples: list[TokenizedSample],
    config: FisherConfig,
    pad_id: int,
    on_commit: CommitCallback | None = None,
    progress: bool = False,
    param_names: set[str] | None = None,
) -> Phase1Result:
    """Fold every sample's gradient into Fisher statistics (phase 1 without the store).

    Args:
        model: causal LM (float32, or bfloat16 / float16 with float32 per-sample products;
            eval mode) on its device.
        adapter: its architecture adapter (group partitions).
        samples: tokenized samples, processed in order.
        config: phase 1 options (engine, labels, batch size, selections).
        pad_id: token id used for right padding (masked out).
        on_commit: called after each committed micro-batch (e.g. to write per-sample data
            and gates).
        progress: show a progress bar (samples/s, ETA) on stderr.
        param_names: accumulate (and hand to `on_commit`) only these parameters
            (default all); the forward/backward still runs through the whole model.
    """
    model.eval()
    first = next(model.parameters())
    device = first.device
    geometry = adapter.geometry()
    per_sample, m2 = stored_selections(geometry, config)
    params = {n: g for n, g in geometry.params.items() if param_names is None or n in param_names}
    values = {n: p for n, p in model.named_parameters() if n in params}
    accumulator = FisherAccumulator(
        {n: g.shape for n, g in params.items()},
        {n: g.groups for n, g in params.items()},
        m2 & set(params),
        per_sample & set(params),
        device,
        compute_dtype(first.dtype),  # float32 per-sample products for a half-precision model
        per_sample_dtype=getattr(torch, config.per_sample_dtype),
        state_device=config.state_device,
        fold_kernel=config.fold_kernel,
        weights=values,
        input_dims=input_features(model, only=set(params)),
    )
    engine_type = HookEngine if config.engine == "hooks" else LoopEngine
    engine = engine_type(model, accumulator, config)
    batch_size = config.batch_size if config.engine == "hooks" else 1
    result = Phase1Result(accumulator)
    bar = tqdm(total=len(samples), unit="sample", disable=not progress, file=sys.stderr, mininterval=2.0,
               dynamic_ncols=False, ascii=True)
    for start in range(0, len(samples), batch_size):
        pending = samples[start:start + batch_size]
        while pending:
            batch = collate(pending, pad_id).to(device)
            losses, bad = engine.stage(batch)
            if not bad:
                per_sample = accumulator.commit()
                if on_commit is not None:
                    on_commit(batch, losses, per_sample, accumulator.sample_gates)
                break
            for row, reason in sorted(bad.items()):
                log.warning("sample %s skipped: %s", pending[row].id, reason)
                result.skipped.append((pending[row].id, reason))
            pending = [s for row, s in enumerate(pending) if row not in bad]
        bar.update(len(samples[start:start + batch_size]))
    bar.close()
    return result


def phase1_config_hash(config: PipelineConfig, task: str, heldout: bool = False) -> str:
    """Hash of everything besides the weights that determines task `task`'s store
    (`config.phase1_settings`: the task's settings and phase 1's, less the keys that never
    change a store; the held-out store's counts `n_heldout` and says which sample set it holds)."""
    spec, fisher = phase1_settings(dataclasses.asdict(config.tasks[task]), dataclasses.asdict(config.fisher), heldout)
    if heldout:
        spec["sample_set"] = "heldout"
    return config_hash(spec, fisher)


@dataclass
class _Phase1Inputs:
    """What every phase 1 job of a task loads before computing."""

    loaded: LoadedModel
    adapter: ArchitectureAdapter
    geometry: ModelGeometry
    samples: list[TokenizedSample]
    device: torch.device
    attrs: dict


def _load_inputs(config: PipelineConfig, task: str, heldout: bool = False) -> _Phase1Inputs:
    if task not in config.tasks:
        raise ConfigError(f"task {task!r} is not in the config; its tasks are: {', '.join(config.tasks) or 'none'}")
    if heldout and config.tasks[task].n_heldout < 2:
        raise ConfigError(f"a held-out store of task {task!r} needs tasks.{task}.n_heldout >= 2 (it is "
                          f"{config.tasks[task].n_heldout}): the held-out checks test means over samples")
    device = resolve_device(config.fisher.device)
    loaded = load_model(config.model, device)
    adapter = adapter_for(loaded.model)
    check_context_length(adapter, config.tasks[task])
    geometry = adapter.geometry()
    samples = (load_heldout if heldout else load_task)(config.tasks[task], loaded.tokenizer)
    attrs = {
        "model_id": loaded.model_id,
        "model_type": loaded.model.config.model_type,
        "model_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "weights_hash": loaded.weights_hash,
        "task": task,
        "fisher_kind": config.fisher.labels,
        "engine": config.fisher.engine,
        "config_hash": phase1_config_hash(config, task, heldout),
        "package_version": __version__,
        "sample_set": "heldout" if heldout else "analysis",
        "n_requested": config.tasks[task].n_heldout if heldout else config.tasks[task].n_samples,
        "max_length": config.tasks[task].max_length,
    }
    return _Phase1Inputs(loaded, adapter, geometry, samples, device, attrs)


def _in_task_order(skipped: list[tuple[str, str]], samples: list[TokenizedSample]) -> list[tuple[str, str]]:
    """Skipped samples in the task's sample order (as a one-job run and a merge of shards list them)."""
    position = {sample.id: i for i, sample in enumerate(samples)}
    return sorted(skipped, key=lambda item: position[item[0]])


def run_fisher(config: PipelineConfig, task: str, out: str | Path, progress: bool = True,
               heldout: bool = False) -> Path:
    """Phase 1 for one task: load model and task, compute, write `out` atomically.

    One job for the whole task, whatever `fisher.shards` / `fisher.param_shards` say
    (`run_fisher_shard` and `shards.merge_shards` split it).

    Args:
        heldout: store the task's held-out samples (`data.tasks.load_heldout`: the
            `n_heldout` after the analysed ones) instead of the analysed ones; the store's
            `sample_set` attribute says which. The held-out checks of phases 5 to 7 read its
            mean and per-sample gradients; it keeps no elementwise Fisher (`fisher/`), which
            they take from the analysed store.
    """
    inputs = _load_inputs(config, task, heldout)
    loaded, samples = inputs.loaded, inputs.samples
    per_sample, _ = stored_selections(inputs.geometry, config.fisher)
    writer = StoreWriter(
        out, inputs.attrs, inputs.geometry, per_sample, config.fisher.per_sample_dtype, len(samples),
        shard_samples=config.fisher.batch_size, elementwise_fisher=not heldout,
    )
    log.info("phase 1: task %s, %d %s samples, model %s on %s (fold_kernel %s, state_device %s)", task,
             len(samples), inputs.attrs["sample_set"], loaded.model_id, inputs.device, config.fisher.fold_kernel,
             config.fisher.state_device)
    try:
        result = compute_fisher(
            loaded.model, inputs.adapter, samples, config.fisher, loaded.tokenizer.pad_token_id,
            on_commit=lambda batch, losses, grads, gates: writer.append(batch.ids, batch.n_tokens, losses, grads,
                                                                        gates, lent=True),
            progress=progress,
        )
        if result.accumulator.count == 0:
            raise all_skipped_error(task, len(samples), result.skipped)
        for sample_id, reason in _in_task_order(result.skipped, samples):
            writer.skip(sample_id, reason)
        return writer.close(result.accumulator)
    except BaseException:  # a failure while closing too (a full disk): no partial store left behind
        writer.abort()
        raise


def run_fisher_shard(config: PipelineConfig, task: str, out: str | Path, sample_shard: tuple[int, int] = (0, 1),
                     param_shard: tuple[int, int] = (0, 1), progress: bool = True) -> Path:
    """One job of a sharded phase 1: a range of the task's samples, a share of the parameters.

    Runs the whole forward/backward on samples `shard_plan.shard_ranges(N, K)[k]` of the task,
    accumulates only parameter share `p` of `shard_plan.param_shares(...)` and writes the
    partial store `out` (layout in `fisher_pipeline/shards/`) atomically; `shards.merge_shards`
    combines the K x P partial stores into the task's store.

    Args:
        sample_shard: (k, K), this job's sample shard and the number of sample shards.
        param_shard: (p, P), this job's parameter share and the number of shares.

    Raises:
        ConfigError: K above the task's `n_samples`, P above the model's parameter count,
            or an index outside its range.
    """
    (k, n_k), (p, n_p) = sample_shard, param_shard
    for what, index, count in (("sample shard", k, n_k), ("parameter share", p, n_p)):
        if not 0 <= index < count:
            raise ConfigError(f"{what} {index} of {count} does not exist: the index must be in 0..{count - 1}")
    if task not in config.tasks:
        raise ConfigError(f"task {task!r} is not in the config; its tasks are: {', '.join(config.tasks) or 'none'}")
    check_sample_shards(n_k, [config.tasks[task]])
    inputs = _load_inputs(config, task)
    loaded, samples, geometry = inputs.loaded, inputs.samples, inputs.geometry
    per_sample, m2 = stored_selections(geometry, config.fisher)
    share = param_shares(geometry, n_p, m2, per_sample, config.fisher.batch_size)[p]
    start, stop = shard_ranges(len(samples), n_k)[k]
    info = ShardInfo(k, n_k, p, n_p, start, stop, len(samples), tuple(share))
    writer = ShardWriter(out, inputs.attrs, geometry, info, per_sample & set(share), config.fisher.per_sample_dtype,
                         config.fisher.batch_size)
    log.info("phase 1: task %s, %s: samples %d..%d of %d, %d of %d parameter tensors, model %s on %s", task,
             info.label, start, stop, len(samples), len(share), len(geometry.params), loaded.model_id, inputs.device)
    try:
        result = compute_fisher(
            loaded.model, inputs.adapter, samples[start:stop], config.fisher, loaded.tokenizer.pad_token_id,
            on_commit=lambda batch, losses, grads, gates: writer.append(batch.ids, batch.n_tokens, losses, grads,
                                                                        gates),
            progress=progress, param_names=set(share),
        )
        return writer.close(result.accumulator, _in_task_order(result.skipped, samples))
    except BaseException:
        writer.abort()
        raise
