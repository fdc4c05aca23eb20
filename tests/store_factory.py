"""Real phase 1 stores of a tiny Llama-like layout, built from random per-sample gradients.

Stores go through the production `FisherAccumulator` and `StoreWriter`, so the analysis
phases are tested on exactly what phase 1 writes, without running a model: the gates and
group saliencies from the gradients and seeded random weights (`random_weights`), the
input second moments of the projection weights from seeded random input sums.

Tiny layout (`llama_layout`): 2 layers, d_model 6, 4 query heads and 2 KV heads of
dim 2 (GQA: 2 query heads per KV head), MLP width 10, vocab 12.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fisher_pipeline.accumulate import FisherAccumulator
from fisher_pipeline.layout import AttentionGeometry, GroupSpec, ModelGeometry, ParamGeometry
from fisher_pipeline.store import StoreWriter

D_MODEL, N_HEADS, N_KV_HEADS, HEAD_DIM, WIDTH, VOCAB = 6, 4, 2, 2, 10, 12


def llama_layout(n_layers: int = 2) -> tuple[dict[str, tuple[int, ...]], dict[str, GroupSpec]]:
    """Shapes and group specs of a tiny Llama-like model, grouped as `LlamaAdapter` does."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, D_MODEL), "model.norm.weight": (D_MODEL,),
    }
    specs: dict[str, GroupSpec] = {}
    for layer in range(n_layers):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        shapes |= {
            f"{attn}.q_proj.weight": (N_HEADS * HEAD_DIM, D_MODEL),
            f"{attn}.k_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
            f"{attn}.v_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
            f"{attn}.o_proj.weight": (D_MODEL, N_HEADS * HEAD_DIM),
            f"{mlp}.gate_proj.weight": (WIDTH, D_MODEL),
            f"{mlp}.up_proj.weight": (WIDTH, D_MODEL),
            f"{mlp}.down_proj.weight": (D_MODEL, WIDTH),
            f"model.layers.{layer}.input_layernorm.weight": (D_MODEL,),
        }
        for block, count in (("q", N_HEADS), ("k", N_KV_HEADS), ("v", N_KV_HEADS)):
            specs[f"{attn}.{block}_proj.weight"] = GroupSpec.heads(0, (block, count, HEAD_DIM))
        specs[f"{attn}.o_proj.weight"] = GroupSpec.heads(1, ("o", N_HEADS, HEAD_DIM))
        specs[f"{mlp}.gate_proj.weight"] = specs[f"{mlp}.up_proj.weight"] = GroupSpec.heads(0, ("neuron", WIDTH, 1))
        specs[f"{mlp}.down_proj.weight"] = GroupSpec.heads(1, ("neuron", WIDTH, 1))
    for name, shape in shapes.items():
        specs.setdefault(name, GroupSpec.whole(shape))
    return shapes, specs


#: Roles of the weights that the factory gives input second moments (Linear layers' weights).
LINEAR_ROLES = frozenset({"q", "k", "v", "o", "qkv", "mlp_in", "mlp_out"})
#: Scored token positions per sample in factory stores (their `samples/n_tokens`).
TOKENS_PER_SAMPLE = 5

#: Roles of the tiny layout's modules (this test layout's own naming, Llama style).
_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "mlp_in", "up_proj": "mlp_in",
          "gate_up_proj": "mlp_in", "down_proj": "mlp_out", "embed_tokens": "embed"}


def tiny_geometry(shapes: dict[str, tuple[int, ...]], specs: dict[str, GroupSpec],
                  n_layers: int = 2) -> ModelGeometry:
    """The geometry phase 1 would store for a tiny Llama-like layout."""
    params = {}
    for name, shape in shapes.items():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        module = name.split(".")[-2]
        role = _ROLES.get(module, "norm" if "norm" in module else "other")
        params[name] = ParamGeometry(name, shape, int(layer.group(1)) if layer else None, role,
                                     specs.get(name) or GroupSpec.whole(shape))
    gqa = tuple(h // (N_HEADS // N_KV_HEADS) for h in range(N_HEADS))
    return ModelGeometry(AttentionGeometry(n_layers, N_HEADS, N_KV_HEADS, HEAD_DIM, gqa), params)


def random_gradients(shapes: dict[str, tuple[int, ...]], n_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Per-sample gradients `[N, *shape]` whose scale varies by element (a spread of Fisher values)."""
    rng = np.random.default_rng(seed)
    grads = {}
    for name, shape in shapes.items():
        scale = np.exp(rng.normal(size=shape))
        offset = 0.5 * rng.normal(size=shape)  # a non-zero mean gradient
        grads[name] = (offset + rng.normal(size=(n_samples, *shape)) * scale).astype(np.float32)
    return grads


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Parameter values (float32) for the gates `sum g * w`: standard normal, seeded."""
    rng = np.random.default_rng([seed, 1])
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in sorted(shapes.items())}


def linear_input_dims(geometry: ModelGeometry) -> dict[str, int]:
    """The factory's Linear weights: 2-D `.weight`s of projection roles, input features along dim 1."""
    return {name: 1 for name, geo in geometry.params.items()
            if geo.role in LINEAR_ROLES and name.endswith(".weight") and len(geo.shape) == 2}


def make_store(path: str | Path, n_samples: int = 8, seed: int = 0, task: str = "task",
               shapes: dict[str, tuple[int, ...]] | None = None, specs: dict[str, GroupSpec] | None = None,
               grads: dict[str, np.ndarray] | None = None, per_sample: tuple[str, ...] = (),
               batch_size: int = 3, weights_hash: str = "tiny-weights", attrs: dict | None = None,
               per_sample_dtype: str = "float32", geometry: ModelGeometry | None = None,
               weights: dict[str, np.ndarray] | None = None, input_dims: dict[str, int] | None = None,
               first_id: int = 0) -> Path:
    """Write a complete phase 1 store at `path` and return it.

    Args:
        path: store path (`.../{task}.zarr`).
        n_samples: N.
        seed: seed of the random gradients.
        task: the store's task attr.
        shapes, specs: layout (default `llama_layout()`).
        grads: per-sample gradients `[N, *shape]` replacing the random ones for some parameters
            (e.g. zeros for an all-zero Fisher, few distinct values for ties).
        per_sample: parameters whose per-sample gradients are stored.
        batch_size: micro-batch size fed to the accumulator.
        weights_hash: model identity recorded in the attrs.
        attrs: store attributes overriding the defaults (e.g. `fisher_kind`).
        per_sample_dtype: storage dtype of the per-sample arrays (`float32` or `float16`).
        geometry: the stored geometry (e.g. an adapter's `geometry()` of a tiny model), used
            instead of `tiny_geometry`; shapes and specs are then taken from it.
        weights: parameter values for the gates (default `random_weights(shapes, seed)`).
        input_dims: weights given input second moments -> their input dim (default
            `linear_input_dims`); each sample adds `TOKENS_PER_SAMPLE` positions of random
            squares.
        first_id: sample ids are `{task}-{first_id + i}` (a held-out store's ids follow the analysed ones).
    """
    if geometry is not None:
        shapes = {name: geo.shape for name, geo in geometry.params.items()}
        specs = {name: geo.groups for name, geo in geometry.params.items()}
    if shapes is None:
        shapes, default_specs = llama_layout()
        specs = specs or default_specs
    specs = {name: (specs or {}).get(name) or GroupSpec.whole(shape) for name, shape in shapes.items()}
    overrides = {name: np.asarray(values, np.float32) for name, values in (grads or {}).items()}
    all_grads = random_gradients(shapes, n_samples, seed) | overrides
    geometry = geometry or tiny_geometry(shapes, specs)
    values = {name: torch.from_numpy(np.asarray(w, np.float32))
              for name, w in (weights or random_weights(shapes, seed)).items()}
    input_dims = linear_input_dims(geometry) if input_dims is None else input_dims
    accumulator = FisherAccumulator(shapes, specs, m2_names=set(), per_sample_names=set(per_sample), weights=values,
                                    input_dims=input_dims)
    store_attrs = {"model_id": "tiny-llama", "weights_hash": weights_hash, "task": task, "config_hash": "test",
             "fisher_kind": "empirical", "package_version": "test"} | (attrs or {})
    writer = StoreWriter(path, store_attrs, geometry, per_sample, per_sample_dtype, max_samples=n_samples)
    inputs = np.random.default_rng([seed, 2])
    for start in range(0, n_samples, batch_size):
        stop = min(start + batch_size, n_samples)
        accumulator.begin(stop - start)
        for name, shape in shapes.items():
            accumulator.add(name, 0, shape[0], torch.tensor(all_grads[name][start:stop]))
        positions = (stop - start) * TOKENS_PER_SAMPLE
        for name, dim in sorted(input_dims.items()):
            features = shapes[name][dim]
            sums = np.square(inputs.standard_normal((positions, features)) * inputs.lognormal(0, 1, features)).sum(0)
            accumulator.add_inputs(name, torch.from_numpy(sums), positions)
        committed = accumulator.commit()
        ids = [f"{task}-{first_id + i}" for i in range(start, stop)]
        writer.append(ids, torch.full((stop - start,), TOKENS_PER_SAMPLE), torch.ones(stop - start), committed,
                      accumulator.sample_gates)
    return writer.close(accumulator)
