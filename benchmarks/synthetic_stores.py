"""Phase 1 stores of random per-sample gradients in a real model's attention geometry, through our writer.

The pair phases' cost depends on the stores' shapes, the number of samples and the storage
dtype, not on what the gradients mean, so their speed is measured on stores whose
per-sample gradients are random (a per-element scale and a small mean, as in the tests'
store factory) but whose layout is a real model's: the geometry our adapter gives the
model built from its config on the meta device, restricted to the attention projections of
its first `layers` layers. The stores go through `FisherAccumulator` and `StoreWriter`, so
they are exactly what phase 1 writes (float16 per-sample rows, integrity record).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: SmolLM2-135M's attention shape (config.json of the checkpoint bundled with the project).
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 64, "tie_word_embeddings": True, "head_dim": 64}
BATCH = 16


def attention_geometry(layers: int = 3, config: dict | None = None):
    """The adapter's geometry of `config` (default SmolLM2's shape) with `layers` layers, Q/K/V/O weights only."""
    import transformers

    from fisher_pipeline.layout import ModelGeometry
    from fisher_pipeline.models.adapters import adapter_for

    config = dict(config or SMOLLM2)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), num_hidden_layers=layers, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    geometry = adapter_for(model).geometry()
    params = {name: geo for name, geo in geometry.params.items() if geo.role in ("q", "k", "v", "o")}
    return ModelGeometry(geometry.attention, params)


def write_store(path: Path, geometry, n_samples: int, seed: int, task: str) -> Path:
    """Write a float16 phase 1 store of `n_samples` random per-sample gradients of every parameter of `geometry`."""
    from fisher_pipeline.accumulate import FisherAccumulator
    from fisher_pipeline.store import StoreWriter

    shapes = {name: geo.shape for name, geo in geometry.params.items()}
    specs = {name: geo.groups for name, geo in geometry.params.items()}
    rng = np.random.default_rng(seed)
    scale = {name: np.exp(rng.normal(size=shape)).astype(np.float32) * 1e-3 for name, shape in shapes.items()}
    offset = {name: 0.2 * rng.normal(size=shape).astype(np.float32) * scale[name] for name, shape in shapes.items()}
    weights = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    accumulator = FisherAccumulator(shapes, specs, m2_names=set(), per_sample_names=set(shapes), weights=weights)
    attrs = {"model_id": "synthetic-smollm2-attention", "weights_hash": "synthetic", "task": task,
             "config_hash": "synthetic", "fisher_kind": "empirical", "package_version": "benchmark"}
    writer = StoreWriter(path, attrs, geometry, list(shapes), "float16", max_samples=n_samples, shard_samples=BATCH)
    for start in range(0, n_samples, BATCH):
        stop = min(start + BATCH, n_samples)
        accumulator.begin(stop - start)
        for name, shape in shapes.items():
            noise = rng.standard_normal((stop - start, *shape), dtype=np.float32)
            accumulator.add(name, 0, shape[0], torch.from_numpy(offset[name] + noise * scale[name]))
        committed = accumulator.commit()
        writer.append([f"{task}-{i}" for i in range(start, stop)], torch.full((stop - start,), 64),
                      torch.ones(stop - start), committed, accumulator.sample_gates)
    return writer.close(accumulator)


def sweep_stores(folder: Path, n_samples: int, layers: int = 3) -> dict[str, Path]:
    """Two tasks' stores with `n_samples` samples each under `folder/n{N}` (reused when complete)."""
    from fisher_pipeline.store import open_store

    geometry = attention_geometry(layers)
    paths = {}
    for seed, task in enumerate(("alpha", "beta")):
        path = folder / f"n{n_samples}" / f"{task}.zarr"
        try:
            if open_store(path).n_samples == n_samples:
                paths[task] = path
                continue
        except Exception:  # absent or incomplete: write it (the writer replaces it atomically)
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        paths[task] = write_store(path, geometry, n_samples, seed, task)
    return paths
