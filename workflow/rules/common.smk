# Shared helpers of the workflow: config checks, task list, inputs, per-rule params, final outputs.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from fisher_pipeline.config import (
    BUNDLED_MODEL_PATH,
    HELDOUT_KEYS,
    ConfigError,
    PipelineConfig,
    load_yaml_strict,
    validate_config,
)
from fisher_pipeline.shards import SHARDING_KEYS, check_sample_shards, shard_names

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

TASKS = sorted(config["tasks"])
BUNDLED_MODEL = BUNDLED_MODEL_PATH
#: What the default target builds: each rule file adds its phase's outputs.
FINAL_OUTPUTS = []

# The rules run the package with the interpreter that runs Snakemake.
shell.prefix(f"set -euo pipefail; FISHER_PYTHON={shlex.quote(sys.executable)}; ")


wildcard_constraints:
    task="|".join(TASKS),


def model_input():
    """The model path phase 1 reads; the bundled model is built by rule bundled_model."""
    path = config["model"]["path"]
    if path != BUNDLED_MODEL and not Path(path).exists():
        raise WorkflowError(
            f"model.path {path!r} does not exist. Point it at a local HuggingFace folder "
            f"(safetensors) or a .gguf file, or leave the default {BUNDLED_MODEL!r}."
        )
    return path


def phase1_config(task, heldout=False):
    """What phase 1 of `task` depends on (other tasks' settings are left out, so editing
    one task reruns only that task; so is its `n_heldout`, which the analysed samples do not
    depend on, except for the held-out store). `fisher.shards` and `fisher.param_shards` are
    left out too: they never change a store; the shard file names carry them."""
    fisher = {key: value for key, value in config["fisher"].items() if key not in SHARDING_KEYS}
    spec = {key: value for key, value in config["tasks"][task].items() if heldout or key not in HELDOUT_KEYS}
    return json.dumps(
        {"model": config["model"], "tasks": {task: spec}, "fisher": fisher},
        sort_keys=True,
    )


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


def task_pairs(paths):
    """`TASK=PATH` arguments of a cross-task phase command, from task -> path."""
    return [f"{task}={path}" for task, path in paths.items()]


def conflict_pairs():
    """Task pairs of phase 5: `conflicts.pairs` (checked against the tasks) or every unordered pair.

    None when phase 1 stores no per-sample gradients (`fisher.per_sample_params: none`):
    phase 5 has nothing to compare then.
    """
    if config["fisher"]["per_sample_params"] in ("none", ""):
        return []
    listed = config["conflicts"]["pairs"]
    if listed is None:
        return [(a, b) for i, a in enumerate(TASKS) for b in TASKS[i + 1:]]
    for pair in listed:
        unknown = [task for task in pair if task not in TASKS]
        if unknown:
            raise WorkflowError(f"conflicts.pairs lists {list(pair)}, but {unknown} is not a task of this config "
                                f"(tasks: {TASKS}): list pairs of configured tasks.")
    return [tuple(pair) for pair in listed]


def qkov_pairs():
    """Ordered task pairs (A, B) of phase 6: `qkov.pairs` (checked) or every ordered pair.

    None when phase 1 stores no per-sample gradients.
    """
    if config["fisher"]["per_sample_params"] in ("none", ""):
        return []
    listed = config["qkov"]["pairs"]
    if listed is None:
        return [(a, b) for a in TASKS for b in TASKS if a != b]
    for pair in listed:
        unknown = [task for task in pair if task not in TASKS]
        if unknown or pair[0] == pair[1]:
            raise WorkflowError(f"qkov.pairs lists {list(pair)}: " + (
                f"{unknown} is not a task of this config (tasks: {TASKS})" if unknown else "a task with itself")
                + "; list ordered pairs [A, B] of two configured tasks.")
    return [tuple(pair) for pair in listed]
