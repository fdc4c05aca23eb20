"""Every command the READMEs show works as written.

Each shell command in a `bash` block of README.md and config/README.md has a check below
(a README command without one fails `test_every_readme_command_has_a_check`). Cheap ones run
for real on a tiny config; long ones (`make run`, whole workflow runs, SLURM) run as a dry
run (`snakemake -n`, `make -n`) with the same flags. Python blocks must compile and their
imports must resolve; the YAML config blocks must pass the config schema.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from fisher_pipeline.config import PipelineConfig, validate_config

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "config" / "README.md")
LANGUAGES = {"bash", "python", "yaml", ""}  # "" = a plain block (e.g. the store layout): not code


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of `path`."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [text for path in READMES for lang, text in code_blocks(path) if lang == language]


def readme_commands() -> list[str]:
    """Every command line of the READMEs' bash blocks, without its trailing comment."""
    commands = []
    for text in blocks("bash"):
        for line in text.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, stdout_only: bool = False) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(argv)} (in {cwd}) failed:\n{output[-4000:]}"
    return result.stdout if stdout_only else output


def executable(argv: list[str]) -> list[str]:
    """`argv` with the repository's `.venv/bin/...` made absolute (falling back to this interpreter)."""
    program = ROOT / argv[0]
    if argv[0].startswith(".venv/bin/") and not program.exists():
        return [sys.executable, "-m", Path(argv[0]).name, *argv[1:]]
    return [str(program) if argv[0].startswith(".venv/") else argv[0], *argv[1:]]


def default_run_folder(tmp_path: Path) -> Path:
    """A working folder holding the default config, as the repository root does."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "config.yaml", work / "config" / "config.yaml")
    return work


def dry_run(command: str, work: Path, env: dict[str, str] | None = None, from_root: bool = False) -> str:
    """The README's snakemake `command`, as a dry run printing shell commands, working in `work`.

    `from_root`: run it from the repository root (where its relative paths point), with
    `--directory work`; else run it in `work`, with `--snakefile` naming the repository's.
    """
    argv = executable(shlex.split(command))
    if from_root:
        return run([*argv, "--directory", str(work), "-n", "-p"], cwd=ROOT, env=env)
    return run([*argv, "--snakefile", str(ROOT / "Snakefile"), "-n", "-p"], cwd=work, env=env)


def planned(output: str) -> dict[str, int]:
    lines = output.splitlines()
    start = lines.index("Job stats:") + 3
    jobs = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def make_dry_run(target: str) -> list[str]:
    """The commands `make <target>` would run (`make -n`)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# --- the checks, one per README command ------------------------------------------------------
def check_make_run(command: str, tmp_path: Path, **_) -> None:
    recipe = make_dry_run("run")
    snakemake = [line for line in recipe if line.startswith(".venv/bin/snakemake")]
    assert snakemake == [".venv/bin/snakemake --cores 2"], recipe
    jobs = planned(dry_run(snakemake[0], default_run_folder(tmp_path)))
    assert jobs["fisher"] == 3 and jobs["overlap"] == 1 and jobs["all"] == 1, jobs


def check_make_test(command: str, tmp_path: Path, **_) -> None:
    recipe = make_dry_run("test")
    assert ".venv/bin/python -m pytest -q" in recipe, recipe
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.MULTILINE), "CI runs the README's test command"
    assert ci.index("make lint") < ci.index("make test") and "set -euo pipefail" in ci


def check_own_config(command: str, tmp_path: Path, tiny_model_dir: Callable, **_) -> None:
    """`--configfile my_config.yaml` with the README's example config (the model and data made tiny)."""
    work = default_run_folder(tmp_path)  # the default config is there too: the user's file replaces it
    config = yaml.safe_load(next(b for b in blocks("yaml") if "legal" in b))
    config["model"]["path"] = str(tiny_model_dir("llama"))
    data = work / "data"
    data.mkdir()
    (data / "legal.jsonl").write_text("".join(json.dumps({"text": f"Clause {i}. The party shall pay."}) + "\n"
                                              for i in range(4)))
    (data / "tickets.csv").write_text("id,body\n" + "".join(f"{i},My order {i} did not arrive.\n" for i in range(4)))
    (data / "novel.txt").write_text("\n\n".join(f"Chapter {i}. It was a dark night." for i in range(4)))
    (work / "my_config.yaml").write_text(yaml.safe_dump(config))
    output = dry_run(command, work)
    assert planned(output)["fisher"] == 3, output
    for task in ("legal", "support", "novel"):
        assert f"results/fisher/{task}.zarr" in output
    assert "results/fisher/prose.zarr" not in output


def check_partial_rerun(command: str, tmp_path: Path, **_) -> None:
    output = dry_run(command, default_run_folder(tmp_path))
    assert '"sparsities": [0.3]' in output, output[-3000:]


def check_config_overrides(command: str, tmp_path: Path, **_) -> None:
    output = dry_run(command, default_run_folder(tmp_path))
    assert '"batch_size": 8' in output and '"damping": 0.0001' in output, output[-3000:]


def check_slurm_profile(command: str, tmp_path: Path, **_) -> None:
    """The SLURM profile plans the default run (dry run; the plugin is pinned in requirements.txt)."""
    output = dry_run(command, default_run_folder(tmp_path), from_root=True)
    assert planned(output)["fisher"] == 3
    # rule fisher's resources from the planner (the profile overrides none), and the profile's default resources
    from fisher_pipeline import planner
    from fisher_pipeline.config import PipelineConfig, read_config_file

    plan = planner.plan_run(PipelineConfig.from_dict(read_config_file(ROOT / "config" / "config.yaml")))
    fisher = plan.resources()["fisher"]
    assert f"mem_mb={fisher['mem_mb']}" in output and f"runtime={fisher['runtime']}" in output, output[-3000:]
    assert "slurm_partition=your_partition" in output, output[-3000:]


def check_slurm_forcerun(command: str, tmp_path: Path, **_) -> None:
    """Dry run with the profile; what --forcerun plans on a finished run is tests/test_slurm.py's."""
    output = dry_run(command, default_run_folder(tmp_path), from_root=True)
    assert planned(output)["qkov"] == 6 and "slurm_account=your_account" in output, output[-3000:]


def check_workstation_profile(command: str, tmp_path: Path, **_) -> None:
    output = dry_run(command, default_run_folder(tmp_path), from_root=True)
    assert planned(output)["fisher"] == 3 and "threads: 2" in output


def check_verify(command: str, tmp_path: Path, **_) -> None:
    """`verify` on the stores the command's glob finds: ok lines, then exit 2 naming a damaged one."""
    from store_factory import make_store

    work = tmp_path / "work"
    for task in ("code", "prose"):
        make_store(work / "results" / "fisher" / f"{task}.zarr", n_samples=3, task=task)
    argv = executable(shlex.split(command.replace(".venv/bin/python", sys.executable)))
    output = run(["bash", "-c", shlex.join(argv[:-1]) + " " + argv[-1]], cwd=work)
    assert re.fullmatch(r"(results/fisher/(code|prose)\.zarr: ok \(\d+ files, [\d.]+ GB checked in [\d.]+ s\)\n){2}",
                        output), output
    chunk = next(p for p in (work / "results/fisher/prose.zarr/grad_mean").rglob("*")
                 if p.is_file() and "/c/" in str(p))
    chunk.write_bytes(chunk.read_bytes()[:-1])
    result = subprocess.run(["bash", "-c", shlex.join(argv[:-1]) + " " + argv[-1]], cwd=work, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "results/fisher/prose.zarr: DAMAGED, 1 problem(s):" in result.stdout, result


def check_plan(command: str, tmp_path: Path, **_) -> None:
    """`plan` on the default config in a fresh folder (the bundled model's published shapes until it is built)."""
    output = run(executable(shlex.split(command)), cwd=default_run_folder(tmp_path), stdout_only=True)
    assert "| fisher | 3 |" in output and "134.5 M parameters" in output, output
    assert "phase 1 fits this machine" in output and "no precision table under results" in output, output


CHECKS: dict[str, Callable[..., None]] = {
    "make run": check_make_run,
    "make test": check_make_test,
    ".venv/bin/python -m fisher_pipeline verify results/fisher/*.zarr": check_verify,
    ".venv/bin/python -m fisher_pipeline plan": check_plan,
    ".venv/bin/snakemake --cores 8 --configfile my_config.yaml": check_own_config,
    ".venv/bin/snakemake --cores 2 --config masks='{sparsities: [0.3]}'": check_partial_rerun,
    ".venv/bin/snakemake --profile profiles/slurm": check_slurm_profile,
    ".venv/bin/snakemake --profile profiles/slurm --forcerun qkov": check_slurm_forcerun,
    ".venv/bin/snakemake --profile profiles/workstation": check_workstation_profile,
    ".venv/bin/snakemake --cores 2 --config fisher='{batch_size: 8}' scaled='{damping: 1.0e-4}'":
        check_config_overrides,
}
# no Snakemake run, no download
CHEAP = {"make test", ".venv/bin/python -m fisher_pipeline verify results/fisher/*.zarr",
         ".venv/bin/python -m fisher_pipeline plan"}


def test_every_readme_command_has_a_check():
    commands = readme_commands()
    assert len(commands) == len(set(commands)), "a command shown twice"
    assert set(commands) == set(CHECKS), (
        f"README commands without a check: {sorted(set(commands) - set(CHECKS))}; "
        f"checks of commands no README shows: {sorted(set(CHECKS) - set(commands))}"
    )


def test_readme_blocks_are_of_known_languages():
    for path in READMES:
        for language, _ in code_blocks(path):
            assert language in LANGUAGES, f"{path.name}: a ```{language} block: add a check for it here"


@pytest.mark.parametrize("command", [c for c in CHECKS if c in CHEAP])
def test_cheap_readme_command(command, tmp_path):
    CHECKS[command](command, tmp_path)


@pytest.mark.workflow
@pytest.mark.parametrize("command", [c for c in CHECKS if c not in CHEAP])
def test_workflow_readme_command(command, tmp_path, tiny_model_dir):
    CHECKS[command](command, tmp_path, tiny_model_dir=tiny_model_dir)


def test_python_blocks_compile_and_their_imports_resolve():
    snippets = blocks("python")
    assert snippets
    for snippet in snippets:
        tree = ast.parse(snippet)
        compile(tree, "<README>", "exec")
        imports = ast.Module(body=[node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))],
                             type_ignores=[])
        exec(compile(imports, "<README imports>", "exec"), {})


def test_yaml_blocks_are_valid_configs():
    snippets = blocks("yaml")
    assert snippets
    for snippet in snippets:
        raw = yaml.safe_load(snippet)
        validate_config(raw)
        PipelineConfig.from_dict(raw)
