"""What every analysis phase shares: opening stores, checked reads, names, atomic outputs.

Phases 2, 3, 4 and 7 read only the aggregated arrays of a phase 1 store (`fisher/`,
`grad_mean/`, `group/`, `group_m2/`, ...), so they rerun in seconds when one of their
settings changes; the pair phases 5 and 6 and the held-out `replication` also read
`per_sample/`, through the pair engine (`fisher_pipeline.sample_pairs`, `phases/pair_runner.py`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic
from ..atomic import staged_dir
from ..errors import PhaseInputError, StoreContentError
from ..store import FisherStore, check_same_model, open_store

#: Kinds of store arrays the analysis phases may read; `per_sample/` is deliberately absent.
AGGREGATED_KINDS = ("fisher", "grad_mean", "group", "group_m2", "fisher_m2")


def open_stores(store_paths: Mapping[str, str | os.PathLike], per_sample: bool = False) -> dict[str, FisherStore]:
    """Open the stores of several tasks lazily and check they describe one model.

    Args:
        store_paths: task name -> phase 1 store path, in the order outputs should list tasks.
        per_sample: the phase reads per-sample gradients (see `check_same_model`).

    Raises:
        PhaseInputError: no store given.
        StoreMismatchError: the stores come from different models, parameter sets or Fisher kinds.
    """
    if not store_paths:
        raise PhaseInputError("no Fisher store given: pass at least one task -> store path")
    stores = {task: open_store(path) for task, path in store_paths.items()}
    check_same_model(stores, per_sample=per_sample)
    return stores


def percent(value: float | None) -> str:
    """A share in [0, 1] as a whole percentage for captions; `n/a` for None or NaN."""
    return "n/a" if value is None or value != value else f"{100 * value:.0f}%"


def read_finite(store: FisherStore, kind: str, name: str, dtype: type = np.float64) -> np.ndarray:
    """Read aggregated array `kind/name` of `store` in full, refusing NaN or inf.

    Raises:
        StoreContentError: naming the store path and tensor if any value is not finite.
        ValueError: `kind` is not an aggregated array (a programming error).
    """
    if kind not in AGGREGATED_KINDS:
        raise ValueError(f"analysis phases read only aggregated arrays {AGGREGATED_KINDS}, not {kind!r}")
    values = np.asarray(store.array(kind, name)[...], dtype=dtype)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise StoreContentError(
            f"{kind}/{name} in store {store.path} holds {bad} non-finite value(s) (NaN or inf); "
            "the store is corrupt or phase 1 diverged: rerun phase 1 for this task."
        )
    return values


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


# --- the pair phases (5 and 6) ---------------------------------------------------------------

def warn_few_samples(log, store_a: FisherStore, store_b: FisherStore, task_a: str, task_b: str, what: str) -> None:
    """A test of a pair matrix needs 2 samples per task; say so once per pair, naming both tasks."""
    if store_a.n_samples < 2 or store_b.n_samples < 2:
        log.warning("%s has %d and %s has %d samples: %s needs at least 2 per task; every group of this pair is "
                    "reported untested (status too_few_samples)", task_a, store_a.n_samples, task_b,
                    store_b.n_samples, what)
