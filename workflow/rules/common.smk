# Helpers shared by the rules: config validation, task list, inputs, per-rule params.
import json
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

PYTHON = sys.executable
TASKS = sorted(config["tasks"])
BUNDLED_MODEL = "resources/models/SmolLM2-135M-Instruct"


wildcard_constraints:
    task="|".join(TASKS),


def model_input():
    """The model path phase 1 reads; the bundled model is built by rule bundled_model."""
    path = config["model"]["path"]
    if path != BUNDLED_MODEL and not Path(path).exists():
        raise ValueError(
            f"model.path {path!r} does not exist. Point it at a local HuggingFace folder "
            f"(safetensors) or a .gguf file, or leave the default {BUNDLED_MODEL!r}."
        )
    return path


def phase1_config(task):
    """What phase 1 of `task` depends on (other tasks' settings are left out, so editing
    one task reruns only that task)."""
    return json.dumps(
        {"model": config["model"], "tasks": {task: config["tasks"][task]}, "fisher": config["fisher"]},
        sort_keys=True,
    )


def phase_config(section):
    """JSON of one analysis section: a rule's params hold only its own section, so editing
    another section (or phase 1's) never reruns it."""
    return json.dumps({section: config[section]}, sort_keys=True)


def fisher_stores():
    """Task -> phase 1 store, for every task."""
    return {task: f"results/fisher/{task}.zarr" for task in TASKS}


def mask_dirs():
    """Task -> phase 3 output directory, for every task."""
    return {task: f"results/masks/{task}" for task in TASKS}


def task_pairs(paths):
    """`TASK=PATH` arguments of a cross-task phase command, from task -> path."""
    return [f"{task}={path}" for task, path in paths.items()]


def all_outputs():
    return [
        *expand("results/fisher/{task}.zarr", task=TASKS),
        *expand("results/importance/{task}", task=TASKS),
        "results/importance/rank_agreement",
        *expand("results/masks/{task}", task=TASKS),
        "results/overlap",
        *expand("results/scaled/{task}", task=TASKS),
        "results/scaled/cross_task",
    ]
