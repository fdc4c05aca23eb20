"""Phases 1-3 on a real store of every family's layout: tables and masks follow the adapter.

For each tiny family a phase 1 store is written from the saved model (once per module),
then phase 2 (importance tables) and phase 3 (head and neuron masks, per layer). The
checks hold the outputs to what the adapter says about the live model: heads per block
under GQA, the query heads of each KV head, the positions of every head and neuron.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fisher_pipeline import apply_masks
from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.fisher import run_fisher
from fisher_pipeline.models.adapters import ArchitectureAdapter, adapter_for
from fisher_pipeline.phases import run_importance, run_masks
from fisher_pipeline.phases.masks import MaskOptions
from fisher_pipeline.pruning import MasksFile
from fisher_pipeline.store import open_store
from tiny_models import FAMILIES

#: Sparsities masked, as phase 3 names them. Two: the Fisher of heads differs by orders of
#: magnitude between blocks (V, O >> Q, K), so a given sparsity often keeps or drops every
#: head of a tensor; in every tiny family one of these splits some tensor's heads.
SPARSITIES = ["0.3", "0.8"]


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """A family's phase 1 store, phase 2 tables, phase 3 masks and the adapter of its model."""
    family = request.param
    model_dir = tiny_model_dir(family)
    out = tmp_path_factory.mktemp(f"phases-{family}")
    config = PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 6, "n_heldout": 3, "max_length": 24}},
        "fisher": {"batch_size": 3},
    })
    store_path = run_fisher(config, "prose", out / "prose.zarr", progress=False)
    tables = run_importance(store_path, out / "importance")
    masks = {}
    # Heads compete with heads of their layer (attention tensors), neurons with neurons (MLP tensors).
    for granularity, include in (("head", "attention"), ("neuron", "mlp")):
        options = MaskOptions(sparsities=tuple(map(float, SPARSITIES)), criterion="saliency", baselines=("fisher",),
                              scope="per_layer", granularity=granularity, include=include)
        paths = run_masks(store_path, out / f"masks-{granularity}", options)
        masks[granularity] = MasksFile(paths["masks"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return SimpleNamespace(
        family=family, adapter=adapter_for(model), store=open_store(store_path), model=model, config=config,
        heads=pd.read_parquet(tables["heads_parquet"]), neurons=pd.read_parquet(tables["neurons_parquet"]),
        masks=masks,
    )


def _reader(adapter: ArchitectureAdapter, block: str, head: int) -> int:
    """A query head whose slices hold `head` of `block` (k/v heads are KV heads)."""
    if block in ("k", "v"):
        return next(h for h in range(adapter.n_heads) if adapter.kv_head(h) == head)
    return head


def _intermediate_size(adapter: ArchitectureAdapter) -> int:
    config = adapter.config
    return getattr(config, "intermediate_size", None) or config.n_inner  # GPT-2 calls it n_inner


def _neuron_positions(adapter: ArchitectureAdapter, layer: int) -> dict[str, tuple[int, list[torch.Tensor]]]:
    """MLP parameter of `layer` -> (group dim, positions of neuron n for every n)."""
    out = {}
    for name, spec in adapter.group_specs().items():
        if f".{layer}." in name and any(g.startswith("neuron.") for g in spec.names):
            ids = [spec.names.index(f"neuron.{n}") for n in range(_intermediate_size(adapter))]
            out[name] = (spec.dim, [torch.nonzero(spec.labels == i).flatten() for i in ids])
    return out


def _values_at(array: np.ndarray, dim: int, index: torch.Tensor) -> np.ndarray:
    return np.take(array, index.numpy(), axis=dim)


def test_heads_table_counts_and_gqa_columns(run):
    adapter, heads = run.adapter, run.heads
    expected_rows = adapter.n_layers * (2 * adapter.n_heads + 2 * adapter.n_kv_heads)
    assert len(heads) == expected_rows, heads[["layer", "block", "head"]].to_string()
    for layer in range(adapter.n_layers):
        for block in ("q", "k", "v", "o"):
            rows = heads[(heads["layer"] == layer) & (heads["block"] == block)].sort_values("head")
            count = adapter.n_kv_heads if block in ("k", "v") else adapter.n_heads
            where = f"{run.family} layer {layer} {block}"
            assert rows["head"].tolist() == list(range(count)), where
            assert set(rows["head_kind"]) == {"kv" if block in ("k", "v") else "query"}, where
            for head, readers in zip(rows["head"], rows["query_heads"], strict=True):
                if block in ("k", "v"):
                    expected = ",".join(str(h) for h in range(adapter.n_heads) if adapter.kv_head(h) == head)
                else:
                    expected = str(head)
                assert readers == expected, (where, head, readers)


def test_neurons_table_has_every_neuron(run):
    adapter, neurons = run.adapter, run.neurons
    width = _intermediate_size(adapter)
    for layer in range(adapter.n_layers):
        rows = neurons[neurons["layer"] == layer]
        assert sorted(rows["neuron"].tolist()) == list(range(width)), f"{run.family} layer {layer}"
    assert len(neurons) == adapter.n_layers * width


def test_head_and_neuron_fisher_sums_equal_the_stored_fisher_over_their_positions(run):
    """Phase 2's per-head sums are the store's elementwise Fisher summed over the adapter's
    head slices (weights and biases); per-neuron sums over the neuron's positions."""
    adapter, store = run.adapter, run.store
    fisher = {name: store.fisher(name) for name in store.param_names}
    for row in run.heads.itertuples():
        pieces = adapter.head_slices(int(row.layer), row.block, _reader(adapter, row.block, int(row.head)))
        expected = sum(_values_at(fisher[p.param], p.dim, p.index).sum(dtype=np.float64) for p in pieces)
        np.testing.assert_allclose(row.fisher_sum, expected, rtol=1e-5,
                                   err_msg=f"{run.family} layer {row.layer} {row.block} head {row.head}")
    for layer in range(adapter.n_layers):
        positions = _neuron_positions(adapter, layer)
        expected = np.zeros(_intermediate_size(adapter))
        for name, (dim, per_neuron) in positions.items():
            expected += [_values_at(fisher[name], dim, index).sum(dtype=np.float64) for index in per_neuron]
        rows = run.neurons[run.neurons["layer"] == layer].sort_values("neuron")
        np.testing.assert_allclose(rows["fisher_sum"].to_numpy(), expected, rtol=1e-5,
                                   err_msg=f"{run.family} layer {layer} neurons")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _zeroed(model, pieces) -> dict[str, torch.Tensor]:
    """Parameter name -> copy of the parameter with the given slices set to 0."""
    params = dict(model.named_parameters())
    out = {}
    for piece in pieces:
        value = out.setdefault(piece.param, params[piece.param].detach().clone())
        value.index_fill_(piece.dim, piece.index, 0.0)
    return out


def _logits_with(model, replaced: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in replaced}
    with torch.no_grad():
        for name, value in replaced.items():
            params[name].copy_(value)
        logits = _logits(model, input_ids)
        for name, value in saved.items():
            params[name].copy_(value)
    return logits


@pytest.mark.parametrize("criterion", ["saliency", "fisher"])
def test_head_masks_remove_query_heads_and_kv_heads_only_with_all_their_readers(run, criterion):
    """A head unit is a query head: its q and o slices share one mask value; a KV head's k and v
    slices are removed exactly when every query head reading it is (GQA). Applied to the model,
    the mask gives the logits of removing only the dropped heads' o columns: removing a head
    means what a user means by it."""
    adapter, file = run.adapter, run.masks["head"]
    input_ids = torch.randint(3, run.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    dropped_any = kept_any = False
    for sparsity in file.sparsities:
        masks = file.masks(criterion, sparsity)
        removed_o = []
        for layer in range(adapter.n_layers):
            kept = {}
            for head in range(adapter.n_heads):
                pieces = adapter.head_slices(layer, "q", head) + adapter.head_slices(layer, "o", head)
                values = {bool(v) for piece in pieces
                          for v in np.unique(_values_at(masks[piece.param], piece.dim, piece.index))}
                where = f"{run.family} {criterion} {sparsity} layer {layer} head {head}"
                assert len(values) == 1, f"{where}: q / o slices disagree"
                kept[head] = values.pop()
                if not kept[head]:
                    removed_o += adapter.head_slices(layer, "o", head)
            dropped_any |= not all(kept.values())
            kept_any |= any(kept.values())
            for kv in range(adapter.n_kv_heads):
                readers = [h for h in range(adapter.n_heads) if adapter.kv_head(h) == kv]
                reader = readers[0]
                for block in ("k", "v"):
                    for piece in adapter.head_slices(layer, block, reader):
                        values = set(np.unique(_values_at(masks[piece.param], piece.dim, piece.index)).tolist())
                        assert values == {any(kept[h] for h in readers)}, (run.family, layer, block, kv, kept)
        with apply_masks(run.model, masks):
            pruned = _logits(run.model, input_ids)
        expected = _logits_with(run.model, _zeroed(run.model, removed_o), input_ids)
        torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert dropped_any and kept_any, f"{run.family}: the sparsities should drop some heads and keep others"


@pytest.mark.parametrize("criterion", ["saliency", "fisher"])
def test_neuron_masks_remove_whole_neurons(run, criterion):
    """All positions of a neuron share one mask value (Phi-3: its gate and up rows n and I + n,
    and its down column); applied to the model, the mask gives the logits of removing only the
    dropped neurons' output (down) columns."""
    adapter, file = run.adapter, run.masks["neuron"]
    width = _intermediate_size(adapter)
    input_ids = torch.randint(3, run.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for sparsity in file.sparsities:
        masks = file.masks(criterion, sparsity)
        removed_out = []
        for layer in range(adapter.n_layers):
            positions = _neuron_positions(adapter, layer)
            assert positions, f"{run.family} layer {layer}: no neuron groups"
            kept = []
            for neuron in range(width):
                values = {bool(v) for name, (dim, per_neuron) in positions.items()
                          for v in np.unique(_values_at(masks[name], dim, per_neuron[neuron]))}
                assert len(values) == 1, f"{run.family} {sparsity} layer {layer}: neuron {neuron} split"
                kept.append(values.pop())
            assert sum(kept) == math.floor((1 - float(sparsity)) * width + 0.5)
            for name, (dim, per_neuron) in positions.items():
                if run.store.geometry[name].role == "mlp_out" and name.endswith("weight"):
                    removed_out += [SimpleNamespace(param=name, dim=dim, index=per_neuron[n])
                                    for n in range(width) if not kept[n]]
        with apply_masks(run.model, masks):
            pruned = _logits(run.model, input_ids)
        expected = _logits_with(run.model, _zeroed(run.model, removed_out), input_ids)
        torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


def test_wanda_masks_compete_within_output_rows_with_the_bias(run, tmp_path):
    """Wanda per output row on every family's layout (Linear [out, in]; GPT-2's Conv1D [in, out]):
    a row's weights scored |w| * ||X_j|| and its bias |b| (input 1) keep their top share together."""
    store, params = run.store, dict(run.model.named_parameters())
    sparsity = 0.5
    paths = run_masks(store.path, tmp_path / "wanda", MaskOptions((sparsity,), "wanda", (), include="blocks"),
                      weights={n: p.detach().numpy() for n, p in params.items()})
    file = MasksFile(paths["masks"])
    checked = 0
    for name in store.input_sq_names:
        if name not in file.params:
            continue
        w = params[name].detach().numpy()
        is_conv1d = store.input_dim(name) == 0
        rows = np.abs(w.T if is_conv1d else w) * np.sqrt(store.input_sq(name))[None, :]  # [out, in]
        bias = name[: -len("weight")] + "bias"
        if bias in params and bias in file.params:
            rows = np.concatenate([rows, np.abs(params[bias].detach().numpy())[:, None]], axis=1)
        keep = np.zeros(rows.shape, dtype=bool)
        for r, row in enumerate(rows):
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))
            keep[r, order[: math.floor((1 - sparsity) * len(row) + 0.5)]] = True
        n_in = w.shape[0] if is_conv1d else w.shape[1]
        expected = keep[:, :n_in].T if is_conv1d else keep[:, :n_in]
        np.testing.assert_array_equal(file.read("wanda", sparsity, name), expected, err_msg=f"{run.family} {name}")
        if bias in params and bias in file.params:
            np.testing.assert_array_equal(file.read("wanda", sparsity, bias), keep[:, n_in], err_msg=bias)
        checked += 1
    assert checked >= 4 * run.adapter.n_layers, run.family  # at least Q/K/V (fused or not), O, MLP in and out


def test_mask_eval_scores_head_masks_on_every_family(run, tmp_path):
    """mask_eval on each family's head masks: the dense held-out loss is the model's, and the
    pruned losses are those of the model with the masks applied."""
    from fisher_pipeline.data.tasks import load_heldout
    from fisher_pipeline.evaluation import heldout_losses
    from fisher_pipeline.phases import MaskEvalOptions, run_mask_eval

    paths = run_mask_eval({"prose": run.masks["head"].path}, tmp_path / "eval", MaskEvalOptions(batch_size=2),
                          pipeline=run.config)
    table = pd.read_parquet(paths["mask_eval_parquet"])
    assert len(table) == 2 * len(SPARSITIES) and table["own"].all()
    tokenizer = AutoTokenizer.from_pretrained(run.config.model.path)
    samples = load_heldout(run.config.tasks["prose"], tokenizer)
    dense, tokens = heldout_losses(run.model, samples, tokenizer.pad_token_id)
    for row in table.itertuples():
        assert row.dense_loss == pytest.approx(float(dense.sum() / tokens.sum()), rel=1e-5), run.family
        with apply_masks(run.model, run.masks["head"].path, row.criterion, row.sparsity):
            pruned, _ = heldout_losses(run.model, samples, tokenizer.pad_token_id)
        assert row.pruned_loss == pytest.approx(float(pruned.sum() / tokens.sum()), rel=1e-5), (run.family, row)
