"""Phase 1 through Snakemake on a tiny random model of every supported family."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fisher_pipeline.store import open_store
from test_workflow_phases import snakemake
from tiny_models import FAMILIES

pytestmark = pytest.mark.workflow


@pytest.mark.parametrize("family", FAMILIES)
def test_phase1_workflow_runs_on_family(family, tiny_model_dir, tmp_path):
    config = {
        "model": {"path": str(tiny_model_dir(family))},
        "tasks": {"prose": {"source": "builtin:prose", "n_samples": 5, "max_length": 24}},
        "fisher": {"batch_size": 2},  # default per-sample regex: attention projections of any family
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    snakemake(tmp_path, configfile, "--cores", "1", "results/fisher/prose.zarr")
    store = open_store(tmp_path / "results" / "fisher" / "prose.zarr")
    assert store.n_samples == 5 and store.attrs["model_type"] == family
    assert store.per_sample_names, "the default regex selected no attention projection"
    for name in store.per_sample_names:
        np.testing.assert_allclose(store.contributions(name).mean(0), store.fisher(name), rtol=2e-2, atol=1e-9)
    assert (tmp_path / "logs" / "fisher" / "prose.log").exists()
    assert (tmp_path / "logs" / "benchmarks" / "fisher" / "prose.tsv").exists()
