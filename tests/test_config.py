"""Config parsing: one schema for the workflow and the Python API; dataclasses and docs agree with it."""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml

from fisher_pipeline import config_docs
from fisher_pipeline.__main__ import main
from fisher_pipeline.config import (
    NAMED_SELECTIONS,
    SCHEMA_PATH,
    FisherConfig,
    ModelConfig,
    PipelineConfig,
    TaskConfig,
    config_schema,
    load_yaml_strict,
    read_config_file,
    task_config,
    validate_config,
)
from fisher_pipeline.errors import ConfigError
from fisher_pipeline.phase_registry import registered_phases
from fisher_pipeline.phases.masks import MaskOptions
from fisher_pipeline.phases.scaled import ScaledOptions

ROOT = Path(__file__).resolve().parents[1]
TASK = {"tasks": {"t": {"source": "builtin:prose"}}}


def section_classes() -> dict[str, type]:
    """Every config section with a dataclass: phase 1's and every registered phase's."""
    return {"model": ModelConfig, "fisher": FisherConfig,
            **{section: phase.options for section, phase in registered_phases().items()}}


def dataclass_defaults(cls: type, skip: tuple[str, ...] = ()) -> dict:
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[f.name] = list(value) if isinstance(value, tuple) else value
    return values


# --- schema, dataclasses and files agree -------------------------------------------------------
def test_schema_defaults_equal_dataclass_defaults_in_every_section():
    filled = validate_config(TASK)
    sections = section_classes()
    assert set(sections) | {"tasks"} == set(config_schema()["properties"])
    for section, cls in sections.items():
        assert filled[section] == dataclass_defaults(cls), section
        assert set(cls.__config_schema__["properties"]) == {f.name for f in dataclasses.fields(cls)}, section
        assert cls() == cls(**filled[section]), section
    task_defaults = dataclass_defaults(TaskConfig, skip=("name", "source"))
    assert {k: v for k, v in filled["tasks"]["t"].items() if k != "source"} == task_defaults


def test_schema_ships_inside_the_package():
    assert SCHEMA_PATH == Path(str(resources.files("fisher_pipeline") / "schemas" / "config.schema.yaml"))
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "schemas/*.yaml" in package_data["fisher_pipeline"]
    assert not (ROOT / "workflow" / "schemas").exists()  # one copy only


def test_default_config_is_valid_and_parses():
    raw = read_config_file(ROOT / "config" / "config.yaml")
    validate_config(raw)
    parsed = PipelineConfig.from_dict(raw)
    assert sorted(parsed.tasks) == ["arithmetic", "code", "prose"]
    assert parsed.fisher.per_sample_params == parsed.fisher.fisher_m2_params == "attention"
    assert parsed.fisher.per_sample_layers is None  # every layer, for phase 5
    assert parsed.fisher.fisher_m2_layers == (0, -1)
    assert parsed.conflicts.similarity == "cosine" and parsed.conflicts.pairs is None
    assert parsed.masks.sparsities == (0.25, 0.5) and parsed.masks.criterion == "saliency"
    assert {t.n_heldout for t in parsed.tasks.values()} == {8} and parsed.mask_eval.n_samples == 4
    assert parsed.intervention.gains == (0.001,) and parsed.replication.alpha == 0.05
    assert isinstance(parsed.scaled, ScaledOptions) and parsed.scaled.damping == 0.1


def test_no_model_specific_regex_in_defaults():
    assert tuple(NAMED_SELECTIONS) == ("attention", "mlp", "blocks", "all", "none")
    assert FisherConfig().per_sample_params == FisherConfig().fisher_m2_params == "attention"
    assert FisherConfig().per_sample_layers is None and FisherConfig().fisher_m2_layers is None
    assert "self_attn" not in SCHEMA_PATH.read_text()


# --- the Python API validates with the schema ----------------------------------------------------
def test_mistyped_key_is_named_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"fisher\.batchsize.*valid keys of 'fisher'.*batch_size"):
        PipelineConfig.from_dict({"fisher": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"tasks\.t\.n_sample;.*valid keys of 'tasks\.t'.*n_samples"):
        PipelineConfig.from_dict({"tasks": {"t": {"source": "x", "n_sample": 3}}})
    with pytest.raises(ConfigError, match="unknown top-level config key.*fishr; valid: .*fisher"):
        PipelineConfig.from_dict({"fishr": {}})
    with pytest.raises(ConfigError, match=r"masks\.sparsity\b"):
        PipelineConfig.from_dict({"masks": {"sparsity": [0.5]}})


def test_bad_values_are_named_with_what_is_allowed():
    cases = [
        ({"fisher": {"labels": "true"}}, r"fisher\.labels = 'true': choose one of empirical, sampled"),
        ({"fisher": {"batch_size": 0}}, r"fisher\.batch_size = 0: must be >= 1"),
        ({"fisher": {"fold_kernel": "fast"}}, r"fisher\.fold_kernel = 'fast': choose one of auto, torch"),
        ({"fisher": {"batch_size": 2.5}}, r"fisher\.batch_size = 2\.5: must be an integer"),
        ({"fisher": {"per_sample_layers": [0, "last"]}},
         r"fisher\.per_sample_layers\[1\] = 'last': must be an integer"),
        ({"fisher": {"per_sample_layers": []}}, r"fisher\.per_sample_layers = \[\]: must hold at least 1"),
        ({"model": {"trust_remote_code": "maybe"}}, r"model\.trust_remote_code = 'maybe': must be true or false"),
        ({"masks": {"sparsities": [0.5, 1.5]}}, r"masks\.sparsities\[1\] = 1\.5: must be <= 1"),
        ({"masks": {"sparsities": 0.5}}, r"masks\.sparsities = 0\.5: must be a list of numbers.*--config masks="),
        ({"scaled": {"damping": -1}}, r"scaled\.damping = -1: must be >= 0"),
        ({"scaled": {"damping": "tiny"}}, r"scaled\.damping = 'tiny': must be a number.*1\.0e-05"),
        ({"scaled": {"damping": float("inf")}}, r"scaled\.damping = inf: must hold finite numbers"),
        ({"tasks": {"t": {"source": "x", "n_samples": 0}}}, r"tasks\.t\.n_samples = 0: must be >= 1"),
        ({"tasks": {"t": {}}}, r"tasks\.t\.source is missing"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            PipelineConfig.from_dict(raw)


def test_checks_the_schema_cannot_express_stay_in_the_dataclasses():
    with pytest.raises(ConfigError, match=r"fisher\.per_sample_params = '\(\(' is not a valid regex"):
        PipelineConfig.from_dict({"fisher": {"per_sample_params": "(("}})
    with pytest.raises(ConfigError, match=r"fisher\.fisher_m2_params = '\[' is not a valid regex"):
        FisherConfig(fisher_m2_params="[")
    with pytest.raises(ConfigError, match=r"masks\.include = '\(' is not a valid regex"):
        PipelineConfig.from_dict({"masks": {"include": "("}})
    with pytest.raises(ConfigError, match="same fraction twice"):  # distinct floats, one stored name
        MaskOptions(sparsities=(0.5, 0.5000000001))
    for selection in (*NAMED_SELECTIONS, "", r"\.mlp\.", "attention|mlp"):
        assert FisherConfig(per_sample_params=selection).per_sample_params == selection


def test_dataclasses_built_directly_are_checked_against_the_schema():
    with pytest.raises(ConfigError, match=r"masks\.scope = 'per_head': choose one of global, per_layer"):
        MaskOptions(scope="per_head")
    with pytest.raises(ConfigError, match=r"fisher\.device = 'gpu'"):
        FisherConfig(device="gpu")
    with pytest.raises(ConfigError, match=r"tasks\.t\.max_length = 1: must be >= 2"):
        TaskConfig(name="t", source="x", max_length=1)
    with pytest.raises(ConfigError, match="task name 'a b' is not allowed"):
        TaskConfig(name="a b", source="x")
    assert FisherConfig(per_sample_layers=[0, -1]).per_sample_layers == (0, -1)


def test_reserved_and_malformed_task_names_are_refused_by_the_python_api():
    reserved = {c.reserves for p in registered_phases().values() for c in p.commands if c.reserves}
    assert reserved == {"rank_agreement", "cross_task"}
    for name in reserved:
        with pytest.raises(ConfigError, match=f"'{name}' is reserved"):
            PipelineConfig.from_dict({"tasks": {name: {"source": "builtin:prose"}}})
        with pytest.raises(ConfigError, match=f"'{name}' is reserved"):
            task_config(name, {"source": "builtin:prose"})
        with pytest.raises(ConfigError, match=f"'{name}' is reserved"):
            validate_config({"tasks": {name: {"source": "builtin:prose"}}})
    with pytest.raises(ConfigError, match="'a/b' is not allowed: use only letters, digits"):
        task_config("a/b", {"source": "builtin:prose"})


def test_the_workflow_needs_a_task_the_python_api_does_not():
    with pytest.raises(ConfigError, match="the config has no 'tasks'"):
        validate_config({})
    with pytest.raises(ConfigError, match="the config has no tasks"):
        validate_config({"tasks": {}})
    assert PipelineConfig.from_dict({}).tasks == {}


# --- text where the schema wants numbers -----------------------------------------------------------
def test_numeric_strings_are_read_as_numbers():
    raw = yaml.safe_load("scaled: {damping: 1e-5, eta: '2'}\nmasks: {sparsities: ['0.3', 1]}\n"
                         "fisher: {batch_size: '8', per_sample_layers: '[0, -1]'}\nimportance: {log_color: 'false'}")
    assert raw["scaled"]["damping"] == "1e-5"  # the YAML gotcha
    parsed = PipelineConfig.from_dict(raw)
    assert parsed.scaled.damping == 1e-5 and parsed.scaled.eta == 2
    assert parsed.masks.sparsities == (0.3, 1.0)
    assert parsed.fisher.batch_size == 8 and parsed.fisher.per_sample_layers == (0, -1)
    assert parsed.importance.log_color is False
    assert PipelineConfig.from_dict({"masks": {"include": "null"}}).masks.include == "null"  # a regex, from a file


def test_command_line_text_is_read_as_yaml_would():
    """Snakemake hands nested --config values over as text (YAML BaseLoader)."""
    given = {"masks": {"sparsities": ["0.3"], "include": "null"}, "fisher": {"per_sample_layers": "~"}}
    config = {**TASK, "masks": {"sparsities": ["0.3"], "include": "null", "scope": "per_layer"},
              "fisher": {"per_sample_layers": "~"}}
    checked = validate_config(config, command_line=given)
    assert checked["masks"] == {"sparsities": [0.3], "include": None, "scope": "per_layer", "granularity": "element",
                                "criterion": "saliency", "baselines": ["fisher", "magnitude", "wanda", "random"],
                                "wanda_compare": "row", "seed": 0}
    assert checked["fisher"]["per_sample_layers"] is None


# --- YAML files ------------------------------------------------------------------------------------
def test_duplicate_keys_name_the_key_and_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("tasks:\n  prose:\n    source: builtin:prose\n  code:\n    source: builtin:code\n"
                    "  prose:\n    source: builtin:prose\n    n_samples: 3\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}, line 6: key 'prose' appears twice.*line 2"):
        load_yaml_strict(path)
    path.write_text("fisher: {batch_size: 1, batch_size: 2}\n")
    with pytest.raises(ConfigError, match="line 1: key 'batch_size' appears twice"):
        read_config_file(path)
    path.write_text("base: &base {n_samples: 3}\ntasks:\n  a: {<<: *base, source: x, n_samples: 4}\n")
    assert load_yaml_strict(path)["tasks"]["a"] == {"n_samples": 4, "source": "x"}  # merge keys may be overridden


def test_config_files_that_are_not_a_mapping_are_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- tasks\n- fisher\n")
    with pytest.raises(ConfigError, match=r"list\.yaml holds a list, not a mapping of sections"):
        read_config_file(path)
    with pytest.raises(ConfigError, match=r"nowhere\.yaml does not exist"):
        read_config_file(tmp_path / "nowhere.yaml")
    path.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match=r"list\.yaml, line \d+ is not valid YAML"):
        read_config_file(path)
    path.write_text("")
    assert read_config_file(path) == {}


# --- config/README.md documents exactly the schema's keys ------------------------------------------
def documented_keys() -> dict[str, dict[str, str]]:
    """Section -> {key: default cell} of every table in config/README.md, by `## \\`section\\`` heading."""
    sections: dict[str, dict[str, str]] = {}
    section = None
    for line in (ROOT / "config" / "README.md").read_text().splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            section = heading.group(1)
            sections[section] = {}
        elif line.startswith("## "):
            section = None
        row = re.match(r"^\| `(\w+)` \| (.*?) \|", line)
        if row and section is not None:
            assert row.group(1) not in sections[section], f"{section}.{row.group(1)} documented twice"
            sections[section][row.group(1)] = row.group(2)
    return sections


def schema_keys() -> dict[str, dict]:
    properties = config_schema()["properties"]
    return {section: (schema["additionalProperties"] if section == "tasks" else schema)["properties"]
            for section, schema in properties.items()}


def test_config_readme_documents_every_schema_key_and_no_other():
    documented, schema = documented_keys(), schema_keys()
    assert set(documented) == set(schema), "sections with a '## `name`' heading in config/README.md"
    for section, keys in schema.items():
        missing = sorted(set(keys) - set(documented[section]))
        stale = sorted(set(documented[section]) - set(keys))
        assert not missing, f"config/README.md does not document {[f'{section}.{k}' for k in missing]}"
        assert not stale, f"config/README.md documents keys the schema lacks: {[f'{section}.{k}' for k in stale]}"


def test_config_readme_tables_are_the_schema_rendered():
    """The one description of a key is the schema's; the page's tables are made from it."""
    readme = ROOT / "config" / "README.md"
    assert config_docs.update(readme, check=True), "stale: run python -m fisher_pipeline config-docs"
    assert main(["config-docs", "--path", str(readme), "--check"]) == 0
    # a description edited in the schema alone makes the page stale, and the check says how to fix it
    schema = copy.deepcopy(config_schema())
    schema["properties"]["masks"]["properties"]["seed"]["description"] = "Edited in the schema only."
    text = readme.read_text()
    rendered = config_docs.render(text, schema)
    assert rendered != text and "| `seed` | `0` | Edited in the schema only. |" in rendered
    assert config_docs.render(rendered, schema) == rendered  # idempotent
    with pytest.raises(ConfigError, match="has no table for section"):
        config_docs.render(text.replace("<!-- keys: scaled -->", "<!-- no keys -->"), schema)


def test_config_readme_defaults_equal_schema_defaults():
    documented, schema = documented_keys(), schema_keys()
    for section, keys in schema.items():
        for key, spec in keys.items():
            cell = documented[section][key]
            if "default" not in spec:
                assert cell == "(required)", f"{section}.{key}"
                continue
            shown = re.fullmatch(r"`([^`]*)`", cell)
            assert shown, f"{section}.{key}: default cell {cell!r} is not one `value`"
            assert yaml.safe_load(shown.group(1)) == spec["default"], f"{section}.{key}: {cell} in the docs"
