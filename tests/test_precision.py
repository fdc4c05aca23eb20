"""Phase 2's precision table: the relative standard error of each head / neuron group's Fisher,
against a brute-force numpy computation from the per-sample gradients, and its 1/sqrt(N)
extrapolation against a store four times larger drawn from the same distribution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fisher_pipeline.phases.importance.compute import group_table, run_importance
from fisher_pipeline.phases.importance.precision import precision_table, samples_needed
from fisher_pipeline.roles import HEAD_BLOCKS
from fisher_pipeline.store import open_store
from store_factory import llama_layout, make_store


def _gradients(shapes, n_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Per-sample gradients whose per-element scale is fixed (seed 0) and whose samples vary (`seed`)."""
    scales = np.random.default_rng(0)
    rng = np.random.default_rng(seed)
    return {name: np.exp(scales.normal(size=shape)) * rng.normal(size=(n_samples, *shape))
            for name, shape in shapes.items()}


def _brute_force_relative_se(store, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unit kind -> relative standard error of every group with a positive Fisher, from `grads` (float64)."""
    out = {"head": [], "neuron": []}
    for name, g in grads.items():
        spec = store.group_spec(name)
        squares = np.moveaxis(np.square(g.astype(np.float64)), spec.dim + 1, 1)
        per_position = squares.reshape(len(g), squares.shape[1], -1).sum(-1)  # [N, positions along dim]
        contributions = np.stack([per_position[:, spec.label_array == k].sum(1) for k in range(len(spec.keys))], 1)
        fisher = contributions.mean(0)
        relative = contributions.std(0, ddof=1) / np.sqrt(len(g)) / fisher
        for (block, index), value, f in zip(spec.keys, relative, fisher, strict=True):
            kind = "head" if block in HEAD_BLOCKS and index is not None else "neuron" if block == "neuron" else None
            if kind and f > 0:
                out[kind].append(value)
    return {kind: np.array(values) for kind, values in out.items()}


def test_precision_table_equals_a_brute_force_computation(tmp_path):
    shapes, specs = llama_layout()
    n = 12
    grads = _gradients(shapes, n, seed=1)
    store = open_store(make_store(tmp_path / "t.zarr", n_samples=n, task="t", shapes=shapes, specs=specs,
                                  grads=grads))
    table = precision_table(group_table(store, "t")[0], n, "t").set_index("unit")
    expected = _brute_force_relative_se(store, grads)
    assert set(table.index) == {"head", "neuron"}
    for kind, values in expected.items():
        row = table.loc[kind]
        assert row["groups"] == len(values) and row["n_samples"] == n
        np.testing.assert_allclose(row["rel_se_median"], np.median(values), rtol=1e-4)
        np.testing.assert_allclose(row["rel_se_p90"], np.quantile(values, 0.9), rtol=1e-4)
        assert row["samples_for_1pct_median"] == samples_needed(n, row["rel_se_median"], 0.01)
        assert row["samples_for_10pct_p90"] == samples_needed(n, row["rel_se_p90"], 0.10)


def test_the_extrapolation_predicts_a_larger_run(tmp_path):
    """The relative SE at N = 16, scaled by sqrt(16 / 64), predicts the one measured on 64
    other samples of the same distribution (medians over the groups, within 15%)."""
    shapes, specs = llama_layout()
    tables = {}
    for n, seed in ((16, 2), (64, 3)):
        store = open_store(make_store(tmp_path / f"{n}.zarr", n_samples=n, task="t", shapes=shapes, specs=specs,
                                      grads=_gradients(shapes, n, seed)))
        tables[n] = precision_table(group_table(store, "t")[0], n, "t").set_index("unit")
    for kind in ("head", "neuron"):
        predicted = tables[16].loc[kind, "rel_se_median"] * np.sqrt(16 / 64)
        measured = tables[64].loc[kind, "rel_se_median"]
        assert abs(predicted / measured - 1) < 0.15, (kind, predicted, measured)
        needed = tables[16].loc[kind, "samples_for_10pct_median"]
        assert abs(needed / samples_needed(64, measured, 0.10) - 1) < 0.35


def test_samples_needed_and_the_table_without_standard_errors():
    assert samples_needed(32, 0.14, 0.01) == 6272  # 32 * 14^2
    assert samples_needed(32, 0.14, 0.14) == 32
    groups = pd.DataFrame({"block": ["q", "neuron"], "index": [0, 1], "fisher_sum": [1.0, 2.0], "se": [np.nan] * 2})
    assert precision_table(groups, 1, "t").empty


@pytest.mark.parametrize("n_samples", [8])
def test_importance_writes_the_precision_table(tmp_path, n_samples):
    store = make_store(tmp_path / "prose.zarr", n_samples=n_samples, task="prose")
    paths = run_importance(store, tmp_path / "importance")
    table = pd.read_csv(paths["precision_csv"])
    assert list(table["unit"]) == ["head", "neuron"] and (table["n_samples"] == n_samples).all()
    assert (table["samples_for_1pct_median"] >= table["samples_for_3pct_median"]).all()


def test_heavy_tailed_gradients_make_the_extrapolation_a_lower_bound(tmp_path):
    """Student t(3) gradients (their squares have no finite variance): the relative SE measured
    on 16 samples, scaled to 256, under-states the one measured on 256 other samples, in every
    one of three replicates (median over groups, by more than 10%), so the samples it says a
    target needs are too few: the table's lower bound, as documented. (Gaussian gradients:
    `test_the_extrapolation_predicts_a_larger_run`.)"""
    shapes, specs = llama_layout()
    scales = np.random.default_rng(0)
    scale = {name: np.exp(scales.normal(size=shape)) for name, shape in shapes.items()}
    for replicate in range(3):
        tables = {}
        for n in (16, 256):
            rng = np.random.default_rng([replicate, n])
            grads = {name: scale[name] * rng.standard_t(3, size=(n, *shape)) for name, shape in shapes.items()}
            store = open_store(make_store(tmp_path / f"{replicate}-{n}.zarr", n_samples=n, task="t", shapes=shapes,
                                          specs=specs, grads=grads, batch_size=64))
            tables[n] = precision_table(group_table(store, "t")[0], n, "t").set_index("unit")
        for kind in ("head", "neuron"):
            predicted = tables[16].loc[kind, "rel_se_median"] * np.sqrt(16 / 256)
            measured = tables[256].loc[kind, "rel_se_median"]
            assert predicted < 0.9 * measured, (replicate, kind, predicted, measured)
