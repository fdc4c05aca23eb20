"""Intervention checks on a tiny Llama (`fisher_pipeline.phases.intervention`).

Phase 1 runs on the analysed and the held-out samples of two tasks. A step through one
cell, or along a task's natural gradient, is then measured on a task's held-out loss and
held to plain references: the measured change equals the loss recomputed from full logits
of a fresh model with the step added by hand; at small steps it equals the first-order
prediction from the held-out store's mean gradient (which checks the gradient and loss
conventions end to end); the model is put back bit for bit after every step, and after a
step that fails.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.data.tasks import load_heldout
from fisher_pipeline.engine.loss import collate, per_sample_loss
from fisher_pipeline.errors import PhaseInputError, StoreContentError
from fisher_pipeline.fisher import run_fisher
from fisher_pipeline.models.loading import load_model
from fisher_pipeline.phases.intervention import InterventionOptions
from fisher_pipeline.phases.intervention.compute import cell_mask, cell_steps, choose_cells, natgrad_steps
from fisher_pipeline.phases.intervention.probe import HeldoutProbe
from fisher_pipeline.phases.qkov import QkovOptions
from fisher_pipeline.store import open_store

TASKS = ("code", "prose")
QP = "model.layers.1.self_attn.q_proj.weight"


def tiny_config(model_dir) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {t: {"source": f"builtin:{t}", "n_samples": 4, "n_heldout": 3, "max_length": 20} for t in TASKS},
        "fisher": {"batch_size": 2, "per_sample_params": "attention", "fisher_m2_params": "none",
                   "per_sample_dtype": "float32"},
    })


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("intervention")
    config = tiny_config(model_dir)
    stores = {t: open_store(run_fisher(config, t, out / f"{t}.zarr", progress=False)) for t in TASKS}
    heldout = {t: open_store(run_fisher(config, t, out / f"{t}-heldout.zarr", progress=False, heldout=True))
               for t in TASKS}
    loaded = load_model(config.model, torch.device("cpu"))
    samples = {t: load_heldout(config.tasks[t], loaded.tokenizer) for t in TASKS}
    probe = HeldoutProbe(loaded.model, samples, loaded.tokenizer.pad_token_id, batch_size=2)
    return {"config": config, "stores": stores, "heldout": heldout, "probe": probe, "model_dir": model_dir,
            "samples": samples, "pad": loaded.tokenizer.pad_token_id}


def reference_change(model_dir, samples, pad, changes) -> float:
    """Mean per-sample token-sum loss change, from full logits of fresh models, one sample at a time."""
    def losses(model):
        out = []
        for sample in samples:
            batch = collate([sample], pad)
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
            out.append(float(per_sample_loss(logits, batch.input_ids, batch.label_mask)[0]))
        return np.array(out)

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stepped = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(stepped.named_parameters())
    with torch.no_grad():
        for name, change in changes.items():
            params[name].add_(torch.from_numpy(np.asarray(change, np.float32)))
    return float(np.mean(losses(stepped) - losses(dense)))


def test_heldout_store_holds_the_samples_after_the_analysed_ones(run):
    for task in TASKS:
        analysed, heldout = run["stores"][task], run["heldout"][task]
        assert heldout.attrs["sample_set"] == "heldout" and analysed.attrs["sample_set"] == "analysis"
        assert heldout.sample_ids == [s.id for s in run["samples"][task]]
        assert not set(heldout.sample_ids) & set(analysed.sample_ids)
        assert heldout.attrs["config_hash"] != analysed.attrs["config_hash"]
        assert np.array_equal(heldout.grad_mean(QP).shape, analysed.grad_mean(QP).shape)
        with pytest.raises(StoreContentError, match="keeps no elementwise Fisher .* analysed store"):
            heldout.fisher(QP)


def test_a_measured_step_equals_a_fresh_model_stepped_by_hand(run):
    rng = np.random.default_rng(0)
    shape = run["probe"].params[QP].shape
    changes = {QP: 0.05 * rng.standard_normal(tuple(shape)).astype(np.float32)}
    measured = run["probe"].measure("prose", changes)
    expected = reference_change(run["model_dir"], run["samples"]["prose"], run["pad"], changes)
    assert measured == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_small_steps_follow_the_heldout_gradient_to_first_order(run):
    """Through a cell (phase 5's plain and phase 6's Fisher step) and along a whole-model natural
    gradient, the measured change at a small step is gbar_A(held-out) . step within 10%."""
    stores = run["stores"]
    chosen = pd.DataFrame([
        {"phase": phase, "task_a": "code", "task_b": "prose", "cell": "layer 1 q head 0", "param": QP,
         "block": block, "head": head, "choice": "top", "label": "none", "discovery_p": 0.5}
        for phase in ("conflicts", "qkov") for block, head in (("q", 0), (None, pd.NA))])
    options = InterventionOptions(gains=(1e-5, 0.3), dampings=(1e-3,))
    cells = cell_steps(run["probe"], chosen, stores, run["heldout"], options, QkovOptions())
    small = cells[cells["gain"] == 1e-5]
    assert len(small) == 4 and set(small["kind"]) == {"plain", "fisher"}
    assert small[small["head"].isna()]["resolved"].all()  # whole-parameter steps stand above rounding
    resolved = small[small["resolved"]]
    assert (resolved["heldout_error"] < 0.1).all(), small[["kind", "measured", "predicted_heldout"]]
    assert (cells[cells["gain"] == 0.3]["heldout_error"] > small["heldout_error"].to_numpy()).any()
    assert (small["eta"] > 0).all() and (small["step_size"] > 0).all()
    natgrad = natgrad_steps(run["probe"], stores, run["heldout"], options, damping=1e-3)
    own = natgrad[natgrad["kind"] == "own"]
    assert set(own["direction"]) == {"natural", "plain"}
    for task, group in own.groupby("task_a"):  # every direction promises the same drop, 1e-5 of the loss
        assert np.allclose(group["predicted_discovery"], -1e-5 * run["probe"].dense[task].mean(), rtol=1e-4)
    cross = natgrad[natgrad["kind"] == "cross"]
    small = cross[cross["gain"] == 1e-5]
    assert len(small) == 2 and small["resolved"].all() and (small["heldout_error"] < 0.1).all()
    large = cross[cross["gain"] == 0.3]  # a step promising 30% of the loss leaves first order
    assert (large["heldout_error"].to_numpy() > small["heldout_error"].to_numpy()).all()


def test_every_step_is_undone_bit_for_bit_even_when_scoring_fails(run, monkeypatch):
    probe = run["probe"]
    before = {name: p.detach().clone() for name, p in probe.model.named_parameters()}
    probe.measure("code", {QP: np.ones(tuple(probe.params[QP].shape), np.float32)})
    monkeypatch.setattr(probe, "_losses", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        probe.measure("code", {QP: np.ones(tuple(probe.params[QP].shape), np.float32)})
    for name, p in probe.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_cell_mask_covers_exactly_the_head(run):
    geometry = run["stores"]["code"].geometry[QP]
    mask = cell_mask(geometry, "q", 1)
    rows = geometry.positions("q")[1]
    assert mask[rows].all() and mask.sum() == len(rows) * geometry.shape[1]
    assert cell_mask(geometry, None, pd.NA).all()


def test_choose_cells_takes_labelled_first_then_random_others():
    table = pd.DataFrame({"phase": "qkov", "task_a": "a", "task_b": "b", "heldout_mean": 0.1,
                          "discovery_p": [0.5, 0.001, 0.2, 0.0001, 0.3, 0.4, 1.0],
                          "discovered": [False, True, False, False, False, False, False]})
    chosen = choose_cells(table, top=2, random=2, seed=1)
    top = chosen[chosen["choice"] == "top"]
    assert list(top["discovery_p"]) == [0.001, 0.0001]  # the labelled cell first, then the smallest p
    random = chosen[chosen["choice"] == "random"]
    assert len(random) == 2 and not set(random["discovery_p"]) & {0.001, 0.0001, 1.0}


def test_refuses_heldout_samples_that_changed(run, tmp_path):
    from fisher_pipeline.phases.intervention.compute import run_intervention

    config = PipelineConfig.from_dict({**_raw(run["config"]), "tasks": {
        t: {"source": f"builtin:{t}", "n_samples": 4, "n_heldout": 2, "max_length": 20} for t in TASKS}})
    with pytest.raises(PhaseInputError, match="held-out samples of task 'code' .* differ .* rerun phase 1 --heldout"):
        run_intervention({t: s.path for t, s in run["stores"].items()}, tmp_path / "out",
                         heldout_stores={t: str(s.path) for t, s in run["heldout"].items()}, pipeline=config)


def _raw(config: PipelineConfig) -> dict:
    return {"model": {"path": config.model.path}}


def test_heldout_store_needs_two_heldout_samples_and_one_job(tiny_model_dir, tmp_path, caplog):
    from fisher_pipeline.__main__ import main
    from fisher_pipeline.errors import ConfigError

    config = PipelineConfig.from_dict({
        "model": {"path": str(tiny_model_dir("llama"))},
        "tasks": {"code": {"source": "builtin:code", "n_samples": 2, "n_heldout": 1, "max_length": 20}},
    })
    with pytest.raises(ConfigError, match=r"held-out store of task 'code' needs tasks.code.n_heldout >= 2 \(it is 1\)"):
        run_fisher(config, "code", tmp_path / "h.zarr", progress=False, heldout=True)
    assert not (tmp_path / "h.zarr").exists()
    caplog.clear()
    assert main(["fisher", "--heldout", "--sample-shard", "0/2", "--task", "code", "--config-json",
                 '{"tasks": {"code": {"source": "builtin:code"}}}', "--out", str(tmp_path / "s.zarr")]) == 2
    assert "--heldout writes one store per task in one job: drop --sample-shard/--param-shard" in caplog.text
