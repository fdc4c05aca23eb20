"""`python -m fisher_pipeline`: user mistakes end in one line naming the input and the fix (exit 2);
the phase subcommands and config sections come from the phase registry."""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fisher_pipeline.phases as phases_package
from fisher_pipeline.__main__ import build_parser, main
from fisher_pipeline.config import CORE_SECTIONS, PipelineConfig, config_schema
from fisher_pipeline.errors import ConfigError
from fisher_pipeline.phase_registry import phase_commands, registered_phases, unregister_phase
from store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]
ADDING_A_PHASE = ROOT / "docs" / "adding_a_phase.md"


def documented_blocks() -> list[str]:
    """The python code blocks of docs/adding_a_phase.md: the phase's declaration, its numerics, its rule file."""
    return re.findall(r"^```python\n(.*?)^```", ADDING_A_PHASE.read_text(), flags=re.MULTILINE | re.DOTALL)


def documented_phase_plugin(folder: Path) -> Path:
    """The documented example phase as an installed package's entry point, in `folder` (for sys.path)."""
    package = folder / "gradnorm_example"
    package.mkdir(parents=True, exist_ok=True)
    declaration, numerics, _ = documented_blocks()
    (package / "__init__.py").write_text(declaration)
    (package / "compute.py").write_text(numerics)
    info = folder / "gradnorm_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gradnorm-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fisher_pipeline.phases]\ngradnorm = gradnorm_example\n")
    return folder


def argv_of(command: str, tmp_path: Path) -> list[str]:
    """The arguments `command` needs besides its config source (inputs that need not exist)."""
    if command == "fisher":
        return ["--task", "prose", "--out", str(tmp_path / "out.zarr")]
    for _, spec in phase_commands():
        if spec.name == command:
            inputs = [str(tmp_path / "in")] if spec.per_task else [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
            extra = [value for more in spec.extra_inputs if more.required
                     for value in (more.flag, f"a={tmp_path / 'ha'}" if more.keyed else str(tmp_path / "x"))]
            return [spec.input_flag, *inputs, *extra, "--out", str(tmp_path / "out")]
    raise KeyError(command)


def config_commands() -> list[str]:
    return ["fisher", *(spec.name for _, spec in phase_commands())]


def run_main(argv: list[str], caplog) -> str:
    """Run `main(argv)`, expect exit status 2, return the one error line logged."""
    caplog.clear()
    assert main(argv) == 2, argv
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


# --- user mistakes: one line, exit status 2 ----------------------------------------------------
@pytest.mark.parametrize("command", config_commands())
def test_malformed_config_json_is_named(command, tmp_path, caplog):
    rest = argv_of(command, tmp_path)
    message = run_main([command, "--config-json", '{"masks": ', *rest], caplog)
    assert message.startswith("--config-json is not valid JSON (Expecting value at line 1 column 11)")
    assert "pass a JSON object" in message
    message = run_main([command, "--config-json", "[1, 2]", *rest], caplog)
    assert message.startswith("--config-json holds a JSON list, not an object of config sections")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("command", config_commands())
def test_missing_or_malformed_config_file_is_named(command, tmp_path, caplog):
    rest = argv_of(command, tmp_path)
    missing = tmp_path / "nowhere.yaml"
    message = run_main([command, "--config", str(missing), *rest], caplog)
    assert message == (f"config file {missing} does not exist: pass the path of a YAML config such as "
                       f"config/config.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- tasks\n")
    assert f"config file {listed} holds a list, not a mapping of sections" in run_main(
        [command, "--config", str(listed), *rest], caplog)
    twice = tmp_path / "twice.yaml"
    twice.write_text("tasks:\n  prose: {source: 'builtin:prose'}\n  prose: {source: 'builtin:code'}\n")
    assert f"{twice}, line 3: key 'prose' appears twice in one mapping (first on line 2)" in run_main(
        [command, "--config", str(twice), *rest], caplog)


def test_bad_config_values_and_inputs_are_named(tmp_path, caplog):
    rest = argv_of("fisher", tmp_path)
    assert run_main(["fisher", "--config-json", '{"fisher": {"batch_size": 0}}', *rest],
                    caplog) == "fisher.batch_size = 0: must be >= 1"
    assert "task 'prose' is not in the config" in run_main(["fisher", "--config-json", "{}", *rest], caplog)
    assert "only the keys 'masks' and 'model'" in run_main(
        ["masks", "--config-json", '{"scaled": {}}', *argv_of("masks", tmp_path)], caplog)
    assert "--masks takes TASK=PATH pairs, got" in run_main(
        ["overlap", "--config-json", "{}", "--masks", str(tmp_path), "--out", str(tmp_path / "o")], caplog)


def test_unusable_paths_and_arguments_are_named(tmp_path, caplog, capsys):
    store = make_store(tmp_path / "a.zarr", n_samples=3, task="a")
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "masks"
    no_weights = '{"masks": {"criterion": "fisher", "baselines": []}}'  # F alone: no model needed
    message = run_main(["masks", "--config-json", no_weights, "--store", str(store), "--out", str(out)], caplog)
    assert message.startswith(f"cannot create or open {tmp_path / 'a_file'}")
    # saliency reads the weights: the model must be the store's
    message = run_main(["masks", "--config-json", "{}", "--store", str(store), "--out", str(tmp_path / "m")], caplog)
    assert re.fullmatch(r"model resources/models/SmolLM2-135M-Instruct \(weights \w+\) is not the model store "
                        r".*a\.zarr was made from \(weights tiny-weights\): point model\.path at that model, or "
                        r"rerun phase 1 with this one", message), message
    assert "no Fisher store at" in run_main(["masks", "--config-json", "{}", "--store", str(tmp_path / "none.zarr"),
                                             "--out", str(tmp_path / "m")], caplog)
    with pytest.raises(SystemExit) as exit_status:  # argparse: usage and one error line, status 2
        main(["fisher", "--config-json", "{}", "--task", "a", "--out", str(tmp_path / "o"), "--threads", "-1"])
    assert exit_status.value.code == 2
    assert "argument --threads: '-1' is not a whole number >= 0" in capsys.readouterr().err


def test_run_settings_reach_phase1_beside_the_config(caplog):
    """The workflow passes `fisher.fold_kernel` / `state_device` apart from the config it reruns for."""
    from fisher_pipeline.__main__ import _load_config

    args = build_parser().parse_args(["fisher", "--config-json", '{"fisher": {"batch_size": 4}}', "--task", "t",
                                      "--out", "x", "--run-settings-json", '{"fold_kernel": "torch"}'])
    config = _load_config(args)
    assert config.fisher.fold_kernel == "torch" and config.fisher.batch_size == 4
    message = run_main(["fisher", "--config-json", "{}", "--task", "t", "--out", "x", "--run-settings-json",
                        '{"batch_size": 2}'], caplog)
    assert message.startswith("--run-settings-json takes only the fisher keys state_device, fold_kernel")


def test_the_shell_sees_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["fisher", "--config-json", "{not json", *argv_of("fisher", tmp_path)],
                 ["masks", "--config", str(tmp_path / "missing.yaml"), *argv_of("masks", tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "fisher_pipeline", *argv], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and " ERROR fisher_pipeline: " in lines[0], result.stderr


#: Modules a config check must not import: the numerics of phase 1 and of the phases.
HEAVY_MODULES = ("torch", "scipy", "matplotlib", "pandas", "zarr", "transformers")


def test_a_bad_config_fails_before_torch_is_imported(tmp_path):
    """Every subcommand reads and checks its config before it imports any numerics, so a config
    mistake is reported at once (docs/benchmarks.md times it); the phases' declarations stay light."""
    sections = {command.name: phase.section for phase, command in phase_commands()}
    argvs = {command: [command, "--config-json", json.dumps({sections.get(command, "fisher"): {"no_such_key": 1}}),
                       *argv_of(command, tmp_path)] for command in config_commands()}
    script = textwrap.dedent(f"""
        import json, logging, sys
        from fisher_pipeline.__main__ import main
        logging.disable(logging.CRITICAL)
        results = {{command: [main(argv), [m for m in {HEAVY_MODULES!r} if m in sys.modules]]
                   for command, argv in json.loads(sys.argv[1]).items()}}
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == set(config_commands())
    for command, (rc, heavy) in results.items():
        assert rc == 2 and heavy == [], (command, rc, heavy)


def test_schema_command_prints_the_assembled_schema(capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == config_schema()
    # every phase package of fisher_pipeline.phases declares the section named like it
    packages = {m.name for m in pkgutil.iter_modules(phases_package.__path__) if m.ispkg}
    assert len(packages) >= 9 and set(printed["properties"]) == {*CORE_SECTIONS, *packages}


# --- the registry ---------------------------------------------------------------------------
TOY_PHASE = '''
    """A toy phase: exists only in this test's temporary folder."""
    from pathlib import Path

    from fisher_pipeline.config import config_section
    from fisher_pipeline.phase_registry import PhaseCommand, register_phase


    @config_section("toy", """
    properties:
      factor:
        type: number
        minimum: 0
        default: 1.5
    """)
    class ToyOptions:
        """Settings of the toy phase."""

        factor: float = 1.5  # how much of the toy


    def run_toy(store, out, options, task=None):
        Path(out).mkdir(parents=True)
        (Path(out) / "toy.txt").write_text(f"{task} {store} {options.factor}")
        return {"toy": Path(out) / "toy.txt"}


    def run_toy_cross(stores, out, options):
        Path(out).mkdir(parents=True)
        (Path(out) / "all.txt").write_text(" ".join(f"{t}={p}" for t, p in stores.items()))
        return {"all": Path(out) / "all.txt"}


    register_phase(ToyOptions,
                   PhaseCommand("toy", run_toy, "toy phase of one task", out_example="results/toy/{task}"),
                   PhaseCommand("toy-cross", run_toy_cross, "toy phase across tasks", per_task=False,
                                out_example="results/toy/all_tasks", reserves="all_tasks"))
'''


@pytest.fixture
def toy_phase(tmp_path, monkeypatch):
    """A phase package dropped into the phases package's search path, and nothing else."""
    folder = tmp_path / "plugin"
    (folder / "toy_phase").mkdir(parents=True)
    (folder / "toy_phase" / "__init__.py").write_text(textwrap.dedent(TOY_PHASE))
    monkeypatch.setattr(phases_package, "__path__", [*phases_package.__path__, str(folder)])
    yield
    unregister_phase("toy")
    sys.modules.pop("fisher_pipeline.phases.toy_phase", None)


def test_a_new_phase_module_registers_its_cli_and_config_section(toy_phase, tmp_path, capsys, caplog):
    assert "toy" in registered_phases()
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"toy", "toy-cross"} <= set(subcommands)

    # config parsing: defaults from the phase's schema, strict keys, bounds, reserved task names
    assert PipelineConfig.from_dict({}).toy.factor == 1.5
    assert PipelineConfig.from_dict({"toy": {"factor": "2"}}).toy.factor == 2
    assert config_schema()["properties"]["toy"]["properties"]["factor"]["default"] == 1.5
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) toy\.facter; valid keys of 'toy': factor"):
        PipelineConfig.from_dict({"toy": {"facter": 2}})
    with pytest.raises(ConfigError, match=r"toy\.factor = -1: must be >= 0"):
        PipelineConfig.from_dict({"toy": {"factor": -1}})
    with pytest.raises(ConfigError, match="'all_tasks' is reserved"):
        PipelineConfig.from_dict({"tasks": {"all_tasks": {"source": "builtin:prose"}}})

    # the CLI: per task and across tasks, from JSON or from a YAML file
    out = tmp_path / "results" / "toy" / "a"
    assert main(["toy", "--config-json", '{"toy": {"factor": 3}}', "--store", "a.zarr", "--task", "a",
                 "--out", str(out)]) == 0
    assert (out / "toy.txt").read_text() == "a a.zarr 3"
    config = tmp_path / "config.yaml"
    config.write_text("tasks: {a: {source: x}}\ntoy: {factor: 0.5}\n")
    cross = tmp_path / "results" / "toy" / "all_tasks"
    assert main(["toy-cross", "--config", str(config), "--stores", "a=a.zarr", "b=b.zarr", "--out", str(cross)]) == 0
    assert (cross / "all.txt").read_text() == "a=a.zarr b=b.zarr"
    assert f"toy\t{out / 'toy.txt'}" in capsys.readouterr().out
    assert "toy.factor = 'big': must be a number" in run_main(
        ["toy", "--config-json", '{"toy": {"factor": "big"}}', "--store", "s", "--out", str(tmp_path / "x")], caplog)


def test_registry_refuses_what_would_clash(toy_phase):
    from fisher_pipeline.config import FisherConfig
    from fisher_pipeline.phase_registry import PhaseCommand, register_phase
    from fisher_pipeline.phases.masks import MaskOptions

    registered_phases()
    with pytest.raises(TypeError, match="not declared with @config_section"):
        register_phase(dict)
    with pytest.raises(ValueError, match="belongs to phase 1"):
        register_phase(FisherConfig)
    with pytest.raises(ValueError, match=r"subcommand\(s\) \['toy'\] already registered by section 'toy'"):
        register_phase(MaskOptions, PhaseCommand("toy", print, "clash"))
    with pytest.raises(ValueError, match="only a cross-task command reserves"):
        PhaseCommand("x", print, "x", reserves="x")
    with pytest.raises(ValueError, match="must be a function or 'package.module:function'"):
        PhaseCommand("x", "fisher_pipeline.phases.masks.compute.run_masks", "x")


def test_the_documented_example_phase_works_from_another_package(tmp_path, monkeypatch, capsys):
    """docs/adding_a_phase.md's module, installed as an entry point: CLI and config section appear."""
    plugin = documented_phase_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(plugin))
    try:
        assert PipelineConfig.from_dict({}).gradnorm.order == 2
        store = make_store(tmp_path / "a.zarr", n_samples=3, task="a")
        out = tmp_path / "results" / "gradnorm" / "a"
        assert main(["gradnorm", "--config-json", '{"gradnorm": {"order": 1}}', "--store", str(store),
                     "--out", str(out)]) == 0
        assert f"norms_csv\t{out / 'norms.csv'}" in capsys.readouterr().out
        import numpy as np
        import pandas as pd

        from fisher_pipeline.store import open_store

        table = pd.read_csv(out / "norms.csv")
        opened = open_store(store)
        assert table["param"].tolist() == opened.param_names and set(table["task"]) == {"a"}
        first = opened.param_names[0]
        assert table["norm"][0] == pytest.approx(np.abs(opened.grad_mean(first)).sum(), rel=1e-6)
        with pytest.raises(ConfigError, match=r"gradnorm\.order = 0\.5: must be >= 1"):
            PipelineConfig.from_dict({"gradnorm": {"order": 0.5}})
    finally:
        unregister_phase("gradnorm")
        sys.modules.pop("gradnorm_example", None)
