"""Phases 2, 3, 4 and 7 against brute-force float64 references on small real stores.

Stores come from `store_factory` (the production accumulator and writer fed with random
per-sample gradients). References are written out longhand: explicit head / neuron
slices of the tiny Llama layout, Python sorts, sets and binomial coefficients — none of
the phases' own helpers (group layouts, partitions, scipy's hypergeometric).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import zarr

from fisher_pipeline.errors import ConfigError, PhaseInputError
from fisher_pipeline.layout import GroupSpec
from fisher_pipeline.phases import (
    ImportanceOptions,
    MaskOptions,
    OverlapOptions,
    ScaledOptions,
    compute_masks,
    cross_task_tables,
    importance_tables,
    natgrad_norms,
    overlap_metrics,
    rank_agreement,
    run_importance,
    run_masks,
    run_overlap,
    run_rank_agreement,
    run_scaled_cross,
    run_scaled_task,
)
from fisher_pipeline.pruning import MasksFile
from fisher_pipeline.store import FisherStore, open_store
from fisher_pipeline.store.integrity import write_manifest
from store_factory import HEAD_DIM, N_HEADS, N_KV_HEADS, WIDTH, llama_layout, make_store, random_gradients

N = 7
SHAPES, SPECS = llama_layout()
PARAMS = sorted(SHAPES)
ZERO = "model.layers.1.self_attn.v_proj.weight"  # all-zero Fisher in store "a"
SPARSITIES = (0.0, 0.3, 0.5, 0.9, 1.0)


# --- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grads() -> dict[str, dict[str, np.ndarray]]:
    """Per-sample gradients of three tasks; task a has an all-zero tensor."""
    per_task = {task: random_gradients(SHAPES, N, seed) for seed, task in enumerate("abc")}
    per_task["a"][ZERO] = np.zeros((N, *SHAPES[ZERO]), np.float32)
    return per_task


@pytest.fixture(scope="module")
def stores(tmp_path_factory, grads) -> dict[str, object]:
    root = tmp_path_factory.mktemp("stores")
    return {
        task: make_store(root / f"{task}.zarr", n_samples=N, task=task, grads=g,
                         per_sample=("model.layers.0.self_attn.q_proj.weight",))
        for task, g in grads.items()
    }


@pytest.fixture(scope="module")
def tied_store(tmp_path_factory):
    """A store whose Fisher takes few distinct values: many ties, within and across tensors."""
    rng = np.random.default_rng(7)
    grads = {name: rng.choice([0.0, 1.0, -1.0, 2.0], size=(N, *shape)).astype(np.float32)
             for name, shape in SHAPES.items()}
    for name in grads:  # identical samples: F = g^2 in {0, 1, 4}
        grads[name][:] = grads[name][0]
    return make_store(tmp_path_factory.mktemp("tied") / "t.zarr", n_samples=N, task="t", grads=grads)


@functools.cache
def raw_group(path) -> zarr.Group:
    """A store opened straight with zarr (not through the package's reader)."""
    return zarr.open_group(path, mode="r")


@functools.cache
def _raw(path, kind: str, name: str) -> np.ndarray:
    values = np.asarray(raw_group(path)[f"{kind}/{name}"][...], dtype=np.float64)
    values.flags.writeable = False
    return values


def raw(path, kind: str, name: str) -> np.ndarray:
    """A store array read straight from zarr, as float64 (cached: stores are read-only here)."""
    return _raw(path, kind, name)


def unit_slices(param: str, granularity: str) -> list[tuple[str, tuple]]:
    """Longhand units of the tiny layout: (name, index) of each head / neuron, else the whole tensor."""
    rows = lambda k: (slice(k * HEAD_DIM, (k + 1) * HEAD_DIM), slice(None))  # noqa: E731
    if granularity == "head":
        if ".q_proj." in param:
            return [(f"q.h{h}", rows(h)) for h in range(N_HEADS)]
        if ".k_proj." in param or ".v_proj." in param:
            block = "k" if ".k_proj." in param else "v"
            return [(f"{block}.h{h}", rows(h)) for h in range(N_KV_HEADS)]
        if ".o_proj." in param:
            return [(f"o.h{h}", (slice(None), slice(h * HEAD_DIM, (h + 1) * HEAD_DIM))) for h in range(N_HEADS)]
    if granularity == "neuron":
        if ".gate_proj." in param or ".up_proj." in param:
            return [(f"neuron.{n}", (slice(n, n + 1), slice(None))) for n in range(WIDTH)]
        if ".down_proj." in param:
            return [(f"neuron.{n}", (slice(None), slice(n, n + 1))) for n in range(WIDTH)]
    return [("all", (Ellipsis,))]


def all_units(param: str) -> list[tuple[str, tuple]]:
    """The stored groups of `param`, longhand (heads, neurons or the whole tensor)."""
    heads = unit_slices(param, "head")
    return heads if heads[0][0] != "all" else unit_slices(param, "neuron")


def layer(param: str) -> int | None:
    parts = param.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


# --- phase 2: importance -------------------------------------------------------------
def test_importance_matches_per_sample_reference(stores, grads):
    tables = importance_tables(open_store(stores["b"]), "b", ImportanceOptions())
    g = {name: v.astype(np.float64) for name, v in grads["b"].items()}
    fisher = {name: np.mean(v ** 2, axis=0) for name, v in g.items()}
    total = sum(f.sum() for f in fisher.values())

    tensors = tables["tensors"].set_index("param")
    for name in PARAMS:
        row = tensors.loc[name]
        assert row["fisher_sum"] == pytest.approx(fisher[name].sum(), rel=1e-5)
        assert row["fisher_mean"] == pytest.approx(fisher[name].mean(), rel=1e-5)
        assert row["share"] == pytest.approx(fisher[name].sum() / total, rel=1e-5)
    assert tensors["share"].sum() == pytest.approx(1.0, abs=1e-9)
    assert tables["groups"]["share"].sum() == pytest.approx(1.0, abs=1e-9)
    expected_rank = pd.Series({n: fisher[n].mean() for n in PARAMS}).rank(ascending=False, method="min")
    assert (tensors["rank"] == expected_rank.loc[tensors.index].astype(int)).all()

    heads = tables["heads"].set_index(["layer", "block", "head"])
    for name in PARAMS:
        for unit, index in unit_slices(name, "head"):
            if unit == "all":
                continue
            block, head = unit.split(".h")
            per_sample_sum = (g[name][(slice(None), *index)] ** 2).reshape(N, -1).sum(1)
            row = heads.loc[(layer(name), block, int(head))]
            assert row["fisher_sum"] == pytest.approx(per_sample_sum.mean(), rel=1e-5)
            assert row["se"] == pytest.approx(per_sample_sum.std(ddof=1) / math.sqrt(N), rel=1e-4)
            assert row["snr"] == pytest.approx(row["fisher_sum"] / row["se"], rel=1e-9)
            assert not row["se_is_bound"]
    # GQA: K and V are per KV head and say so; each KV head lists the query heads reading it.
    kv = tables["heads"][tables["heads"]["block"].isin(["k", "v"])]
    assert set(kv["head"]) == set(range(N_KV_HEADS)) and (kv["head_kind"] == "kv").all()
    assert kv[kv["head"] == 1]["query_heads"].eq("2,3").all()


def test_importance_neurons_layers_and_bounds(stores, grads):
    tables = importance_tables(open_store(stores["b"]), "b", ImportanceOptions(rank_by="sum"))
    g = {name: v.astype(np.float64) for name, v in grads["b"].items()}
    neurons = tables["neurons"].set_index(["layer", "neuron"])
    for lay, n in itertools.product(range(2), range(WIDTH)):
        per_sample = 0.0
        for proj in ("gate", "up", "down"):
            param = f"model.layers.{lay}.mlp.{proj}_proj.weight"
            index = dict(all_units(param))[f"neuron.{n}"]
            per_sample = per_sample + (g[param][(slice(None), *index)] ** 2).reshape(N, -1).sum(1)
        assert neurons.loc[(lay, n), "fisher_sum"] == pytest.approx(per_sample.mean(), rel=1e-5)
        assert neurons.loc[(lay, n), "se_is_bound"]  # spans three stored groups
    layers = tables["layers"].set_index("layer")
    for lay in (0, 1):
        members = [p for p in PARAMS if layer(p) == lay]
        expected = sum(np.mean(g[p] ** 2, 0).sum() for p in members)
        assert layers.loc[lay, "fisher_sum"] == pytest.approx(expected, rel=1e-5)
        assert layers.loc[lay, "n_tensors"] == len(members)
    outside = tables["layers"][tables["layers"]["layer"].isna()]
    assert len(outside) == 1 and outside["n_tensors"].item() == 2
    # A tensor's se is the sum of its groups' se (an upper bound), flagged as such.
    groups = tables["groups"]
    q = "model.layers.0.self_attn.q_proj.weight"
    tensor_row = tables["tensors"].set_index("param").loc[q]
    assert tensor_row["se_is_bound"]
    assert tensor_row["se"] == pytest.approx(groups[groups["param"] == q]["se"].sum(), rel=1e-12)
    assert (tables["layers"]["rank"].sort_values().to_numpy() == [1, 2, 3]).all()


def test_importance_all_zero_tensor(stores):
    tables = importance_tables(open_store(stores["a"]), "a", ImportanceOptions())
    row = tables["tensors"].set_index("param").loc[ZERO]
    assert row["fisher_sum"] == 0 and row["share"] == 0 and np.isnan(row["snr"])
    assert row["rank"] == len(PARAMS)  # least important
    assert tables["tensors"]["share"].sum() == pytest.approx(1.0, abs=1e-9)


def test_run_importance_writes_tables_and_heatmap(stores, tmp_path):
    paths = run_importance(stores["a"], tmp_path / "importance" / "a")
    for stem in ("tensors", "groups", "heads", "neurons", "layers"):
        parquet = pd.read_parquet(paths[f"{stem}_parquet"])
        csv = pd.read_csv(paths[f"{stem}_csv"])
        assert len(parquet) == len(csv) > 0
        assert (parquet["task"] == "a").all()
    assert paths["heads_heatmap"].stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "importance").iterdir()) == ["a"]  # no staging left behind


def test_rank_agreement_is_spearman(stores, caplog):
    options = ImportanceOptions()
    tables = {t: importance_tables(open_store(stores[t]), t, options) for t in "abc"}
    agreement = rank_agreement(tables, options)
    assert len(agreement) == 3 * 4  # three pairs, four levels
    for row in agreement.itertuples():
        keys = {"tensors": ["param"], "heads": ["layer", "block", "head"], "neurons": ["layer", "neuron"],
                "layers": ["layer"]}[row.level]
        a = tables[row.task_a][row.level].set_index(keys)["fisher_mean"]
        b = tables[row.task_b][row.level].set_index(keys)["fisher_mean"].loc[a.index]
        expected = np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1]  # Pearson of average ranks
        assert row.spearman_rho == pytest.approx(expected, abs=1e-12)
        assert row.n_units == len(a)


def test_rank_agreement_single_task_is_empty(stores, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        paths = run_rank_agreement({"a": stores["a"]}, tmp_path / "agreement")
    assert "needs two tasks" in caplog.text
    table = pd.read_parquet(paths["rank_agreement_parquet"])
    assert table.empty and list(table.columns) == ["level", "task_a", "task_b", "n_units", "spearman_rho", "p_value"]


# --- phase 3: masks --------------------------------------------------------------------
BLOCK_PARAMS = [p for p in PARAMS if layer(p) is not None and "layernorm" not in p]  # what `blocks` selects


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """Model weights for the stores' layout: the criteria that read w take them from here."""
    rng = np.random.default_rng(11)
    return {p: rng.normal(size=SHAPES[p]).astype(np.float32) for p in PARAMS}


def reference_keep(sparsity: float, n: int) -> int:
    """Round half up of (1 - s) * n, in exact decimal arithmetic."""
    return math.floor((1 - Fraction(str(sparsity))) * n + Fraction(1, 2))


def element_score(path, param: str, criterion: str, weights) -> np.ndarray:
    """Longhand element scores (float32 arithmetic, as the masks compute them)."""
    w = weights[param]
    fisher = raw(path, "fisher", param).astype(np.float32)
    if criterion == "fisher":
        return fisher
    if criterion == "saliency":
        return np.float32(0.5) * fisher * w * w
    if criterion == "magnitude":
        return np.abs(w)
    if criterion == "wanda":  # Linear [out, in]: column j scaled by ||X_j||
        return np.abs(w) * np.sqrt(raw(path, "input_sq", param)).astype(np.float32)[None, :]
    raise ValueError(criterion)


def head_units(granularity: str) -> list[tuple[int, int, list[tuple[str, tuple]], tuple[str, int]]]:
    """Longhand units of the tiny layout: (layer, index, [(param, slice)], (gate param, gate column))."""
    units = []
    for lay in (0, 1):
        attn, mlp = f"model.layers.{lay}.self_attn", f"model.layers.{lay}.mlp"
        if granularity == "head":
            for h in range(N_HEADS):
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                units.append((lay, h, [(f"{attn}.q_proj.weight", (rows, slice(None))),
                                       (f"{attn}.o_proj.weight", (slice(None), rows))], (f"{attn}.o_proj.weight", h)))
        else:
            for n in range(WIDTH):
                units.append((lay, n, [(f"{mlp}.gate_proj.weight", (slice(n, n + 1), slice(None))),
                                       (f"{mlp}.up_proj.weight", (slice(n, n + 1), slice(None))),
                                       (f"{mlp}.down_proj.weight", (slice(None), slice(n, n + 1)))],
                              (f"{mlp}.down_proj.weight", n)))
    return units


def unit_score(path, members, gate, criterion: str, weights) -> float:
    if criterion == "saliency":
        g = raw(path, "gate", gate[0])[:, gate[1]]
        return 0.5 * float(np.mean(g * g))
    values = [element_score(path, p, criterion, weights)[index].astype(np.float64) for p, index in members]
    return sum(v.sum() for v in values) / sum(v.size for v in values)


def reference_masks(path, scope: str, granularity: str, sparsity: float, criterion: str,
                    weights) -> dict[str, np.ndarray]:
    """Masks by a Python sort of explicitly enumerated units, ties to the earlier unit."""
    if granularity == "element":
        units = []  # (param, index, score) in unit order
        for param in BLOCK_PARAMS:
            score = element_score(path, param, criterion, weights)
            units += [(param, np.unravel_index(i, score.shape), float(v)) for i, v in enumerate(score.ravel())]
        scope_of = {"global": lambda u: 0, "per_layer": lambda u: layer(u[0]), "per_tensor": lambda u: u[0]}[scope]
        masks = {p: np.zeros(SHAPES[p], dtype=bool) for p in BLOCK_PARAMS}
        for key in dict.fromkeys(scope_of(u) for u in units):
            members = [u for u in units if scope_of(u) == key]
            ranked = sorted(range(len(members)), key=lambda i: (-members[i][2], i))
            for i in ranked[: reference_keep(sparsity, len(members))]:
                masks[members[i][0]][members[i][1]] = True
        return masks
    units = [(lay, index, members, unit_score(path, members, gate, criterion, weights))
             for lay, index, members, gate in head_units(granularity)]
    removed = set()
    for key in dict.fromkeys(u[0] if scope == "per_layer" else 0 for u in units):
        members = [u for u in units if (u[0] if scope == "per_layer" else 0) == key]
        ranked = sorted(range(len(members)), key=lambda i: (-members[i][3], i))
        removed |= {members[i][:2] for i in ranked[reference_keep(sparsity, len(members)):]}
    touched = [p for p in BLOCK_PARAMS if (granularity == "head") == (".self_attn." in p)]
    masks = {p: np.ones(SHAPES[p], dtype=bool) for p in touched}
    for lay, index, members, _ in units:
        if (lay, index) in removed:
            for p, idx in members:
                masks[p][idx] = False
    if granularity == "head":  # KV head j goes when query heads 2j and 2j + 1 both went
        for lay in (0, 1):
            for j in range(N_KV_HEADS):
                if {(lay, 2 * j), (lay, 2 * j + 1)} <= removed:
                    for block in ("k", "v"):
                        kv_rows = slice(j * HEAD_DIM, (j + 1) * HEAD_DIM)
                        masks[f"model.layers.{lay}.self_attn.{block}_proj.weight"][kv_rows] = False
    return masks


@pytest.mark.parametrize("criterion", ["saliency", "fisher", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "per_layer", "per_tensor"])
@pytest.mark.parametrize("granularity", ["element", "head", "neuron"])
def test_masks_match_reference_with_ties(tied_store, stores, weights, scope, granularity, criterion):
    if granularity != "element" and scope == "per_tensor":
        pytest.skip("heads and neurons span tensors (refused, see test_mask_options_are_validated)")
    for path in (tied_store, stores["a"]):
        options = MaskOptions(SPARSITIES, criterion, (), scope, granularity)
        result = compute_masks(open_store(path), options, weights).masks[criterion]
        for s in SPARSITIES:
            expected = reference_masks(path, scope, granularity, s, criterion, weights)
            assert sorted(result[s]) == sorted(expected)
            for param in expected:
                np.testing.assert_array_equal(result[s][param], expected[param], err_msg=f"{param} at {s}")


@pytest.mark.parametrize("compare", ["row", "scope"])
def test_wanda_masks_match_reference(stores, weights, compare):
    path = stores["b"]
    result = compute_masks(open_store(path), MaskOptions(SPARSITIES, "wanda", (), wanda_compare=compare),
                           weights).masks["wanda"]
    for s in SPARSITIES:
        if compare == "scope":
            expected = reference_masks(path, "global", "element", s, "wanda", weights)
        else:  # within each output row of each weight
            expected = {}
            for p in BLOCK_PARAMS:
                score = element_score(path, p, "wanda", weights)
                keep = np.zeros(score.shape, dtype=bool)
                for row in range(score.shape[0]):
                    ranked = sorted(range(score.shape[1]), key=lambda j: (-score[row, j], j))
                    keep[row, ranked[: reference_keep(s, score.shape[1])]] = True
                expected[p] = keep
        for p in BLOCK_PARAMS:
            np.testing.assert_array_equal(result[s][p], expected[p], err_msg=f"{p} at {s}, {compare}")


def test_random_masks_are_seeded_and_share_nothing_with_the_scores(stores, weights):
    options = MaskOptions((0.5,), "random", ())
    first = compute_masks(open_store(stores["a"]), options, weights).masks["random"][0.5]
    again = compute_masks(open_store(stores["b"]), options, weights).masks["random"][0.5]
    other = compute_masks(open_store(stores["a"]), MaskOptions((0.5,), "random", (), seed=1), weights)
    for p in BLOCK_PARAMS:
        np.testing.assert_array_equal(first[p], again[p])  # the same seed: the same mask in every task
    assert any((first[p] != other.masks["random"][0.5][p]).any() for p in BLOCK_PARAMS)
    assert sum(int(m.sum()) for m in first.values()) == reference_keep(0.5, sum(first[p].size for p in BLOCK_PARAMS))


def test_masks_keep_exact_counts_with_ties(tied_store, weights):
    fisher = np.concatenate([raw(tied_store, "fisher", p).ravel() for p in BLOCK_PARAMS])
    assert len(np.unique(fisher)) <= 3  # the store really is full of ties
    result = compute_masks(open_store(tied_store), MaskOptions(SPARSITIES, "fisher", ()), weights).masks["fisher"]
    for s in SPARSITIES:
        kept = sum(int(m.sum()) for m in result[s].values())
        assert kept == reference_keep(s, fisher.size)
    assert all(m.all() for m in result[0.0].values())
    assert not any(m.any() for m in result[1.0].values())


def test_run_masks_writes_safetensors_and_summary(stores, weights, tmp_path):
    options = MaskOptions((0.5, 0.9), "saliency", ("magnitude",), "per_tensor", "element", include=r"\.layers\.")
    paths = run_masks(stores["a"], tmp_path / "masks" / "a", options, weights=weights)
    file = MasksFile(paths["masks"])
    assert file.criteria == ["saliency", "magnitude"] and file.sparsities == ["0.5", "0.9"]
    assert file.metadata["criterion"] == "saliency" and file.metadata["task"] == "a"
    masked = [p for p in PARAMS if layer(p) is not None]
    assert file.params == masked
    expected = compute_masks(open_store(stores["a"]), options, weights)
    for criterion, p in itertools.product(("saliency", "magnitude"), masked):
        stored = file.read(criterion, "0.9", p)
        assert stored.dtype == bool
        np.testing.assert_array_equal(stored, expected.masks[criterion][0.9][p])
    summary = pd.read_parquet(paths["mask_summary_parquet"])
    tensor_rows = summary[(summary["level"] == "tensor") & (summary["sparsity"] == 0.5)
                          & (summary["criterion"] == "magnitude")].set_index("name")
    for p in masked:
        size = int(np.prod(SHAPES[p]))
        assert tensor_rows.loc[p, "kept_elements"] == reference_keep(0.5, size)
        assert tensor_rows.loc[p, "kept_fraction"] == pytest.approx(reference_keep(0.5, size) / size)
    model = summary[(summary["level"] == "global") & (summary["sparsity"] == 0.9)]
    assert set(model["criterion"]) == {"saliency", "magnitude"}
    assert (model["n_elements"] == sum(int(np.prod(SHAPES[p])) for p in masked)).all()


def test_mask_options_are_validated(stores):
    with pytest.raises(ConfigError, match="sparsities"):
        MaskOptions(sparsities=(0.5, 1.5))
    with pytest.raises(ConfigError, match="scope"):
        MaskOptions(scope="per_head")
    with pytest.raises(ConfigError, match="granularity"):
        MaskOptions(granularity="row")
    with pytest.raises(ConfigError, match=r"masks\.criterion = 'obd': choose one of saliency, fisher, magnitude"):
        MaskOptions(criterion="obd")
    with pytest.raises(ConfigError, match=r"scope = 'per_tensor' with granularity 'head': a head spans several "
                                          r"tensors .*use scope global or per_layer"):
        MaskOptions(scope="per_tensor", granularity="head")
    store = open_store(stores["a"])
    with pytest.raises(ConfigError, match=r"wanda scores the weights of Linear / Conv1D layers.*model\.embed_tokens"
                                          r"\.weight is neither.*restrict masks\.include"):
        compute_masks(store, MaskOptions((0.5,), "wanda", (), include=None), {p: np.ones(SHAPES[p]) for p in PARAMS})
    with pytest.raises(PhaseInputError, match=r"criterion 'magnitude' needs the model's weights"):
        compute_masks(store, MaskOptions((0.5,), "magnitude", ()))
    with pytest.raises(ConfigError, match=r"granularity = 'head', but no parameter masks\.include selects holds head"):
        compute_masks(store, MaskOptions((0.5,), "fisher", (), granularity="head", include="mlp"))


def test_split_groups_mask_every_block(tmp_path):
    """A neuron made of two row blocks (Phi-3's fused gate/up) is kept or dropped as one unit."""
    gate_up, down = "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight"
    path = make_store(tmp_path / "phi.zarr", shapes={gate_up: (8, 3), down: (3, 4)},
                      specs={gate_up: GroupSpec.heads(0, ("neuron", 4, 1), ("neuron", 4, 1)),
                             down: GroupSpec.heads(1, ("neuron", 4, 1))})
    store = open_store(path)
    fisher_up, fisher_down = store.fisher(gate_up).astype(np.float64), store.fisher(down).astype(np.float64)
    score = ((fisher_up[:4] + fisher_up[4:]).sum(1) + fisher_down.sum(0)) / 9  # both row blocks and the column
    result = compute_masks(store, MaskOptions((0.5,), "fisher", (), granularity="neuron", include="mlp"))
    kept = np.argsort(-score, kind="stable")[:2]
    expected = np.zeros((8, 3), dtype=bool)
    expected[kept] = expected[kept + 4] = True
    np.testing.assert_array_equal(result.masks["fisher"][0.5][gate_up], expected)
    expected_down = np.zeros((3, 4), dtype=bool)
    expected_down[:, kept] = True  # neuron n is column n of the down projection
    np.testing.assert_array_equal(result.masks["fisher"][0.5][down], expected_down)


# --- phase 4: overlap ------------------------------------------------------------------
def reference_hypergeometric(n: int, k_a: int, k_b: int, observed: int) -> tuple[float, float]:
    """Exact E[Jaccard] and P(K >= observed) by enumerating the pmf with binomial coefficients."""
    total = math.comb(n, k_b)
    pmf = {k: math.comb(k_a, k) * math.comb(n - k_a, k_b - k) / total for k in range(min(k_a, k_b) + 1)}
    expected_jaccard = sum(p * k / (k_a + k_b - k) for k, p in pmf.items()) if k_a + k_b else math.nan
    return expected_jaccard, sum(p for k, p in pmf.items() if k >= observed)


@pytest.mark.parametrize("n,k_a,k_b,k", [(30, 10, 12, 6), (30, 10, 12, 0), (8, 8, 8, 8), (20, 0, 5, 0), (25, 3, 20, 3)])
def test_overlap_metrics_match_hand_computation(n, k_a, k_b, k):
    metrics = overlap_metrics(n, k_a, k_b, k)
    expected_jaccard, p_value = reference_hypergeometric(n, k_a, k_b, k)
    assert metrics["jaccard"] == pytest.approx(k / (k_a + k_b - k))
    assert metrics["dice"] == pytest.approx(2 * k / (k_a + k_b))
    if min(k_a, k_b):
        assert metrics["overlap_coefficient"] == pytest.approx(k / min(k_a, k_b))
    else:
        assert math.isnan(metrics["overlap_coefficient"])
    assert metrics["expected_intersection"] == pytest.approx(k_a * k_b / n)
    assert metrics["expected_jaccard"] == pytest.approx(expected_jaccard, rel=1e-12)
    assert metrics["p_value"] == pytest.approx(p_value, rel=1e-9)


def test_overlap_expected_jaccard_large_n():
    """Large counts: the windowed pmf sum still equals the full enumeration."""
    n, k_a, k_b = 3000, 1400, 900
    expected_jaccard, p_value = reference_hypergeometric(n, k_a, k_b, 430)
    metrics = overlap_metrics(n, k_a, k_b, 430)
    assert metrics["expected_jaccard"] == pytest.approx(expected_jaccard, rel=1e-10)
    assert metrics["p_value"] == pytest.approx(p_value, rel=1e-6)


@pytest.fixture(scope="module")
def mask_paths(stores, tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    options = MaskOptions((0.0, 0.5, 0.8, 1.0), "fisher", ("random",), "global", "element")
    return {t: run_masks(stores[t], root / t, options)["masks"] for t in "abc"}


def test_overlap_table_matches_sets(mask_paths, tmp_path):
    paths = run_overlap(mask_paths, tmp_path / "overlap")
    table = pd.read_parquet(paths["overlap_parquet"])
    masks = {t: MasksFile(p) for t, p in mask_paths.items()}
    assert set(zip(table["task_a"], table["task_b"], strict=True)) == {("a", "b"), ("a", "c"), ("b", "c")}
    for s, (ta, tb) in itertools.product(("0.5", "0.8"), [("a", "b"), ("b", "c")]):
        # the default criterion's masks (fisher), not the baseline's
        sets = {t: {(p, i) for p in BLOCK_PARAMS for i in np.flatnonzero(masks[t].read("fisher", s, p))}
                for t in (ta, tb)}
        rows = table[(table["sparsity"] == float(s)) & (table["task_a"] == ta) & (table["task_b"] == tb)]
        for level, members in [("global", BLOCK_PARAMS), ("layer", [p for p in BLOCK_PARAMS if layer(p) == 1]),
                               ("tensor", ["model.layers.0.mlp.up_proj.weight"])]:
            a = {x for x in sets[ta] if x[0] in members}
            b = {x for x in sets[tb] if x[0] in members}
            n = sum(int(np.prod(SHAPES[p])) for p in members)
            name = {"global": "model", "layer": "layer.1", "tensor": members[0]}[level]
            row = rows[(rows["level"] == level) & (rows["name"] == name)].iloc[0]
            counts = (row["n_elements"], row["kept_a"], row["kept_b"], row["intersection"])
            assert counts == (n, len(a), len(b), len(a & b))
            assert row["jaccard"] == pytest.approx(len(a & b) / len(a | b))
            assert row["dice"] == pytest.approx(2 * len(a & b) / (len(a) + len(b)))
            assert row["overlap_coefficient"] == pytest.approx(len(a & b) / min(len(a), len(b)))
            assert row["expected_intersection"] == pytest.approx(len(a) * len(b) / n)
    full = table[table["sparsity"] == 0.0]
    assert (full["jaccard"] == 1).all() and (full["expected_jaccard"] == 1).all() and (full["p_value"] == 1).all()
    empty = table[table["sparsity"] == 1.0]
    assert empty["jaccard"].isna().all() and empty["expected_jaccard"].isna().all()
    assert (empty["intersection"] == 0).all()
    assert paths["overlap_heatmap"].stat().st_size > 1000


def test_overlap_single_task_is_empty_not_a_crash(mask_paths, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        paths = run_overlap({"a": mask_paths["a"]}, tmp_path / "overlap")
    assert "needs two tasks" in caplog.text
    table = pd.read_csv(paths["overlap_csv"])
    assert table.empty and "jaccard" in table.columns and "p_value" in table.columns
    assert paths["overlap_heatmap"].exists()


def test_overlap_refuses_masks_made_differently(stores, mask_paths, tmp_path):
    other = run_masks(stores["b"], tmp_path / "b", MaskOptions((0.0, 0.5, 0.8, 1.0), "fisher", ("random",),
                                                               "per_layer", "element"))
    with pytest.raises(ValueError, match="scope"):
        run_overlap({"a": mask_paths["a"], "b": other["masks"]}, tmp_path / "overlap")
    with pytest.raises(ValueError, match="heatmap_metric"):
        OverlapOptions(heatmap_metric="cosine")


# --- phase 7: scaled -------------------------------------------------------------------
def reference_natgrad(path, param: str, damping: float) -> np.ndarray:
    fisher, grad = raw(path, "fisher", param), raw(path, "grad_mean", param)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(fisher + damping > 0, grad / (fisher + damping), 0.0)


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
def test_natural_gradient_norms_match_formula(stores, damping):
    table = natgrad_norms(open_store(stores["a"]), "a", ScaledOptions(damping=damping))
    assert np.isfinite(table["natgrad_norm"]).all()  # the all-zero tensor gives 0, not 0/0
    groups = table[table["level"] == "group"].set_index(["param", "group"])
    for param in PARAMS:
        natgrad, grad = reference_natgrad(stores["a"], param, damping), raw(stores["a"], "grad_mean", param)
        for name, index in all_units(param):
            assert groups.loc[(param, name), "natgrad_norm"] == pytest.approx(np.linalg.norm(natgrad[index]), rel=1e-10)
            assert groups.loc[(param, name), "grad_norm"] == pytest.approx(np.linalg.norm(grad[index]), rel=1e-10)
    assert groups.loc[(ZERO, "v.h0"), "natgrad_norm"] == 0
    layer_rows = table[table["level"] == "layer"].set_index("name")
    layer0 = np.concatenate([reference_natgrad(stores["a"], p, damping).ravel() for p in PARAMS if layer(p) == 0])
    assert layer_rows.loc["layer.0", "natgrad_norm"] == pytest.approx(np.linalg.norm(layer0), rel=1e-10)


def test_cross_task_cosine_and_ewc_match_formula(stores):
    options = ScaledOptions(damping=1e-2, eta=0.3)
    opened = {t: open_store(stores[t]) for t in "abc"}
    cosine, ewc = cross_task_tables(opened, options)
    nat = {t: {p: reference_natgrad(stores[t], p, 1e-2) for p in PARAMS} for t in "abc"}
    fisher = {t: {p: raw(stores[t], "fisher", p) for p in PARAMS} for t in "abc"}

    def cos(x, y):
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    groups = cosine[cosine["level"] == "group"].set_index(["task_a", "task_b", "param", "group"])
    for param in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        for name, index in all_units(param):
            expected = cos(nat["b"][param][index].ravel(), nat["c"][param][index].ravel())
            assert groups.loc[("b", "c", param, name), "cosine"] == pytest.approx(expected, rel=1e-9)
    layers = cosine[cosine["level"] == "layer"].set_index(["task_a", "task_b", "name"])
    for lay in (0, 1):
        members = [p for p in PARAMS if layer(p) == lay]
        x = np.concatenate([nat["a"][p].ravel() for p in members])
        y = np.concatenate([nat["c"][p].ravel() for p in members])
        assert layers.loc[("a", "c", f"layer.{lay}"), "cosine"] == pytest.approx(cos(x, y), rel=1e-9)

    layer_costs = ewc[ewc["level"] == "layer"].set_index(["task_a", "task_b", "name"])
    for a, b, lay in itertools.product("abc", "abc", (0, 1)):
        expected = sum(0.5 * np.sum(fisher[a][p] * (0.3 * nat[b][p]) ** 2) for p in PARAMS if layer(p) == lay)
        assert layer_costs.loc[(a, b, f"layer.{lay}"), "cost"] == pytest.approx(expected, rel=1e-10)
    model = ewc[ewc["level"] == "global"]
    assert len(model) == 9  # every ordered pair, diagonal included


def test_run_scaled_writes_outputs(stores, tmp_path, caplog):
    task_paths = run_scaled_task(stores["a"], tmp_path / "scaled" / "a")
    assert not pd.read_parquet(task_paths["natgrad_norms_parquet"]).empty
    cross = run_scaled_cross({t: stores[t] for t in "ab"}, tmp_path / "scaled" / "cross")
    assert len(pd.read_csv(cross["ewc_cost_csv"]).query("level == 'global'")) == 4
    assert cross["ewc_cost_heatmap"].exists() and cross["natgrad_cosine_heatmap"].exists()
    with caplog.at_level(logging.WARNING):
        single = run_scaled_cross({"a": stores["a"]}, tmp_path / "scaled" / "single")
    assert "need two tasks" in caplog.text
    assert pd.read_parquet(single["natgrad_cosine_parquet"]).empty


# --- every phase ---------------------------------------------------------------------
@pytest.fixture
def nan_store(tmp_path):
    # Phase 1 never folds a non-finite gradient in; a store corrupted afterwards must still be refused.
    path = make_store(tmp_path / "nan.zarr", n_samples=N, task="nan", grads=random_gradients(SHAPES, N, 3))
    for kind, index in (("fisher", (4, 1)), ("grad_mean", (4, 1)), ("group", 4), ("group_m2", 4)):
        zarr.open_array(path / kind / "model.layers.1.mlp.up_proj.weight", mode="r+")[index] = np.nan
    write_manifest(path)  # as if phase 1 had written the NaNs: the phases' own check must refuse them
    return path


def test_nan_in_a_store_is_refused_naming_the_tensor(nan_store, stores, tmp_path):
    calls = [
        lambda: run_importance(nan_store, tmp_path / "importance"),
        lambda: run_masks(nan_store, tmp_path / "masks", MaskOptions(criterion="fisher", baselines=())),
        lambda: run_masks(nan_store, tmp_path / "masks", MaskOptions(criterion="fisher", baselines=(),
                                                                     granularity="neuron")),
        lambda: run_scaled_task(nan_store, tmp_path / "scaled"),
        lambda: run_scaled_cross({"a": stores["a"], "nan": nan_store}, tmp_path / "cross"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*nan\.zarr"):
            call()
    assert not any(tmp_path.glob("*partial*")) and not (tmp_path / "importance").exists()


def test_a_failed_rerun_keeps_previous_outputs(stores, nan_store, tmp_path):
    out = tmp_path / "importance"
    first = run_importance(stores["a"], out)
    with pytest.raises(ValueError):
        run_importance(nan_store, out)
    assert first["tensors_parquet"].exists()
    again = run_importance(stores["b"], out)  # a rerun replaces the directory as a whole
    assert (pd.read_parquet(again["tensors_parquet"])["task"] == "b").all()


def test_phases_never_read_per_sample_arrays(stores, tmp_path, monkeypatch):
    real_array = FisherStore.array

    def guarded(self, kind, name):
        assert kind != "per_sample", f"phase read per_sample/{name}"
        return real_array(self, kind, name)

    monkeypatch.setattr(FisherStore, "array", guarded)
    for method in ("per_sample", "per_sample_slice", "contributions"):
        monkeypatch.setattr(FisherStore, method, lambda *a, **k: pytest.fail("phase read per-sample data"))
    assert open_store(stores["a"]).attrs["per_sample_params"]  # the stores do hold per-sample data
    two = {t: stores[t] for t in "ab"}
    run_importance(stores["a"], tmp_path / "i")
    run_rank_agreement(two, tmp_path / "r")
    options = MaskOptions(criterion="saliency", baselines=("fisher", "random"), granularity="head")
    masks = {t: run_masks(stores[t], tmp_path / f"m{t}", options)["masks"] for t in "ab"}
    run_overlap(masks, tmp_path / "o")
    run_scaled_task(stores["a"], tmp_path / "s")
    run_scaled_cross(two, tmp_path / "x")


def test_row_selection_equals_a_stable_sort_per_row_with_ties():
    from fisher_pipeline.phases.masks.compute import select_top_rows

    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(40, 11)).astype(np.float32)  # mostly ties
    result = select_top_rows(scores, SPARSITIES)
    for s in SPARSITIES:
        for row, flags in zip(scores, result[s], strict=True):
            ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))
            expected = np.zeros(len(row), dtype=bool)
            expected[ranked[: reference_keep(s, len(row))]] = True
            np.testing.assert_array_equal(flags, expected, err_msg=str(s))
