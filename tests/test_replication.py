"""Held-out replication of phases 5 and 6 (`fisher_pipeline.phases.replication`).

Synthetic analysed and held-out stores, written by the production writer, draw per-sample
gradients of tasks A and B from one distribution (a planted conflict in every head, the
same per-coordinate signal in both halves) or from two (the signal only in the analysed
half). Planted conflicts replicate at about the rate the held-out tests' power predicts;
discoveries whose held-out half carries no signal replicate at most at about alpha, and
the cells' signs then agree half the time. The held-out statistic itself is checked against
brute-force numpy on the held-out gradients, in the discovery run's metric.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fisher_pipeline.errors import PhaseInputError
from fisher_pipeline.layout import GroupSpec
from fisher_pipeline.phases.conflicts import ConflictsOptions
from fisher_pipeline.phases.conflicts.compute import pair_conflicts
from fisher_pipeline.phases.qkov import QkovOptions
from fisher_pipeline.phases.qkov.compute import pair_qkov
from fisher_pipeline.phases.replication import ReplicationOptions
from fisher_pipeline.phases.replication.compute import replicate_pair_tables, run_replication, summarise
from fisher_pipeline.store import FisherStore
from store_factory import make_store

HEAD_DIM, N_HEADS, D_MODEL = 8, 4, 8
QP = "model.layers.0.self_attn.q_proj.weight"
OP = "model.layers.0.self_attn.o_proj.weight"
PER_SAMPLE = (QP, OP)
SHAPES = {QP: (N_HEADS * HEAD_DIM, D_MODEL), OP: (D_MODEL, N_HEADS * HEAD_DIM)}
SPECS = {QP: GroupSpec.heads(0, ("q", N_HEADS, HEAD_DIM)), OP: GroupSpec.heads(1, ("o", N_HEADS, HEAD_DIM))}
N_ANALYSED, N_HELDOUT = 32, 16


def gradients(rng: np.random.Generator, means: dict, sd: dict, n: int) -> dict[str, np.ndarray]:
    return {p: (means[p] + sd[p] * rng.standard_normal((n, *SHAPES[p]))).astype(np.float32) for p in PER_SAMPLE}


def head_strength(param: str, strength: float) -> np.ndarray:
    """Per coordinate: `strength x h / 3` in head h (head 0 carries no signal, head 3 the most)."""
    index = np.arange(N_HEADS * HEAD_DIM) // HEAD_DIM * strength / (N_HEADS - 1)
    return np.broadcast_to(index[:, None] if param == QP else index[None, :], SHAPES[param])


def pair_stores(tmp_path, seed: int, strength: float, heldout_signal: bool):
    """Analysed and held-out stores of tasks a and b: in head h, A's mean is `+s_h u`, B's `-s_h u`
    (u a random sign pattern times the coordinate's noise sd, s_h = `head_strength`)."""
    rng = np.random.default_rng(seed)
    sd = {p: np.exp(0.3 * rng.standard_normal(SHAPES[p])) for p in PER_SAMPLE}
    pattern = {p: rng.choice([-1.0, 1.0], size=SHAPES[p]) * sd[p] * head_strength(p, 1.0) for p in PER_SAMPLE}
    signal = {"a": {p: strength * pattern[p] for p in PER_SAMPLE},
              "b": {p: -strength * pattern[p] for p in PER_SAMPLE}}
    none = {p: np.zeros(SHAPES[p]) for p in PER_SAMPLE}
    stores, heldout = {}, {}
    for task in "ab":
        stores[task] = FisherStore(make_store(
            tmp_path / f"{seed}-{task}.zarr", n_samples=N_ANALYSED, seed=seed, task=task, shapes=SHAPES,
            specs=SPECS, grads=gradients(rng, signal[task], sd, N_ANALYSED), per_sample=PER_SAMPLE, batch_size=16))
        heldout[task] = FisherStore(make_store(
            tmp_path / f"{seed}-{task}-heldout.zarr", n_samples=N_HELDOUT, seed=seed + 100, task=task, shapes=SHAPES,
            specs=SPECS, grads=gradients(rng, signal[task] if heldout_signal else none, sd, N_HELDOUT),
            per_sample=PER_SAMPLE, batch_size=16, first_id=N_ANALYSED, attrs={"sample_set": "heldout"}))
    return stores, heldout


def replicate(stores, heldout, alpha: float = 0.05) -> pd.DataFrame:
    conflicts, _ = pair_conflicts(stores["a"], stores["b"], ConflictsOptions(top_pairs=0), task_a="a", task_b="b")
    qkov = pair_qkov(stores["a"], stores["b"], QkovOptions(top_k=0, n_bootstrap=0), task_a="a", task_b="b")["cells"]
    return pd.concat([replicate_pair_tables("conflicts", conflicts, stores, heldout, ConflictsOptions(), alpha),
                      replicate_pair_tables("qkov", qkov, stores, heldout, QkovOptions(), alpha)], ignore_index=True)


def test_planted_conflicts_replicate_at_the_rate_power_predicts(tmp_path):
    """The same planted conflict in both halves: most discoveries replicate, about as many as the
    summed power predicts (fewer, not more: the winner's curse), signs agree far above 50%."""
    runs = [replicate(*pair_stores(tmp_path, seed, 0.2, heldout_signal=True)) for seed in range(3)]
    cells = pd.concat(runs)
    found = cells[cells["discovered"]]
    assert len(found) >= 20
    assert (found["label"] == "conflict").all()
    replicated, expected = int(found["replicated"].sum()), float(found["power"].sum())
    assert 0.55 * expected <= replicated <= expected + 3 * np.sqrt(expected)
    assert found["same_sign"].mean() > 0.85
    for run in runs:  # heads of graded strength: the two halves rank the cells alike
        assert (summarise(run)["spearman_all"] > 0.5).all()


def test_discoveries_without_heldout_signal_replicate_at_most_at_alpha(tmp_path):
    """The signal only in the analysed half: the held-out one-sided tests are null tests, so
    replications are false positives (about alpha) and signs agree about half the time."""
    cells = pd.concat([replicate(*pair_stores(tmp_path, seed, 0.2, heldout_signal=False)) for seed in range(3)])
    found = cells[cells["discovered"]]
    assert len(found) >= 20
    assert found["replicated"].mean() <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / len(found))
    assert 0.3 <= found["same_sign"].mean() <= 0.7


def test_heldout_statistics_equal_brute_force_in_the_discovery_metric(tmp_path):
    """Phase 5's held-out mean is the mean cosine of held-out samples; phase 6's the mean of
    g_A,i (1 / F_A) g_B,j with F_A from the *analysed* store (the discovery metric)."""
    stores, heldout = pair_stores(tmp_path, 7, 0.2, heldout_signal=True)
    cells = replicate(stores, heldout)
    a, b = (heldout[t].per_sample(QP)[...].astype(np.float64) for t in "ab")
    rows = slice(3 * HEAD_DIM, 4 * HEAD_DIM)  # q head 3
    ga, gb = a[:, rows].reshape(len(a), -1), b[:, rows].reshape(len(b), -1)
    cosine = (ga / np.linalg.norm(ga, axis=1, keepdims=True)) @ (gb / np.linalg.norm(gb, axis=1, keepdims=True)).T
    row = cells[(cells["phase"] == "conflicts") & (cells["param"] == QP) & (cells["head"] == 3)].iloc[0]
    assert row["heldout_mean"] == pytest.approx(cosine.mean(), rel=1e-4, abs=1e-7)  # float32 products
    fisher_a = np.maximum(stores["a"].fisher(QP)[rows].astype(np.float64).ravel(), 1e-10)
    signed = (ga / fisher_a) @ gb.T / ga.shape[1]
    row = cells[(cells["phase"] == "qkov") & (cells["param"] == QP) & (cells["block"] == "q")
                & (cells["head"] == 3)].iloc[0]
    assert row["heldout_mean"] == pytest.approx(signed.mean(), rel=1e-4, abs=1e-7)
    heldout_fisher = np.maximum(heldout["a"].fisher(QP)[rows].astype(np.float64).ravel(), 1e-10)
    assert row["heldout_mean"] != pytest.approx(((ga / heldout_fisher) @ gb.T / ga.shape[1]).mean(), rel=1e-3)


def test_run_writes_tables_figure_and_caption(tmp_path):
    stores, heldout = pair_stores(tmp_path, 3, 0.2, heldout_signal=True)
    conflicts, _ = pair_conflicts(stores["a"], stores["b"], ConflictsOptions(), task_a="a", task_b="b")
    (tmp_path / "conflicts").mkdir()
    conflicts.to_parquet(tmp_path / "conflicts" / "conflicts.parquet")
    qkov = pair_qkov(stores["a"], stores["b"], QkovOptions(n_bootstrap=0), task_a="a", task_b="b")["cells"]
    (tmp_path / "qkov").mkdir()
    qkov.to_parquet(tmp_path / "qkov" / "cells.parquet")
    from fisher_pipeline.config import PipelineConfig

    pipeline = PipelineConfig.from_dict({})
    paths = run_replication({t: s.path for t, s in stores.items()}, tmp_path / "out", ReplicationOptions(),
                            heldout_stores={t: str(s.path) for t, s in heldout.items()},
                            conflicts=[tmp_path / "conflicts"], qkov=[tmp_path / "qkov"], pipeline=pipeline)
    summary = pd.read_csv(paths["summary_csv"])
    assert list(summary["phase"]) == ["conflicts", "qkov"]
    assert paths["figure"].stat().st_size > 10_000
    text = paths["caption"].read_text()
    assert "Phase 5" in text and "Phase 6" in text and "replicate on held-out samples" in text


def test_refuses_analysed_stores_as_heldout_and_overlapping_ids(tmp_path):
    stores, heldout = pair_stores(tmp_path, 4, 0.2, heldout_signal=True)
    from fisher_pipeline.phases.replication.compute import check_heldout_stores

    with pytest.raises(PhaseInputError, match="is not a held-out store.*fisher --heldout"):
        check_heldout_stores(stores, {"a": stores["a"], "b": heldout["b"]})
    with pytest.raises(PhaseInputError, match=r"no held-out store given for task\(s\) \['b'\]"):
        check_heldout_stores(stores, {"a": heldout["a"]})
    overlapping = FisherStore(make_store(tmp_path / "overlap.zarr", n_samples=4, task="a", shapes=SHAPES,
                                         specs=SPECS, per_sample=PER_SAMPLE, attrs={"sample_set": "heldout"}))
    with pytest.raises(PhaseInputError, match="overlap its analysed ones"):
        check_heldout_stores(stores, {"a": overlapping, "b": heldout["b"]})
