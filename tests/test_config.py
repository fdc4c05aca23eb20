"""Config parsing: schema and dataclasses agree; unknown keys are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from fisher_pipeline.config import FisherConfig, ModelConfig, PipelineConfig, TaskConfig
from fisher_pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")


def test_schema_defaults_equal_dataclass_defaults():
    config = {"tasks": {"t": {"source": "builtin:prose"}}}
    validate(config, SCHEMA)
    for section, cls in (("model", ModelConfig), ("fisher", FisherConfig)):
        expected = {f.name: f.default for f in dataclasses.fields(cls)}
        assert config[section] == expected, section
    task_defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig) if f.name not in ("name", "source")}
    assert {k: v for k, v in config["tasks"]["t"].items() if k != "source"} == task_defaults


def test_default_config_is_valid_and_parses():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, SCHEMA)
    parsed = PipelineConfig.from_dict(config)
    assert sorted(parsed.tasks) == ["arithmetic", "code", "prose"]


def test_mistyped_key_is_named_by_schema_and_dataclasses():
    config = {"tasks": {"t": {"source": "builtin:prose"}}, "fisher": {"batchsize": 4}}
    with pytest.raises(Exception, match="'batchsize' was unexpected"):
        validate(config, SCHEMA)
    with pytest.raises(ConfigError, match=r"fisher\.batchsize.*valid keys of 'fisher'.*batch_size"):
        PipelineConfig.from_dict(config)
    with pytest.raises(ConfigError, match=r"tasks\.t\.n_sample"):
        PipelineConfig.from_dict({"tasks": {"t": {"source": "x", "n_sample": 3}}})
    with pytest.raises(ConfigError, match="unknown top-level config key.*fishr"):
        PipelineConfig.from_dict({"fishr": {}})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="fisher.labels = 'true'.*empirical, sampled"):
        PipelineConfig.from_dict({"fisher": {"labels": "true"}})
    with pytest.raises(ConfigError, match="batch_size = 0"):
        PipelineConfig.from_dict({"fisher": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="not a valid regex"):
        PipelineConfig.from_dict({"fisher": {"per_sample_params": "(("}})
    with pytest.raises(ConfigError, match="tasks.t.source is missing"):
        PipelineConfig.from_dict({"tasks": {"t": {}}})
