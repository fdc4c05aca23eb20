"""What every analysis phase shares: opening stores, checked reads, names, atomic outputs.

Phases read only the aggregated arrays of a phase 1 store (`fisher/`, `grad_mean/`,
`group/`, `group_m2/`), never `per_sample/`, so they stay cheap enough to rerun in
seconds when one of their settings changes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic
from ..atomic import staged_dir
from ..store import FisherStore, open_store

#: Kinds of store arrays the analysis phases may read; `per_sample/` is deliberately absent.
AGGREGATED_KINDS = ("fisher", "grad_mean", "group", "group_m2", "fisher_m2")

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_HEAD = re.compile(r"^([qkvo])\.h(\d+)$")
_NEURON = re.compile(r"^neuron\.(\d+)$")


def layer_of(param: str) -> int | None:
    """Layer index of parameter `param` (`...layers.3.` or `...h.3.`), None outside layers."""
    match = _LAYER.search(param)
    return int(match.group(1)) if match else None


def parse_group_name(name: str) -> tuple[str, int | None]:
    """Block and index of a group name: `"k.h1"` -> `("k", 1)`, `"neuron.17"` -> `("neuron", 17)`.

    Any other name (`"all"`) is its own block with no index.
    """
    if match := _HEAD.match(name):
        return match.group(1), int(match.group(2))
    if match := _NEURON.match(name):
        return "neuron", int(match.group(1))
    return name, None


def open_stores(store_paths: Mapping[str, str | os.PathLike]) -> dict[str, FisherStore]:
    """Open the stores of several tasks lazily and check they describe one model.

    Args:
        store_paths: task name -> phase 1 store path, in the order outputs should list tasks.

    Raises:
        ValueError: no store given, or the stores come from different models / parameter sets.
    """
    if not store_paths:
        raise ValueError("no Fisher store given: pass at least one task -> store path")
    stores = {task: open_store(path) for task, path in store_paths.items()}
    check_same_model(stores)
    return stores


def check_same_model(stores: Mapping[str, FisherStore]) -> None:
    """Refuse stores that were made from different weights or hold different parameters."""
    (first_task, first), *others = stores.items()
    for task, store in others:
        for key in ("weights_hash", "model_id"):
            if store.attrs.get(key) != first.attrs.get(key):
                raise ValueError(
                    f"stores of tasks {first_task!r} ({first.path}) and {task!r} ({store.path}) differ in "
                    f"{key} ({first.attrs.get(key)!r} vs {store.attrs.get(key)!r}): cross-task phases need "
                    "stores of one model; rerun phase 1 for the stale task."
                )
        if store.param_names != first.param_names:
            missing = sorted(set(first.param_names) ^ set(store.param_names))[:5]
            raise ValueError(
                f"stores {first.path} and {store.path} hold different parameters (e.g. {missing}): "
                "rerun phase 1 with the same model and config for every task."
            )


def read_finite(store: FisherStore, kind: str, name: str, dtype: type = np.float64) -> np.ndarray:
    """Read aggregated array `kind/name` of `store` in full, refusing NaN or inf.

    Raises:
        ValueError: naming the store path and tensor if any value is not finite, or if
            `kind` is not an aggregated array.
    """
    if kind not in AGGREGATED_KINDS:
        raise ValueError(f"analysis phases read only aggregated arrays {AGGREGATED_KINDS}, not {kind!r}")
    values = np.asarray(store.array(kind, name)[...], dtype=dtype)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(
            f"{kind}/{name} in store {store.path} holds {bad} non-finite value(s) (NaN or inf); "
            "the store is corrupt or phase 1 diverged: rerun phase 1 for this task."
        )
    return values


def sparsity_key(sparsity: float) -> str:
    """The name a sparsity gets in mask stores and tables (`0.5` -> `"0.5"`)."""
    return f"{sparsity:g}"


def write_table(table: pd.DataFrame, directory: Path, stem: str) -> dict[str, Path]:
    """Write `table` as `<stem>.parquet` and `<stem>.csv` into `directory`."""
    paths = {f"{stem}_parquet": directory / f"{stem}.parquet", f"{stem}_csv": directory / f"{stem}.csv"}
    table.to_parquet(paths[f"{stem}_parquet"], index=False)
    table.to_csv(paths[f"{stem}_csv"], index=False)
    return paths


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory next to `out_dir`; on success it replaces `out_dir` atomically.

    An interrupted phase leaves the previous outputs (or nothing), never a half-written or
    half-deleted `out_dir`; its staging directory is removed by the next run
    (`fisher_pipeline.atomic.staged_dir`).
    """
    with staged_dir(out_dir) as staging:
        yield staging


def relocate(paths: Mapping[str, Path], staging: Path, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Map paths written under `staging` to where they live once `out_dir` replaced it."""
    return atomic.relocate(paths, staging, out_dir)
