"""The workflow on a real SLURM cluster, through `profiles/slurm`.

`tests/slurm/cluster.sh` starts a one-node cluster on this machine (slurmctld, slurmd,
slurmdbd with MariaDB, munge; it installs the Debian packages when they are missing) with its
state under a temporary folder, and stops it after the tests. The whole workflow of a tiny
config then runs with `snakemake --profile profiles/slurm`, overriding only what a user fills
in (partition, account) and what a one-node test cluster needs (threads capped at the node's
CPUs, short status-check intervals). Every Snakemake job must show up in `sacct` as COMPLETED,
and the outputs must equal those of a local `--cores 2` run of the same config. Partial reruns
under the profile are checked as dry runs on the finished SLURM run.

The cluster needs root and, when the packages are missing, apt-get with the Debian archive.
Without them the tests are skipped, naming the step that failed, except under CI (`CI` set),
where they must run and fail instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from test_workflow_phases import EXPECTED, TASKS, planned_jobs, write_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
PROFILE = ROOT / "profiles" / "slurm"
PARTITION, ACCOUNT = "test", "testacct"  # as tests/slurm/cluster.sh creates them
#: Limits of one Snakemake run under SLURM (`timeout -s INT`: Snakemake cancels its jobs).
SLURM_RUN_LIMIT_S = 1200

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]


def _unavailable(step: str, detail: str = "") -> None:
    message = f"no SLURM test cluster: step '{step}' failed" + (f":\n{detail}" if detail else "")
    if os.environ.get("CI"):
        pytest.fail(message + "\n(CI must run the SLURM tests: it is root and reaches the Debian archive)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> dict:
    """A running one-node SLURM cluster: its state folder and the environment its commands need."""
    state = tmp_path_factory.mktemp("slurm")
    if os.geteuid() != 0:
        _unavailable("root", f"the cluster's daemons run as root; this is uid {os.geteuid()}")
    started = time.monotonic()
    try:
        try:
            result = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                                    timeout=900)
        except subprocess.TimeoutExpired:
            _unavailable("start: timed out after 900 s")
        if result.returncode != 0:
            step = re.search(r"FAILED STEP: (.*)", result.stderr)
            _unavailable(step.group(1) if step else "start", (result.stdout + result.stderr)[-3000:])
        # cluster.sh prints the install time ("packages: installed in X s") and the start time.
        print(f"\nSLURM cluster: install and start {time.monotonic() - started:.1f} s; "
              + "; ".join(result.stdout.splitlines()))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}",
               "SLURM_CONF": str(state / "etc" / "slurm.conf")}
        yield {"state": state, "env": env}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=300)


def slurm(cluster: dict, *argv: str) -> subprocess.CompletedProcess:
    """A SLURM client command (sinfo, sacct, ...) against the test cluster."""
    result = subprocess.run(argv, capture_output=True, text=True, env=cluster["env"], timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}"
    return result


def profile_overrides(cluster: dict) -> list[str]:
    """Command-line options on top of `--profile profiles/slurm` for the test cluster.

    The profile's default resources with the partition and account filled in (the list on the
    command line replaces the profile's); threads capped at the node's CPUs (the profile asks
    for 8 for phase 1); status checks 1 s after submission and between rounds (the plugin's
    defaults are 40 s and 10 s).
    """
    defaults = yaml.safe_load((PROFILE / "config.yaml").read_text())["default-resources"]
    defaults.update(slurm_partition=PARTITION, slurm_account=ACCOUNT)
    cpus = int(slurm(cluster, "sinfo", "-h", "-p", PARTITION, "-o", "%c").stdout.split()[0])
    return ["--profile", str(PROFILE), "--default-resources", *(f"{k}={v}" for k, v in defaults.items()),
            "--max-threads", str(cpus), "--slurm-init-seconds-before-status-checks", "1",
            "--seconds-between-status-checks", "1"]


def snakemake_slurm(cluster: dict, workdir: Path, configfile: Path, *args: str) -> str:
    """Snakemake with the SLURM profile, started in `workdir` (its .snakemake/slurm_logs go there)."""
    command = ["timeout", "-s", "INT", "-k", "60", str(SLURM_RUN_LIMIT_S), sys.executable, "-m", "snakemake",
               "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(configfile),
               *profile_overrides(cluster), *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=cluster["env"],
                            timeout=SLURM_RUN_LIMIT_S + 120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{' '.join(command)} failed (exit {result.returncode}; 124: timed out):\n{output[-6000:]}")
    return output


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory, tiny_model_dir) -> dict:
    """The whole workflow of the tiny config, every job submitted to the test cluster."""
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    model = tiny_model_dir("llama")
    configfile = write_config(workdir / "tiny.yaml", model)
    node_memory = int(slurm(slurm_cluster, "sinfo", "-h", "-p", PARTITION, "-o", "%m").stdout.split()[0])
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    overrides = profile.get("set-resources") or {}  # none as shipped: the plan sizes every job
    largest = max((resources.get("mem_mb", 0) for resources in overrides.values()), default=0)
    assert largest <= node_memory, (
        f"profiles/slurm asks for up to {largest} MB per job; the test node has {node_memory} MB")
    started = time.monotonic()
    output = snakemake_slurm(slurm_cluster, workdir, configfile, "--slurm-keep-successful-logs")
    wall = time.monotonic() - started
    run_id = re.search(r"SLURM run ID: (\S+)", output)
    assert run_id, output[-4000:]
    print(f"\nSLURM workflow run: {wall:.1f} s")
    return {"workdir": workdir, "configfile": configfile, "output": output, "run_id": run_id.group(1),
            "wall_s": wall}


@pytest.fixture(scope="module")
def local_run(tiny_run) -> Path:
    """The same config run locally (`--cores 2`, the session's `tiny_run`): the reference."""
    return tiny_run["workdir"]


def _rule_of(comment: str) -> str:
    """The rule of a job from the comment the plugin gives it: rule_<rule>[_wildcards_<values>]."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment)
    assert match, comment
    return match.group(1)


def test_every_job_ran_on_slurm_and_completed(slurm_cluster, slurm_run):
    planned = planned_jobs(slurm_run["output"])  # the run's own job table
    assert planned.pop("all") == 1  # a target with no command: Snakemake finishes it itself
    assert planned["fisher"] == len(TASKS) and planned["qkov"] == 2 and planned["conflicts"] == 1, planned
    records = slurm(slurm_cluster, "sacct", "-X", "--parsable2", "--noheader", "--starttime", "now-1days",
                    "--name", slurm_run["run_id"], "--format", "JobIDRaw,State,Account,Partition,Comment%200"
                    ).stdout.splitlines()
    jobs = [line.split("|") for line in records]
    assert all(state == "COMPLETED" for _, state, *_ in jobs), records
    assert {(account, partition) for _, _, account, partition, _ in jobs} == {(ACCOUNT, PARTITION)}, records
    assert Counter(_rule_of(comment) for *_, comment in jobs) == Counter(planned), records
    total = sum(planned.values()) + 1
    assert f"{total} of {total} steps (100%) done" in slurm_run["output"]
    # Each job's SLURM log (kept with --slurm-keep-successful-logs) and the phase's own log.
    slurm_logs = slurm_run["workdir"] / ".snakemake" / "slurm_logs"
    assert {p.name for p in slurm_logs.iterdir()} == {f"rule_{rule}" for rule in planned}
    assert len(list(slurm_logs.rglob("*.log"))) == len(jobs)
    assert (slurm_run["workdir"] / "logs" / "qkov" / "code__prose.log").exists()


def test_every_output_is_written(slurm_run):
    workdir = slurm_run["workdir"]
    for task in TASKS:
        assert (workdir / "results" / "fisher" / f"{task}.zarr" / "zarr.json").exists(), task
    for directory, names in EXPECTED.items():
        for name in names:
            assert (workdir / directory / name).exists(), f"{directory}/{name} missing"


def _zarr_contents(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    group = zarr.open_group(path, mode="r")
    arrays = {key: array[...] for key, array in group.members(max_depth=None) if isinstance(array, zarr.Array)}
    return dict(group.attrs), arrays


def test_outputs_equal_those_of_a_local_run(slurm_run, local_run):
    slurm_results, local_results = slurm_run["workdir"] / "results", local_run / "results"
    stores = sorted(p.relative_to(local_results) for p in local_results.rglob("*.zarr") if p.is_dir())
    assert {"fisher/code.zarr", "fisher/prose.zarr"} <= {s.as_posix() for s in stores}
    masks = sorted(p.relative_to(local_results) for p in local_results.rglob("masks.safetensors"))
    assert "masks/code/masks.safetensors" in {m.as_posix() for m in masks}
    for path in masks:  # the same masks and metadata, byte for byte
        assert (slurm_results / path).read_bytes() == (local_results / path).read_bytes(), path
    for store in stores:
        local_attrs, local_arrays = _zarr_contents(local_results / store)
        slurm_attrs, slurm_arrays = _zarr_contents(slurm_results / store)
        assert slurm_attrs == local_attrs, store
        assert sorted(slurm_arrays) == sorted(local_arrays), store
        for key, expected in local_arrays.items():
            np.testing.assert_array_equal(slurm_arrays[key], expected, err_msg=f"{store}/{key}")
    tables = sorted(p.relative_to(local_results) for p in local_results.rglob("*.parquet"))
    assert len(tables) >= 20
    assert tables == sorted(p.relative_to(slurm_results) for p in slurm_results.rglob("*.parquet"))
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_parquet(slurm_results / table), pd.read_parquet(local_results / table),
                                      check_exact=True, obj=str(table))


# --- partial reruns under the SLURM profile (dry runs on the finished SLURM run) ----------------
@pytest.mark.parametrize(("args", "expected"), [
    ((), {}),  # a finished run: nothing to do
    (("--forcerun", "qkov"), {"qkov": 2, "replication": 1, "intervention": 1, "all": 1}),
    (("--config", "qkov={variant: signed}"), {"qkov": 2, "replication": 1, "intervention": 1, "all": 1}),
])
def test_partial_rerun_plans(slurm_cluster, slurm_run, args, expected):
    output = snakemake_slurm(slurm_cluster, slurm_run["workdir"], slurm_run["configfile"], "-n", "--quiet", "rules",
                             *args)
    assert planned_jobs(output) == expected, output[-4000:]
