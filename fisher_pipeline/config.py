"""The workflow config: one JSON schema, and the dataclasses the code uses.

The schema is the one definition of every key (type, bounds, choices, default, meaning):
`fisher_pipeline/schemas/config.schema.yaml` holds the top level and phase 1's sections
(`model`, `tasks`, `fisher`); each analysis phase declares its own section in its
package's `__init__.py` with `@config_section(name, schema)`. `config_schema()` assembles
the whole from the phases registered in `fisher_pipeline.phase_registry`
(`python -m fisher_pipeline schema` prints it).

Layering: this module sits below the phases. It imports the phase registry (which imports
nothing of the package) and, through it, only the phases' light declarations, never their
numerics: checking a config imports neither torch nor scipy, matplotlib or pandas.

Snakemake (workflow/rules/common.smk) and the Python API (`PipelineConfig.from_dict`,
`task_config`, the CLI) both call `validate_config`: the same schema, the same defaults,
errors that name the key. The dataclasses check their own fields against their section of
the schema when built, and keep in `__post_init__` only what a schema cannot say (regex
validity, duplicates as stored, finite numbers). `config/README.md`'s tables are rendered
from the schema (`fisher_pipeline.config_docs`); tests keep schema, dataclasses and docs in
step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config_schema import (  # noqa: F401 (re-exported: the config API in one place)
    SCHEMA_PATH,
    TASK_SCHEMA,
    StrictLoader,
    config_schema,
    config_section,
    core_schema,
    load_yaml_strict,
    parse_config_json,
    read_config_file,
    schema_checked,
    validate_config,
)
from .errors import ConfigError
from .phase_registry import CORE_SECTIONS, registered_phases  # noqa: F401 (CORE_SECTIONS re-exported)
from .roles import NAMED_SELECTIONS

BUNDLED_MODEL_PATH = "resources/models/SmolLM2-135M-Instruct"
#: Task keys phase 1 never reads (held-out samples are scored by mask_eval only): left out of its config hash.
HELDOUT_KEYS = ("n_heldout",)
#: `fisher` keys that say how phase 1's work is split into jobs (the shard flags carry them to
#: each job; a merged store equals the one-job store).
SHARDING_KEYS = ("shards", "param_shards")
#: `fisher` keys that say where a job keeps its float64 sums and by which route it computes
#: the same sums: a job needs them, its store does not depend on them.
RUN_SETTING_KEYS = ("state_device", "fold_kernel")
#: `fisher` keys that never change a store: left out of its config hash and of what the
#: workflow reruns phase 1 for.
STORE_INVARIANT_KEYS = SHARDING_KEYS + RUN_SETTING_KEYS


@config_section("model")
class ModelConfig:
    """Which model to analyse and how to load it."""

    path: str = BUNDLED_MODEL_PATH  # local HuggingFace folder (safetensors), a .gguf file, or a hub id org/name
    revision: str | None = None  # a hub id's branch, tag or commit (default: main)
    dtype: str = "float32"  # weights and activations: float32, bfloat16, float16, or auto (the checkpoint's)
    trust_remote_code: bool = False  # run code shipped with the model folder (off: safer)
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"; gradients are the same


@schema_checked(lambda task: f"tasks.{task.name}", lambda: TASK_SCHEMA)
class TaskConfig:
    """One task: where its text comes from and how many samples to take."""

    name: str  # the task's key under `tasks:` (letters, digits, "_", "-")
    source: str  # "builtin:arithmetic|code|prose" or a path to .jsonl / .txt / .csv
    format: str = "auto"  # "auto" (from the file suffix), "jsonl", "text" or "csv"
    column: str = "text"  # CSV column holding the text
    n_samples: int = 64  # samples to take (fewer: a warning, and all that exist are used)
    n_heldout: int = 16  # held-out samples after them in the same order, for mask_eval (phase 1 never reads them)
    max_length: int = 128  # tokens per sample at most (longer samples are truncated)
    seed: int = 0  # drives sample choice (and arithmetic generation)

    def __post_init__(self) -> None:
        names = core_schema()["properties"]["tasks"]["propertyNames"]
        if not isinstance(self.name, str) or not re.fullmatch(names["pattern"], self.name):
            raise ConfigError(f"task name {self.name!r} is not allowed: use only {names['description']}")


@config_section("fisher")
class FisherConfig:
    """Phase 1 options: how per-sample gradients are computed and what is stored."""

    labels: str = "empirical"  # "empirical" (data labels) or "sampled" (model's own predictions)
    engine: str = "hooks"  # "hooks" (batched, fast) or "loop" (batch-1 reference)
    batch_size: int = 16  # samples per micro-batch (per-sample tensors alive at once)
    seed: int = 0  # seeds sampled labels
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    state_device: str | None = None  # where the float64 statistics live: None = with the model, or "cpu"
    fold_kernel: str = "auto"  # "auto": compiled one-pass fold of CPU float32 chunks where it builds; "torch"
    per_sample_params: str = "attention"  # named selection (attention, mlp, all, none) or a regex: g_i stored
    per_sample_layers: tuple[int, ...] | None = None  # only these layers (negative: from the last); None: all
    per_sample_dtype: str = "float16"  # "float16" or "float32" for stored g_i
    fisher_m2_params: str = "attention"  # named selection or regex: parameters with elementwise M2 of g^2
    fisher_m2_layers: tuple[int, ...] | None = None  # only these layers (negative: from the last); None: all
    chunk_elements: int = 1 << 21  # per-sample elements materialised at once: a cache-sized chunk
    shards: int = 1  # jobs per task over contiguous sample ranges, merged exactly (workflow; >= 1)
    param_shards: int = 1  # jobs per sample shard, each over a size-balanced share of the parameters (>= 1)

    def __post_init__(self) -> None:
        for key in ("per_sample_layers", "fisher_m2_layers"):
            layers = getattr(self, key)
            if layers is not None:
                object.__setattr__(self, key, tuple(layers))
        for key in ("per_sample_params", "fisher_m2_params"):
            selection = getattr(self, key)
            if selection not in NAMED_SELECTIONS:
                try:
                    re.compile(selection)
                except re.error as err:
                    raise ConfigError(
                        f"fisher.{key} = {selection!r} is not a valid regex ({err}): use a named selection "
                        f"({', '.join(NAMED_SELECTIONS)}) or a Python regex searched in parameter names"
                    ) from None


# --- the whole config ------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    """The whole workflow config: model, tasks by name, phase 1 options, and each analysis
    phase's options under its section name (`config.masks`, `config.scaled`, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model analysed
    tasks: dict[str, TaskConfig] = field(default_factory=dict)  # task name -> its settings
    fisher: FisherConfig = field(default_factory=FisherConfig)  # phase 1
    phases: dict[str, Any] = field(default_factory=dict)  # analysis section -> its options (default if absent)

    def __post_init__(self) -> None:
        phases = {section: phase.options() for section, phase in registered_phases().items()}
        phases.update(self.phases)
        object.__setattr__(self, "phases", phases)

    def __getattr__(self, name: str) -> Any:
        """The options of analysis section `name` (`config.masks`)."""
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.__dict__["phases"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no section {name!r}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PipelineConfig:
        """Parse a workflow config mapping (as loaded from YAML or JSON), strictly.

        Sections left out take their defaults; so may `tasks` (unlike in the workflow).

        Raises:
            ConfigError: an unknown key, a value of the wrong type or out of range, a
                reserved task name, ... (the message names the key path and the value).
        """
        values = validate_config(raw, require_tasks=False)
        return cls(
            model=ModelConfig(**values["model"]),
            tasks={name: TaskConfig(name=name, **spec) for name, spec in values["tasks"].items()},
            fisher=FisherConfig(**values["fisher"]),
            phases={section: phase.options(**values[section]) for section, phase in registered_phases().items()},
        )


def phase1_settings(task: Mapping[str, Any], fisher: Mapping[str, Any],
                    heldout: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a task's phase 1 store depends on besides the weights: (task settings, `fisher` settings).

    `STORE_INVARIANT_KEYS` are left out of `fisher`, and `HELDOUT_KEYS` out of the task's
    settings unless `heldout` (the held-out store is made from the samples after the
    analysed ones; the analysed samples do not depend on how many follow).
    `fisher_pipeline.fisher.phase1_config_hash` hashes these; the workflow reruns phase 1
    when they change, and passes them to its jobs (with `RUN_SETTING_KEYS` beside them).
    """
    spec = {key: value for key, value in task.items() if heldout or key not in HELDOUT_KEYS}
    return spec, {key: value for key, value in fisher.items() if key not in STORE_INVARIANT_KEYS}


def task_config(name: str, spec: Mapping[str, Any]) -> TaskConfig:
    """Build the `TaskConfig` of task `name` from its config mapping (checked like a whole config)."""
    values = validate_config({"tasks": {name: spec}}, require_tasks=False)
    return TaskConfig(name=name, **values["tasks"][name])


def config_hash(*parts: Any) -> str:
    """Stable short hash of dataclasses / JSON-able values (what a store was made from)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}
        if isinstance(obj, Mapping):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj

    text = json.dumps([plain(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
