"""Head geometry in the store: written by phase 1 from the adapters, enough to split any
stored tensor into heads without the model, for every family; named selections.

The chain of proof: `test_adapters.py` proves the adapters' head slices by perturbing the
models; here the store's geometry must equal the adapter's, and the bulk head split
(one read, one reshape) must equal taking the adapter's head slices one by one.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

from fisher_pipeline.config import PipelineConfig
from fisher_pipeline.errors import ConfigError, StoreFormatError
from fisher_pipeline.fisher import run_fisher
from fisher_pipeline.layout import HEAD_BLOCKS, GroupSpec, ModelGeometry, Segment
from fisher_pipeline.models.adapters import adapter_for
from fisher_pipeline.models.loading import load_model
from fisher_pipeline.store import open_store
from tiny_models import FAMILIES, build_tiny

#: The Q/K/V/O projections of every supported family, weights and biases, spelled out
#: independently of the adapters (the regex the project used before named selections).
ATTENTION_REGEX = (r"\.(self_attn|attn|attention)\."
                   r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj|query_key_value|dense)\.(weight|bias)$")
MLP_REGEX = r"\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj|c_fc|c_proj|dense_h_to_4h|dense_4h_to_h)\.(weight|bias)$"


@pytest.fixture(scope="module", params=FAMILIES)
def family_store(request, tiny_model_dir, tmp_path_factory):
    """A real phase 1 store of each family's tiny model, with every per-sample attention gradient."""
    family = request.param
    model_dir = tiny_model_dir(family)
    config = PipelineConfig.from_dict({
        "model": {"path": str(model_dir)},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 5, "max_length": 20}},
        "fisher": {"batch_size": 3, "per_sample_params": "attention", "per_sample_dtype": "float32"},
    })
    path = run_fisher(config, "prose", tmp_path_factory.mktemp(family) / "prose.zarr", progress=False)
    adapter = adapter_for(load_model(config.model).model)
    return family, open_store(path), adapter


def test_store_geometry_equals_the_adapters(family_store):
    _, store, adapter = family_store
    assert store.geometry == adapter.geometry()
    attention = store.geometry.attention
    assert attention.gqa_map == tuple(adapter.kv_head(h) for h in range(adapter.n_heads))
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (
        adapter.n_heads, adapter.n_kv_heads, adapter.head_dim)
    for name, geometry in store.geometry.params.items():
        assert geometry.shape == tuple(store.array("fisher", name).shape), name
        assert geometry.groups.length == (geometry.shape[geometry.groups.dim] if geometry.shape else 1), name


def test_bulk_head_split_equals_the_adapters_head_slices(family_store):
    """`store.heads` (one read, one reshape) == each head's slice taken one at a time."""
    _, store, adapter = family_store
    geometry = store.geometry
    ids = [store.sample_ids[3], store.sample_ids[1]]
    checked = 0
    for layer in range(adapter.n_layers):
        for block in HEAD_BLOCKS:
            params = geometry.head_params(layer, block)
            assert params, f"layer {layer} has no parameter holding {block} heads"
            n_heads = geometry.attention.n_heads_of(block)
            for name in params:
                stacked = store.heads(name, block)  # [N, H, ...]
                some = store.heads(name, block, ids=ids)
                fisher_heads = store.heads(name, block, kind="fisher")  # [H, ...]
                assert stacked.shape[:2] == (store.n_samples, n_heads), (name, stacked.shape)
                full = store.per_sample(name)
                np.testing.assert_array_equal(some, stacked[[3, 1]])
                np.testing.assert_array_equal(geometry[name].split_heads(full, block, batch_dims=1), stacked)
                for head in range(geometry.attention.n_heads):
                    owner = adapter.kv_head(head) if block in ("k", "v") else head
                    piece = next(p for p in adapter.head_slices(layer, block, head) if p.param == name)
                    expected = np.take(full, piece.index.numpy(), axis=piece.dim + 1)
                    got = np.moveaxis(stacked[:, owner], piece.dim + 1, piece.dim + 1)
                    np.testing.assert_array_equal(got, expected, err_msg=f"{name} {block} head {head}")
                    checked += 1
                # Per-head sums of the stored Fisher are the stored group sums of those heads.
                names = store.group_names(name)
                group_sums = store.group_fisher(name)
                for h in range(n_heads):
                    expected = group_sums[names.index(f"{block}.h{h}")]
                    np.testing.assert_allclose(fisher_heads[h].sum(dtype=np.float64), expected, rtol=1e-5)
    assert checked > 0


def test_a_wrong_position_breaks_the_split():
    """The split reads positions from the segments: moving one head's rows is seen."""
    spec = GroupSpec(0, (Segment("q", 0, 1, 2), Segment("k", 0, 1, 2), Segment("q", 1, 1, 2)))
    from fisher_pipeline.layout import AttentionGeometry, ParamGeometry

    geometry = ParamGeometry("w", (6, 3), 0, "qkv", spec)
    values = np.arange(18.0).reshape(6, 3)
    q = geometry.split_heads(values, "q")
    np.testing.assert_array_equal(q, np.stack([values[0:2], values[4:6]]))
    np.testing.assert_array_equal(geometry.split_heads(values, "k"), values[None, 2:4])
    with pytest.raises(KeyError, match="no 'o' groups"):
        geometry.split_heads(values, "o")
    # round trip through attrs keeps every position
    model = ModelGeometry(AttentionGeometry(1, 2, 1, 2, (0, 0)), {"w": geometry})
    restored = ModelGeometry.from_attrs(model.to_attrs())
    np.testing.assert_array_equal(restored["w"].split_heads(values, "q"), q)


@pytest.mark.parametrize("family", FAMILIES)
def test_named_selections_resolve_for_every_family(family):
    model = build_tiny(family, **({"attention_bias": True} if family == "llama" else {}))
    geometry = adapter_for(model).geometry()
    names = list(geometry.params)
    assert geometry.select("attention") == sorted(n for n in names if re.search(ATTENTION_REGEX, n))
    assert geometry.select("mlp") == sorted(n for n in names if re.search(MLP_REGEX, n))
    assert geometry.select("all") == sorted(names)
    assert geometry.select("none") == [] and geometry.select("") == []
    last = geometry.attention.n_layers - 1
    first_last = geometry.select("attention", [0, -1])
    assert {geometry[n].layer for n in first_last} == {0, last}
    assert first_last == sorted(n for n in geometry.select("attention") if geometry[n].layer in (0, last))
    assert geometry.select(r"\.weight$", [1]) == sorted(n for n in names if n.endswith(".weight")
                                                        and geometry[n].layer == 1)
    assert geometry.select("attention", [0]) != geometry.select("attention", [1])
    roles = {geometry[n].role for n in names}
    assert {"embed", "norm"} <= roles and not roles - {"q", "k", "v", "o", "qkv", "mlp_in", "mlp_out", "embed",
                                                       "lm_head", "norm", "other"}


def test_config_and_layout_know_the_same_named_selections():
    """One definition (roles.py, which imports nothing): the config checks names against it,
    the adapters resolve them through layout."""
    from fisher_pipeline import config, layout, roles

    assert config.NAMED_SELECTIONS is layout.NAMED_SELECTIONS is roles.NAMED_SELECTIONS


def test_selection_matching_nothing_names_it_and_real_parameters():
    geometry = adapter_for(build_tiny("llama")).geometry()
    with pytest.raises(ConfigError, match=r"fisher.per_sample_params = 'q_projj'.*matches no parameter.*"
                                          r"model\.embed_tokens\.weight"):
        geometry.select("q_projj", what="fisher.per_sample_params")
    with pytest.raises(ConfigError, match=r"layers = \[2\]: layer\(s\) \[2\] out of range; the model has 2 layers"):
        geometry.select("attention", [2], what="fisher.per_sample_params")
    with pytest.raises(ConfigError, match=r"'embed_tokens' in layers \[0\] matches no parameter"):
        geometry.select("embed_tokens", [0], what="fisher.per_sample_params")


def test_old_store_format_asks_for_a_rerun(tmp_path):
    from store_factory import make_store

    path = make_store(tmp_path / "old.zarr")
    root = zarr.open_group(path, mode="r+")
    root.attrs["format_version"] = 1
    zarr.consolidate_metadata(path)
    (path / "integrity.json").unlink()  # version 1 had no integrity record
    with pytest.raises(StoreFormatError, match="format version 1.*reads version 4.*Rerun phase 1"):
        open_store(path)
