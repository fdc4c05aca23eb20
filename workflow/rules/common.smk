# Shared helpers of the workflow: config checks, task list, inputs, per-rule params, final outputs.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from fisher_pipeline.config import (
    BUNDLED_MODEL_PATH,
    RUN_SETTING_KEYS,
    ConfigError,
    PipelineConfig,
    load_yaml_strict,
    phase1_settings,
    validate_config,
)
from fisher_pipeline import workflow_lock
from fisher_pipeline.errors import ModelLoadError, OutputBusyError, PhaseInputError
from fisher_pipeline.models.hub import is_hub_id, resolve as resolve_hub_model
from fisher_pipeline.phases.pair_options import select_task_pairs
from fisher_pipeline.planner import check_fit, plan_run
from fisher_pipeline.shard_plan import check_sample_shards, shard_names

# Snakemake keeps the last of two equal keys in a config file silently: read each file again,
# strictly. Nested values given with --config reach the workflow as text (Snakemake parses them
# with YAML's BaseLoader): validate_config reads them as the types the schema wants, fills in
# the defaults, and names any bad key. Building the dataclasses runs the checks a schema cannot
# express (regex validity, finite numbers, ...) before any job starts.
try:
    for _configfile in workflow.configfiles:
        load_yaml_strict(_configfile)
    _checked = validate_config(config, command_line=workflow.config_settings.config)
    _parsed = PipelineConfig.from_dict(_checked)
    check_sample_shards(_parsed.fisher.shards, _parsed.tasks.values())
except ConfigError as err:
    raise WorkflowError(f"invalid workflow config: {err}") from None
config.clear()
config.update(_checked)

# Every rule takes mem_mb, disk_mb and runtime from the planner (fisher_pipeline.planner), made
# from the model shapes (a meta-device build, cached) and this config. Snakemake applies the
# set-resources of a profile (and --set-resources) after the resources a rule declares, so
# those still override them.
try:
    PLAN = plan_run(_parsed)
except (ConfigError, ModelLoadError) as err:
    raise WorkflowError(str(err)) from None
PLANNED_RESOURCES = PLAN.resources()

# One run at a time in this folder (fisher_pipeline.workflow_lock): a second snakemake started
# while one runs stops here, naming it, before Snakemake would call the first run's outputs
# incomplete. The run claims the folder when it starts (onstart: dry runs never claim it).
# Job processes (cluster, subprocess) read the Snakefile again and check nothing.
if workflow.is_main_process:
    try:
        workflow_lock.check()
    except OutputBusyError as err:
        raise WorkflowError(str(err)) from None


# Before the first job (phase 1 included) of a run whose jobs run on this machine: a phase 1 job
# that the memory of the machine cannot hold stops the run, with the plan and the settings that
# would fit. Here rather than at parse: only now is the executor known (the jobs of a cluster
# executor get the planned mem_mb and the cluster judges them), and job processes, which parse
# again, skip it. Dry runs skip it too: `python -m fisher_pipeline plan` answers the same
# question. plan.check false skips it; plan.host_memory_mb and plan.device_memory_mb replace
# what is read from the machine.
onstart:
    try:
        if workflow.local_exec and config["plan"]["check"]:
            check_fit(_parsed, PLAN)
    except ConfigError as err:
        raise WorkflowError(str(err)) from None
    try:
        workflow_lock.hold()
    except OutputBusyError as err:
        raise WorkflowError(str(err)) from None


TASKS = sorted(config["tasks"])
BUNDLED_MODEL = BUNDLED_MODEL_PATH
#: What the default target builds: each rule file adds its phase's outputs.
FINAL_OUTPUTS = []

# The rules run the package with the interpreter that runs Snakemake. The `fisher` keys a
# phase 1 job needs but its store does not depend on (`RUN_SETTING_KEYS`) reach it the same way,
# as $FISHER_RUN_SETTINGS (`fisher --run-settings-json`), not as params: editing them reruns nothing.
PHASE1_RUN_SETTINGS = json.dumps({key: config["fisher"][key] for key in RUN_SETTING_KEYS}, sort_keys=True)
shell.prefix(
    f"set -euo pipefail; FISHER_PYTHON={shlex.quote(sys.executable)}; "
    # braces doubled: Snakemake formats the prefix with each command
    "FISHER_RUN_SETTINGS=" + shlex.quote(PHASE1_RUN_SETTINGS).replace("{", "{{").replace("}", "}}") + "; "
)


wildcard_constraints:
    task="|".join(TASKS),


def model_input():
    """The model path phase 1 reads; the bundled model is built by rule bundled_model, a hub
    id is its cached snapshot folder (offline: a missing one stops the workflow here, naming
    the command that fills the cache)."""
    path = config["model"]["path"]
    if path == BUNDLED_MODEL or Path(path).exists():
        return path
    if is_hub_id(path):
        try:
            return str(resolve_hub_model(path, config["model"].get("revision")))
        except ModelLoadError as err:
            raise WorkflowError(str(err)) from None
    raise WorkflowError(
        f"model.path {path!r} does not exist. Point it at a local HuggingFace folder "
        f"(safetensors), a .gguf file or a hub id org/name, or leave the default {BUNDLED_MODEL!r}."
    )


def phase1_config(task, heldout=False):
    """What phase 1 of `task` depends on (`phase1_settings`, the rule that also makes the
    store's config hash): other tasks' settings are left out, so editing one task reruns only
    that task; so are its `n_heldout` (except for the held-out store) and the `fisher` keys
    that never change a store (`STORE_INVARIANT_KEYS`; the jobs get `$FISHER_RUN_SETTINGS`)."""
    task_spec, fisher = phase1_settings(config["tasks"][task], config["fisher"], heldout)
    return json.dumps({"model": config["model"], "tasks": {task: task_spec}, "fisher": fisher}, sort_keys=True)




def planned(rule, resource):
    """The planner's `resource` (mem_mb, disk_mb or runtime in minutes) of one job of `rule`."""
    return PLANNED_RESOURCES[rule][resource]


def fisher_sharded():
    """Whether phase 1 runs as K x P shard jobs and a merge per task (else one `fisher` job)."""
    return config["fisher"]["shards"] > 1 or config["fisher"]["param_shards"] > 1


def fisher_shard_paths(task):
    """The partial stores of `task`'s shard jobs, sample shard major."""
    names = shard_names(config["fisher"]["shards"], config["fisher"]["param_shards"])
    return [f"results/fisher/shards/{task}/{name}" for name in names]


def phase_config(section, *context):
    """JSON of one analysis section (and the phase 1 sections in `context` it reads, e.g.
    "model"): a rule's params hold only these, so editing another section never reruns it."""
    return json.dumps({key: config[key] for key in (section, *context)}, sort_keys=True)


def fisher_stores():
    """Task -> phase 1 store, for every task."""
    return {task: f"results/fisher/{task}.zarr" for task in TASKS}


def heldout_stores():
    """Task -> phase 1 store of its held-out samples (`fisher --heldout`), for every task."""
    return {task: f"results/fisher_heldout/{task}.zarr" for task in TASKS}


def mask_dirs():
    """Task -> phase 3 output directory, for every task."""
    return {task: f"results/masks/{task}" for task in TASKS}


def task_path_args(paths):
    """`TASK=PATH` arguments of a cross-task phase command, from task -> path."""
    return [f"{task}={path}" for task, path in paths.items()]


def _task_pairs_of(section, ordered):
    """Task pairs of pair phase `section` (`<section>.pairs`, checked against the tasks, or every
    pair); none when phase 1 stores no per-sample gradients (`fisher.per_sample_params: none`)."""
    if config["fisher"]["per_sample_params"] in ("none", ""):
        return []
    try:
        return select_task_pairs(TASKS, config[section]["pairs"], section, ordered, stores="is not a task of this config")
    except PhaseInputError as err:
        raise WorkflowError(str(err)) from None


def conflict_task_pairs():
    """Unordered task pairs of phase 5."""
    return _task_pairs_of("conflicts", ordered=False)


def qkov_task_pairs():
    """Ordered task pairs (A, B) of phase 6."""
    return _task_pairs_of("qkov", ordered=True)
