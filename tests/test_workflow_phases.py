"""The analysis phases as workflow rules and CLI commands.

One tiny end-to-end run (phase 1 on a tiny random Llama, then phases 2 to 7)
shows that every output is written, that editing one phase's section reruns only that
phase and its dependants (never phase 1), and that `snakemake --report` builds the
HTML report. The CLI and the config sections are also checked in-process, without
Snakemake.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from fisher_pipeline.__main__ import main
from fisher_pipeline.config import validate_config
from fisher_pipeline.phases import (
    ConflictsOptions,
    ImportanceOptions,
    InterventionOptions,
    MaskEvalOptions,
    MaskOptions,
    OverlapOptions,
    ReplicationOptions,
    ScaledOptions,
)
from fisher_pipeline.phases.qkov import QkovOptions
from store_factory import make_store
from test_cli import documented_blocks, documented_phase_plugin

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("code", "prose")
SECTIONS = {"importance": ImportanceOptions, "masks": MaskOptions, "mask_eval": MaskEvalOptions,
            "overlap": OverlapOptions,
            "conflicts": ConflictsOptions, "qkov": QkovOptions, "scaled": ScaledOptions,
            "replication": ReplicationOptions, "intervention": InterventionOptions}
TINY_CONFIG = {
    "tasks": {task: {"source": f"builtin:{task}", "n_samples": 3, "n_heldout": 2, "max_length": 16} for task in TASKS},
    "fisher": {"batch_size": 2, "per_sample_params": "attention", "fisher_m2_params": ""},
    "masks": {"sparsities": [0.5, 0.9]},
}
#: Files each output directory must hold (beyond these, whatever the phase writes).
EXPECTED = {
    **{f"results/importance/{t}": [f"{name}.{ext}" for name in ("tensors", "groups", "heads", "neurons", "layers")
                                   for ext in ("parquet", "csv")] + ["heads_heatmap.png"] for t in TASKS},
    "results/importance/rank_agreement": ["rank_agreement.parquet", "rank_agreement.csv", "rank_agreement.png"],
    **{f"results/masks/{t}": ["mask_summary.parquet", "mask_summary.csv", "masks.safetensors"] for t in TASKS},
    "results/mask_eval": ["mask_eval.parquet", "mask_eval.csv", "heldout_samples.csv", "mask_eval_curves.png",
                          "mask_eval_cross.png", "caption.md"],
    "results/overlap": ["overlap.parquet", "overlap.csv", "overlap_heatmaps.png"],
    **{f"results/scaled/{t}": ["natgrad_norms.parquet", "natgrad_norms.csv"] for t in TASKS},
    "results/conflicts/code__prose": ["conflicts.parquet", "conflicts.csv", "heatmap_code__prose.png"],
    **{f"results/qkov/{a}__{b}": ["cells.parquet", "cells.csv", "health.parquet", "top_conflicts.csv",
                                  f"figure_{a}__{b}.png"] for a, b in (TASKS, TASKS[::-1])},
    "results/scaled/cross_task": ["natgrad_cosine.parquet", "natgrad_cosine.csv", "natgrad_cosine.png",
                                  "ewc_cost.parquet", "ewc_cost.csv", "ewc_cost.png"],
    **{f"results/fisher_heldout/{t}.zarr": ["zarr.json", "grad_mean", "per_sample"] for t in TASKS},
    "results/replication": ["cells.parquet", "cells.csv", "summary.parquet", "summary.csv", "replication.png",
                            "caption.md"],
    "results/intervention": ["cells.parquet", "cells.csv", "natgrad.parquet", "natgrad.csv", "summary.csv",
                             "cells.png", "damping.png", "caption.md"],
}


def snakemake(workdir: Path, configfile: Path, *args: str, expect_failure: bool = False,
              snakefile: Path = ROOT / "Snakefile", env: dict[str, str] | None = None) -> str:
    """Run Snakemake on the repository's Snakefile in `workdir`; return stdout + stderr."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory",
               str(workdir), "--configfile", str(configfile), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    if expect_failure:
        assert result.returncode != 0, f"{' '.join(command)} succeeded:\n{output[-4000:]}"
    else:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table of a dry run (empty: nothing to do)."""
    lines = dry_run_output.splitlines()
    if "Job stats:" not in lines:
        assert "Nothing to be done" in dry_run_output, dry_run_output
        return {}
    jobs = {}
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def write_config(path: Path, model_path: Path, **changes: dict) -> Path:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["model"] = {"path": str(model_path)}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


# --- end to end --------------------------------------------------------------------------
@pytest.mark.workflow
def test_every_output_is_written_and_non_empty(tiny_run):
    workdir = tiny_run["workdir"]
    for directory, names in EXPECTED.items():
        for name in names:
            path = workdir / directory / name
            assert path.exists(), f"{directory}/{name} missing"
            if path.is_file():
                assert path.stat().st_size > 0, f"{directory}/{name} is empty"
            if path.suffix == ".parquet":
                assert len(pd.read_parquet(path)) > 0, f"{directory}/{name} has no rows"
    benchmarks = {p.relative_to(workdir / "logs" / "benchmarks").as_posix()
                  for p in (workdir / "logs" / "benchmarks").rglob("*.tsv")}
    assert {f"{phase}/{t}.tsv" for phase in ("importance", "masks", "scaled") for t in TASKS} <= benchmarks
    assert {"importance/rank_agreement.tsv", "overlap.tsv", "scaled/cross_task.tsv"} <= benchmarks
    overlap = pd.read_parquet(workdir / "results/overlap/overlap.parquet")
    assert set(overlap["sparsity"]) == {0.5, 0.9}
    assert set(overlap[["task_a", "task_b"]].itertuples(index=False, name=None)) == {TASKS}
    heads = pd.read_parquet(workdir / "results/importance/code/heads.parquet")
    assert set(heads["block"]) == {"q", "k", "v", "o"}
    conflicts = pd.read_parquet(workdir / "results/conflicts/code__prose/conflicts.parquet")
    assert set(conflicts["block"].dropna()) == {"q", "k", "v", "o"} and (conflicts["status"] == "ok").all()
    assert (workdir / "results/conflicts/code__prose/top_pairs.csv").exists()
    assert "conflicts/code__prose.tsv" in benchmarks
    assert {"qkov/code__prose.tsv", "qkov/prose__code.tsv"} <= benchmarks
    cells = pd.read_parquet(workdir / "results/qkov/prose__code/cells.parquet")
    assert set(cells["block"]) == {"q", "k", "v", "o"} and set(cells[["task_a", "task_b"]].iloc[0]) == set(TASKS)


@pytest.mark.workflow
def test_completed_run_has_nothing_left_to_do(tiny_run):
    output = snakemake(tiny_run["workdir"], tiny_run["configfile"], "-n", "--quiet", "rules")
    assert planned_jobs(output) == {}


@pytest.mark.workflow
@pytest.mark.parametrize(("section", "change", "expected"), [
    ("masks", {"sparsities": [0.3]}, {"masks": 2, "overlap": 1, "mask_eval": 1}),
    ("masks", {"granularity": "head"}, {"masks": 2, "overlap": 1, "mask_eval": 1}),
    ("mask_eval", {"batch_size": 4}, {"mask_eval": 1}),
    ("tasks", {"code": {"source": "builtin:code", "n_samples": 3, "n_heldout": 3, "max_length": 16}},
     {"fisher_heldout": 1, "mask_eval": 1, "replication": 1, "intervention": 1}),  # held-out samples only:
    # the analysed store and the phases that read it are left alone
    ("importance", {"rank_by": "sum"}, {"importance": 2, "rank_agreement": 1}),
    ("overlap", {"heatmap_metric": "dice"}, {"overlap": 1}),
    ("conflicts", {"similarity": "fisher"}, {"conflicts": 1, "replication": 1, "intervention": 1}),
    ("qkov", {"variant": "signed"}, {"qkov": 2, "replication": 1, "intervention": 1}),
    ("scaled", {"damping": 1e-3}, {"scaled": 2, "scaled_cross": 1, "intervention": 1}),
    ("replication", {"alpha": 0.1}, {"replication": 1, "intervention": 1}),
    ("intervention", {"top_cells": 1}, {"intervention": 1}),
    # fisher keys that never change a store (config.STORE_INVARIANT_KEYS) rerun nothing
    ("fisher", {"fold_kernel": "torch", "state_device": "cpu"}, {}),
])
def test_editing_a_phase_section_reruns_only_that_phase_and_its_dependants(tiny_run, tmp_path, section, change,
                                                                           expected):
    configfile = write_config(tmp_path / "edited.yaml", tiny_run["model"], **{section: change})
    output = snakemake(tiny_run["workdir"], configfile, "-n", "--quiet", "rules")
    assert planned_jobs(output) == ({**expected, "all": 1} if expected else {}), output


@pytest.mark.workflow
@pytest.mark.parametrize(("given", "expected"), [
    (["masks={sparsities: [0.3]}"], {"masks": 2, "overlap": 1, "mask_eval": 1}),  # the README's partial rerun
    (["masks={sparsities: [0.5, 0.9], include: blocks}"], {}),  # the same values as the config file: nothing to do
    (["scaled={damping: 1e-3}", "importance={log_color: false}"],
     {"scaled": 2, "scaled_cross": 1, "intervention": 1, "importance": 2, "rank_agreement": 1}),
])
def test_config_on_the_command_line_reruns_the_edited_phases(tiny_run, given, expected):
    """Snakemake hands nested --config values over as text; the workflow reads them as the schema's types."""
    output = snakemake(tiny_run["workdir"], tiny_run["configfile"], "-n", "--quiet", "rules", "--config", *given)
    assert planned_jobs(output) == ({**expected, "all": 1} if expected else {}), output


@pytest.mark.workflow
def test_phase1_jobs_get_the_settings_that_rerun_nothing(tiny_run, tmp_path):
    """`fold_kernel` and `state_device` rerun nothing (above), yet a phase 1 job still runs with them."""
    configfile = write_config(tmp_path / "run.yaml", tiny_run["model"],
                              fisher={"fold_kernel": "torch", "state_device": "cpu"})
    snakemake(tmp_path, configfile, "--cores", "1", "results/fisher/code.zarr")
    log = (tmp_path / "logs" / "fisher" / "code.log").read_text()
    assert "(fold_kernel torch, state_device cpu)" in log, log[-2000:]


@pytest.mark.workflow
def test_command_line_config_that_cannot_be_read_explains_how_to_write_it(tmp_path):
    configfile = tmp_path / "c.yaml"
    configfile.write_text(yaml.safe_dump({"tasks": {"prose": {"source": "builtin:prose"}}}))
    output = snakemake(tmp_path, configfile, "-n", "--config", "masks={sparsities: 0.3}", expect_failure=True)
    assert "masks.sparsities = '0.3': must be a list of numbers" in output
    assert "--config masks='{sparsities: [0.25, 0.5]}'" in output  # the schema default, as the example


@pytest.mark.workflow
def test_checks_beyond_the_schema_stop_the_workflow_before_any_job(tmp_path):
    configfile = tmp_path / "c.yaml"
    configfile.write_text("tasks: {prose: {source: 'builtin:prose'}}\nfisher: {per_sample_params: '(('}\n")
    output = snakemake(tmp_path, configfile, "-n", expect_failure=True)
    assert "invalid workflow config: fisher.per_sample_params = '((' is not a valid regex" in output


@pytest.mark.workflow
def test_conflict_pairs_come_from_the_config(tiny_run, tmp_path):
    model = tiny_run["model"]
    bad = write_config(tmp_path / "bad.yaml", model, conflicts={"pairs": [["code", "nope"]]})
    output = snakemake(tmp_path, bad, "-n", expect_failure=True)
    assert "conflicts.pairs lists ['code', 'nope'], but ['nope'] is not a task of this config" in output
    bad = write_config(tmp_path / "bad_qkov.yaml", model, qkov={"pairs": [["code", "code"]]})
    output = snakemake(tmp_path, bad, "-n", expect_failure=True)
    assert "qkov.pairs: [code, code] pairs a task with itself" in output
    listed = write_config(tmp_path / "listed.yaml", model, conflicts={"pairs": [["prose", "code"]]},
                          qkov={"pairs": [["prose", "code"]]})
    output = snakemake(tmp_path, listed, "-n", "--quiet", "rules")
    assert planned_jobs(output)["conflicts"] == 1 and planned_jobs(output)["qkov"] == 1
    none = write_config(tmp_path / "none.yaml", model, fisher={"per_sample_params": "none"})
    output = snakemake(tmp_path, none, "-n", "--quiet", "rules")
    jobs = planned_jobs(output)
    assert "conflicts" not in jobs and "qkov" not in jobs and "fisher" in jobs


@pytest.mark.workflow
def test_duplicate_keys_in_a_config_file_stop_the_workflow(tmp_path):
    configfile = tmp_path / "dup.yaml"
    configfile.write_text("tasks:\n  prose:\n    source: builtin:prose\n  prose:\n    source: builtin:code\n")
    output = snakemake(tmp_path, configfile, "-n", expect_failure=True)
    assert f"{configfile}, line 4: key 'prose' appears twice in one mapping (first on line 2)" in output


@pytest.mark.workflow
def test_report_holds_the_figures_and_tables(tiny_run):
    report = tiny_run["workdir"] / "report.html"
    output = snakemake(tiny_run["workdir"], tiny_run["configfile"], "--report", str(report))
    assert report.stat().st_size > 10_000
    for name in ("heads_heatmap.png", "tensors.csv", "rank_agreement.png", "mask_summary.csv",
                 "overlap_heatmaps.png", "overlap.csv", "heatmap_code__prose.png", "conflicts.csv",
                 "figure_code__prose.png", "cells.csv",
                 "natgrad_cosine.png", "ewc_cost.png", "ewc_cost.csv"):
        assert f"Adding {name}" in output, name
    assert "Adding groups.csv" not in output  # large tables stay out of the HTML


# --- config sections and CLI, in-process ---------------------------------------------------
def test_schema_defaults_of_analysis_sections_equal_dataclass_defaults():
    config = validate_config({"tasks": {"t": {"source": "builtin:prose"}}})
    for section, cls in SECTIONS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert cls(**config[section]) == cls(), section
        assert set(config[section]) == set(defaults), section


def test_default_config_analysis_sections_parse():
    from fisher_pipeline.config import PipelineConfig

    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate_config(raw)
    parsed = PipelineConfig.from_dict(raw)
    for section, cls in SECTIONS.items():
        assert isinstance(getattr(parsed, section), cls)
    assert parsed.masks.sparsities == (0.25, 0.5) and parsed.masks.criterion == "saliency"


@pytest.mark.workflow
def test_a_new_phase_joins_the_workflow_without_other_edits(tiny_run, tmp_path):
    """docs/adding_a_phase.md's package (as another package's entry point) and rule file, dropped
    into a copy of the workflow, in a copy of a completed run: the default target now holds the
    new phase's jobs and nothing else, and they run and write what the phase computes."""
    workflow = tmp_path / "workflow_copy"
    shutil.copytree(ROOT / "workflow", workflow / "workflow")
    shutil.copy(ROOT / "Snakefile", workflow / "Snakefile")
    (workflow / "workflow" / "rules" / "gradnorm.smk").write_text(documented_blocks()[2])
    plugin = documented_phase_plugin(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "work"
    shutil.copytree(tiny_run["workdir"], work, symlinks=True)
    configfile = write_config(tmp_path / "c.yaml", tiny_run["model"], gradnorm={"order": 1})
    output = snakemake(work, configfile, "-n", "-p", snakefile=workflow / "Snakefile", env=env)
    assert planned_jobs(output) == {"gradnorm": len(TASKS), "all": 1}, output
    assert "fisher_pipeline gradnorm --config-json '{\"gradnorm\": {\"order\": 1}}'" in output
    snakemake(work, configfile, "--cores", "1", snakefile=workflow / "Snakefile", env=env)
    for task in TASKS:
        table = pd.read_csv(work / "results" / "gradnorm" / task / "norms.csv")
        store = zarr.open_group(work / "results" / "fisher" / f"{task}.zarr", mode="r")
        names = sorted(store["grad_mean"].array_keys())  # stored grad_mean arrays, read by hand
        norms = {name: float(np.abs(np.asarray(store["grad_mean"][name])).sum()) for name in names}
        assert sorted(table["param"]) == names and set(table["task"]) == {task}
        assert table.set_index("param")["norm"].to_dict() == pytest.approx(norms, rel=1e-6)


@pytest.mark.workflow
def test_reserved_task_names_are_refused_by_the_workflow(tmp_path):
    configfile = tmp_path / "reserved.yaml"
    configfile.write_text(yaml.safe_dump({"tasks": {"cross_task": {"source": "builtin:prose"}}}))
    output = snakemake(tmp_path, configfile, "-n", expect_failure=True)
    assert "tasks: the name 'cross_task' is reserved" in output


def test_cli_runs_phases_from_config_json(tmp_path, capsys):
    stores = {task: make_store(tmp_path / f"{task}.zarr", n_samples=4, seed=seed, task=task)
              for seed, task in enumerate(TASKS)}
    pairs = [f"{task}={path}" for task, path in stores.items()]
    runs = [
        ["importance", "--config-json", '{"importance": {"rank_by": "sum"}}', "--store", str(stores["code"]),
         "--task", "code", "--out", str(tmp_path / "importance")],
        ["rank-agreement", "--config-json", "{}", "--stores", *pairs, "--out", str(tmp_path / "agreement")],
        ["scaled", "--config-json", '{"scaled": {"damping": 0.001}}', "--store", str(stores["code"]),
         "--out", str(tmp_path / "scaled")],
        ["scaled-cross", "--config-json", "{}", "--stores", *pairs, "--out", str(tmp_path / "cross")],
        *(["masks", "--config-json", '{"masks": {"sparsities": [0.25], "criterion": "fisher", "baselines": []}}',
           "--store", str(path), "--task", task, "--out", str(tmp_path / "masks" / task)]
          for task, path in stores.items()),
        ["overlap", "--config-json", '{"overlap": {"heatmap_metric": "dice"}}', "--masks",
         *(f"{task}={tmp_path / 'masks' / task / 'masks.safetensors'}" for task in TASKS),
         "--out", str(tmp_path / "overlap")],
    ]
    for argv in runs:
        assert main(argv) == 0, argv
    printed = capsys.readouterr().out
    assert f"heads_heatmap\t{tmp_path / 'importance' / 'heads_heatmap.png'}" in printed
    tensors = pd.read_parquet(tmp_path / "importance" / "tensors.parquet")
    assert tensors["rank"].tolist() == tensors["fisher_sum"].rank(ascending=False, method="min").astype(int).tolist()
    assert set(pd.read_parquet(tmp_path / "overlap" / "overlap.parquet")["sparsity"]) == {0.25}


def test_cli_refuses_bad_config_and_inputs(tmp_path, caplog):
    store = make_store(tmp_path / "a.zarr", n_samples=3, task="a")
    out = str(tmp_path / "out")
    bad = [
        (["masks", "--config-json", '{"scaled": {}}', "--store", str(store), "--out", out],
         "only the keys 'masks' and 'model'"),
        (["masks", "--config-json", '{"masks": {"sparsity": [0.5]}}', "--store", str(store), "--out", out],
         r"masks\.sparsity"),
        (["scaled", "--config-json", '{"scaled": {"damping": "tiny"}}', "--store", str(store), "--out", out],
         r"scaled\.damping = 'tiny': must be a number"),
        (["scaled-cross", "--config-json", "{}", "--stores", str(store), "--out", out], "TASK=PATH"),
    ]
    for argv, message in bad:
        caplog.clear()
        assert main(argv) == 2, argv
        assert re.search(message, caplog.text), (argv, caplog.text)
    assert not Path(out).exists()


def test_cli_reads_a_section_from_a_yaml_config(tmp_path):
    store = make_store(tmp_path / "a.zarr", n_samples=3, task="a")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"tasks": {"a": {"source": "builtin:prose"}},
                                      "masks": {"sparsities": [0.75], "granularity": "head", "baselines": ["fisher"]}}))
    assert main(["masks", "--config", str(config), "--store", str(store), "--out", str(tmp_path / "m")]) == 0
    summary = pd.read_parquet(tmp_path / "m" / "mask_summary.parquet")
    assert set(summary["sparsity"]) == {0.75}
