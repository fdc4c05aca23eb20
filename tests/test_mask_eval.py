"""mask_eval on a tiny Llama: held-out losses of every mask against plain references.

The dense and pruned losses are recomputed here batch by batch from full logits of a
freshly loaded model with `apply_masks`; the model is checked after every evaluation to
hold the dense weights outside the mask being scored (so each earlier mask was undone bit
for bit); the paired standard error is checked against the paired t formula.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fisher_pipeline.evaluation as evaluation
from fisher_pipeline import apply_masks
from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.data.tasks import load_heldout
from fisher_pipeline.engine.loss import collate, per_sample_loss
from fisher_pipeline.errors import PhaseInputError
from fisher_pipeline.fisher import run_fisher
from fisher_pipeline.phases import MaskEvalOptions, run_mask_eval, run_masks
from fisher_pipeline.phases.mask_eval.compute import loss_change
from fisher_pipeline.phases.masks import MaskOptions
from fisher_pipeline.store import open_store

TASKS = ("code", "prose")
CRITERIA = ("fisher", "magnitude", "random")
SPARSITIES = (0.0, 0.5)


def tiny_config(model_dir, n_heldout: int = 3) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {t: {"source": f"builtin:{t}", "n_samples": 4, "n_heldout": n_heldout, "max_length": 20}
                  for t in TASKS},
        "fisher": {"batch_size": 2, "per_sample_params": "none", "fisher_m2_params": "none"},
    })


@pytest.fixture(scope="module")
def masks(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("mask-eval")
    config = tiny_config(model_dir)
    options = MaskOptions(SPARSITIES, CRITERIA[0], CRITERIA[1:])
    paths = {}
    for task in TASKS:
        store = run_fisher(config, task, out / f"{task}.zarr", progress=False)
        paths[task] = run_masks(store, out / "masks" / task, options, pipeline=config)["masks"]
    return {"model_dir": model_dir, "config": config, "paths": paths, "out": out}


def test_mask_eval_matches_a_fresh_model_with_the_masks_applied(masks, tmp_path, monkeypatch):
    config, model_dir = masks["config"], masks["model_dir"]
    seen = []
    real = evaluation.heldout_losses

    def checked(model, samples, pad_id, batch_size=8):
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return real(model, samples, pad_id, batch_size)

    monkeypatch.setattr(evaluation, "heldout_losses", checked)
    paths = run_mask_eval(masks["paths"], tmp_path / "eval", MaskEvalOptions(batch_size=2), pipeline=config)
    table = pd.read_parquet(paths["mask_eval_parquet"])
    assert len(table) == len(CRITERIA) * len(SPARSITIES) * len(TASKS) ** 2
    assert set(table["criterion"]) == set(CRITERIA) and set(table["own"]) == {True, False}

    # Every evaluation saw the dense weights wherever its mask keeps them: earlier masks were undone exactly.
    # Equal masks (task-independent criteria, and every criterion at sparsity 0) are scored once.
    from fisher_pipeline.pruning import MasksFile

    dense = seen[0]
    distinct = []
    for criterion, sparsity, task in [(c, s, t) for c in CRITERIA for s in ("0", "0.5") for t in TASKS]:
        mask = MasksFile(masks["paths"][task]).masks(criterion, sparsity)
        if not any(all(np.array_equal(mask[p], other[p]) for p in mask) for other in distinct):
            distinct.append(mask)
    assert len(distinct) == 1 + 2 + 1 + 1  # sparsity 0; fisher per task; magnitude; random
    assert len(seen) == 1 + len(distinct)
    for state, mask in zip(seen[1:], distinct, strict=True):
        for name, value in state.items():
            keep = torch.from_numpy(mask[name]) if name in mask else torch.ones_like(value, dtype=torch.bool)
            assert torch.equal(value[keep], dense[name][keep]), name
            assert not value[~keep].any(), name

    # A freshly loaded model with the masks applied gives the losses mask_eval scored.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = {t: load_heldout(config.tasks[t], tokenizer) for t in TASKS}
    stored_ids = {t: set(open_store(masks["out"] / f"{t}.zarr").sample_ids) for t in TASKS}

    def per_token(samples) -> tuple[float, np.ndarray, np.ndarray]:
        losses, counts = [], []
        with torch.no_grad():
            for sample in samples:
                batch = collate([sample], tokenizer.pad_token_id)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
                losses.append(float(per_sample_loss(logits, batch.input_ids, batch.label_mask)[0]))
                counts.append(int(batch.label_mask.sum()))
        return sum(losses) / sum(counts), np.array(losses), np.array(counts)

    dense_losses = {t: per_token(heldout[t]) for t in TASKS}
    for row in table.itertuples():
        assert row.dense_loss == pytest.approx(dense_losses[row.eval_task][0], rel=1e-5)
        if row.sparsity == 0.0:
            assert row.delta == 0.0 and row.kept_fraction == 1.0
        with apply_masks(model, masks["paths"][row.mask_task], row.criterion, row.sparsity):
            pruned = per_token(heldout[row.eval_task])
        assert row.pruned_loss == pytest.approx(pruned[0], rel=1e-5), row
        assert row.n_heldout == len(heldout[row.eval_task]) and row.n_tokens == pruned[2].sum()
    samples = pd.read_csv(paths["heldout_samples"])
    for task in TASKS:
        ids = samples[samples["task"] == task]["id"].tolist()
        assert ids == [s.id for s in heldout[task]] and not set(ids) & stored_ids[task]
    assert paths["curves"].stat().st_size > 1000 and paths["cross"].stat().st_size > 1000
    assert "keeps the task better" in paths["caption"].read_text()


def test_loss_change_standard_error_is_the_paired_t_one_for_equal_lengths():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(3, 20))
        tokens = np.full(n, int(rng.integers(1, 50)))
        dense = rng.gamma(2.0, 3.0, n) * tokens
        pruned = dense + rng.normal(0.5, 2.0, n) * tokens
        dense_loss, pruned_loss, delta, se = loss_change(dense, pruned, tokens)
        per_sample = (pruned - dense) / tokens
        assert delta == pytest.approx(per_sample.mean())
        assert se == pytest.approx(per_sample.std(ddof=1) / np.sqrt(n))
        assert dense_loss == pytest.approx(dense.sum() / tokens.sum())
        assert pruned_loss - dense_loss == pytest.approx(delta)
    # unequal lengths: the ratio estimator's delta-method SE, written out
    tokens = rng.integers(1, 40, 9)
    dense, pruned = rng.gamma(2.0, 3.0, 9) * tokens, rng.gamma(2.0, 3.5, 9) * tokens
    _, _, delta, se = loss_change(dense, pruned, tokens)
    d = pruned - dense
    assert delta == pytest.approx(d.sum() / tokens.sum())
    z = (d - delta * tokens) / tokens.mean()
    assert se == pytest.approx(np.sqrt(np.sum(z ** 2) / (9 * 8)))


def test_mask_eval_refuses_tasks_without_heldout_and_masks_made_differently(masks, tmp_path):
    no_heldout = tiny_config(masks["model_dir"], n_heldout=0)
    with pytest.raises(PhaseInputError, match=r"task 'code' has no held-out sample: set tasks\.code\.n_heldout >= 2"):
        run_mask_eval(masks["paths"], tmp_path / "e", pipeline=no_heldout)
    other = run_masks(masks["out"] / "prose.zarr", tmp_path / "other", MaskOptions((0.5,), "fisher", ()),
                      pipeline=masks["config"])["masks"]
    with pytest.raises(PhaseInputError, match=r"masks of tasks 'code' and 'prose' differ in criteria"):
        run_mask_eval({"code": masks["paths"]["code"], "prose": other}, tmp_path / "e", pipeline=masks["config"])
    with pytest.raises(PhaseInputError, match=r"needs the model and tasks sections"):
        run_mask_eval(masks["paths"], tmp_path / "e")
    assert not (tmp_path / "e").exists()
