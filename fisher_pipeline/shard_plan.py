"""How phase 1 of a task is split into jobs: sample ranges, parameter shares, shard names.

`fisher.shards: K` splits a task's samples into K contiguous ranges of its sample order;
`fisher.param_shards: P` splits the parameters into P size-balanced shares. The workflow
names the K x P jobs' partial stores from here when it reads the config, so this module
imports nothing heavy; `fisher_pipeline.shards` writes and merges the partial stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .layout import ModelGeometry


def shard_ranges(n_samples: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous `[start, stop)` ranges of `n_samples` for `n_shards` shards, sizes differing by <= 1."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    bounds = [k * n_samples // n_shards for k in range(n_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shard_name(sample_shard: int, sample_shards: int, param_shard: int, param_shards: int) -> str:
    """File name of one shard's partial store: `s{k}of{K}-p{p}of{P}.zarr`."""
    return f"s{sample_shard}of{sample_shards}-p{param_shard}of{param_shards}.zarr"


def shard_names(sample_shards: int, param_shards: int) -> list[str]:
    """Every shard's file name, sample shard major."""
    return [shard_name(k, sample_shards, p, param_shards) for k in range(sample_shards) for p in range(param_shards)]


def check_sample_shards(shards: int, tasks: Iterable[Any]) -> None:
    """Refuse `fisher.shards` above a task's `n_samples` (a shard would hold no sample).

    Args:
        shards: the number of sample shards K.
        tasks: the `TaskConfig`s to check.

    Raises:
        ConfigError: naming the key, the task and the largest allowed value.
    """
    for spec in tasks:
        if shards > spec.n_samples:
            raise ConfigError(
                f"fisher.shards = {shards} exceeds tasks.{spec.name}.n_samples = {spec.n_samples}: some sample "
                f"shards would hold no sample. Set fisher.shards to at most {spec.n_samples} (each task needs at least "
                f"one sample per shard), or raise n_samples."
            )


def share_weight(n_elements: int, m2: bool, per_sample: bool, batch_size: int) -> int:
    """Bytes of accumulator state a parameter costs its job (what `param_shares` balances).

    float64 sums of `g^2` and `g` (16 B per element), the elementwise M2 of `g^2` (8 B) where
    selected, and the micro-batch of per-sample gradients (4 B x batch_size) where stored.
    """
    return n_elements * (16 + 8 * m2 + 4 * batch_size * per_sample)


def param_shares(geometry: ModelGeometry, n_shares: int, m2_names: Iterable[str] = (),
                 per_sample_names: Iterable[str] = (), batch_size: int = 1) -> list[list[str]]:
    """A deterministic, size-balanced partition of the model's parameters into `n_shares`.

    Greedy longest-processing-time: parameters by decreasing `share_weight` (then name)
    each go to the share with the least weight so far (then the lowest index). Depends only
    on the geometry and the selections, so every job of a run computes the same partition.

    Returns:
        `n_shares` lists of parameter names, each sorted.

    Raises:
        ConfigError: more shares than parameters.
    """
    names = sorted(geometry.params)
    if n_shares > len(names):
        raise ConfigError(
            f"fisher.param_shards = {n_shares} exceeds the {len(names)} parameter tensors of this model: every "
            f"share needs at least one. Set fisher.param_shards to at most {len(names)}."
        )
    m2, per_sample = set(m2_names), set(per_sample_names)
    weights = {n: share_weight(math.prod(geometry.params[n].shape), n in m2, n in per_sample,
                               batch_size) for n in names}
    loads = [0] * n_shares
    shares: list[list[str]] = [[] for _ in range(n_shares)]
    for name in sorted(names, key=lambda n: (-weights[n], n)):
        target = min(range(n_shares), key=lambda i: (loads[i], i))
        shares[target].append(name)
        loads[target] += weights[name]
    return [sorted(share) for share in shares]
