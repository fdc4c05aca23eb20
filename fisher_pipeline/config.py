"""The workflow config: one JSON schema, and the dataclasses the code uses.

The schema is the one definition of every key (type, bounds, choices, default):
`fisher_pipeline/schemas/config.schema.yaml` holds the top level and phase 1's sections
(`model`, `tasks`, `fisher`); each analysis phase declares its own section next to its
options dataclass with `@config_section(name, schema)`. `config_schema()` assembles the
whole from the phases registered in `fisher_pipeline.phases.registry`
(`python -m fisher_pipeline schema` prints it).

Snakemake (workflow/rules/common.smk) and the Python API (`PipelineConfig.from_dict`,
`task_config`, the CLI) both call `validate_config`: the same schema, the same defaults,
errors that name the key. The dataclasses check their own fields against their section of
the schema when built, and keep in `__post_init__` only what a schema cannot say (regex
validity, duplicates as stored, finite numbers). `config/README.md` documents every key;
tests keep schema, dataclasses and docs in step.
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

BUNDLED_MODEL_PATH = "resources/models/SmolLM2-135M-Instruct"
#: Parameter selections the architecture adapters resolve for every family (else: a regex).
NAMED_SELECTIONS = ("attention", "mlp", "blocks", "all", "none")
#: Task keys phase 1 never reads (held-out samples are scored by mask_eval only): left out of its config hash.
HELDOUT_KEYS = ("n_heldout",)
#: Sections of phase 1; every other section belongs to a registered analysis phase.
CORE_SECTIONS = ("model", "tasks", "fisher")


@config_section("model")
class ModelConfig:
    """Which model to analyse and how to load it."""

    path: str = BUNDLED_MODEL_PATH  # local HuggingFace folder (safetensors) or a .gguf file
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


# --- analysis phases (registered by their modules, see fisher_pipeline.phases.registry) ----------
@config_section("importance", """
description: phase 2, Fisher importance per tensor / head / neuron / layer (ImportanceOptions)
properties:
  rank_by:
    enum: [mean, sum]
    default: mean
    description: rank and colour by Fisher per element (mean) or per unit (sum)
  log_color:
    type: boolean
    default: true
""")
class ImportanceOptions:
    """Settings of phase 2."""

    rank_by: str = "mean"  # rank (and colour heatmaps) by Fisher per element ("mean") or per unit ("sum")
    log_color: bool = True  # heatmap colours on a log scale: Fisher spans orders of magnitude

    @property
    def score_column(self) -> str:
        return f"fisher_{self.rank_by}"


@config_section("masks", """
description: phase 3, pruning masks keeping the units whose removal costs the task least (MaskOptions)
properties:
  sparsities:
    type: array
    minItems: 1
    uniqueItems: true
    items:
      type: number
      minimum: 0
      maximum: 1
    default: [0.25, 0.5]
    description: fractions of units removed
  criterion:
    enum: [saliency, fisher, magnitude, wanda, random]
    default: saliency
    description: >
      the score that ranks units (higher = kept); its masks are the ones phase 4 compares. saliency:
      the second-order loss increase of removing the unit (elements 0.5*F*w^2, Optimal Brain Damage;
      heads and neurons 0.5*mean_i gate_i^2, the Fisher of a gate on the unit); fisher: F alone (mean
      Fisher of the unit); magnitude: |w| (mean over the unit); wanda: |w_ij|*||X_j||; random: seeded
  baselines:
    type: array
    uniqueItems: true
    items:
      enum: [saliency, fisher, magnitude, wanda, random]
    default: [fisher, magnitude, wanda, random]
    description: further criteria whose masks are computed beside `criterion`'s (for mask_eval)
  scope:
    enum: [global, per_layer, per_tensor]
    default: global
  granularity:
    enum: [element, head, neuron]
    default: element
  include:
    type: [string, "null"]
    default: blocks
    description: >
      parameters masked: a named selection (blocks = attention and MLP projections, attention, mlp,
      all) or a regex searched in parameter names (null = all)
  wanda_compare:
    enum: [row, scope]
    default: row
    description: >
      where wanda's element scores compete: within each output row (as the Wanda paper) or within
      the scope, like the other criteria
  seed:
    type: integer
    default: 0
    description: seed of the random criterion
""")
class MaskOptions:
    """Settings of phase 3."""

    sparsities: tuple[float, ...] = (0.25, 0.5)  # fractions of units removed, each in [0, 1]
    criterion: str = "saliency"  # score ranking units: saliency, fisher, magnitude, wanda, random
    baselines: tuple[str, ...] = ("fisher", "magnitude", "wanda", "random")  # more criteria computed beside it
    scope: str = "global"  # where units compete: "global", "per_layer" or "per_tensor"
    granularity: str = "element"  # what a unit is: "element", "head" or "neuron"
    include: str | None = "blocks"  # named selection or regex of the parameters masked (None: all)
    wanda_compare: str = "row"  # wanda's elements compete per output row ("row") or within the scope
    seed: int = 0  # seed of the random criterion

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if len({f"{s:g}" for s in self.sparsities}) != len(self.sparsities):  # names as stored
            raise ConfigError(f"masks.sparsities = {list(self.sparsities)}: holds the same fraction twice "
                              f"(as stored, to 6 significant digits)")
        if self.include is not None and self.include not in NAMED_SELECTIONS:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ConfigError(f"masks.include = {self.include!r} is not a valid regex ({err})") from None
        if self.granularity != "element" and self.scope == "per_tensor":
            raise ConfigError(
                f"masks.scope = 'per_tensor' with granularity {self.granularity!r}: a {self.granularity} spans "
                "several tensors (a head: its q rows and o columns; a neuron: its up/gate rows and down column); "
                "use scope global or per_layer"
            )

    @property
    def criteria(self) -> tuple[str, ...]:
        """Every criterion computed: `criterion` first, then the baselines not equal to it."""
        return (self.criterion, *(c for c in self.baselines if c != self.criterion))


@config_section("overlap", """
description: phase 4, mask overlap between tasks (OverlapOptions)
properties:
  heatmap_metric:
    enum: [jaccard, dice, overlap_coefficient]
    default: jaccard
""")
class OverlapOptions:
    """Settings of phase 4."""

    heatmap_metric: str = "jaccard"  # global metric of the task x task heatmaps: jaccard, dice, overlap_coefficient


@config_section("scaled", """
description: phase 7, natural gradients and EWC costs (ScaledOptions)
properties:
  damping:
    type: number
    minimum: 0
    default: 1.0e-8
    examples: [1.0e-5]
    description: lambda in g / (F + lambda), absolute, in Fisher units of the token-sum loss
  eta:
    type: number
    default: 1.0
    description: size of the natural-gradient step whose EWC cost is measured
""")
class ScaledOptions:
    """Settings of phase 7."""

    damping: float = 1e-8  # lambda in g / (F + lambda), in Fisher units (token-sum loss); >= 0
    eta: float = 1.0  # size of the natural-gradient step whose EWC cost is measured


SCOPES = tuple(MaskOptions.__config_schema__["properties"]["scope"]["enum"])  # where mask units compete
GRANULARITIES = tuple(MaskOptions.__config_schema__["properties"]["granularity"]["enum"])  # what a mask unit is
CRITERIA = tuple(MaskOptions.__config_schema__["properties"]["criterion"]["enum"])  # what ranks mask units
METRICS = tuple(OverlapOptions.__config_schema__["properties"]["heatmap_metric"]["enum"])  # mask overlap metrics


# --- the whole config ------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    """The whole workflow config: model, tasks by name, phase 1 options, and each analysis
    phase's options under its section name (`config.masks`, `config.scaled`, ...)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model analysed
    tasks: dict[str, TaskConfig] = field(default_factory=dict)  # task name -> its settings
    fisher: FisherConfig = field(default_factory=FisherConfig)  # phase 1
    phases: dict[str, Any] = field(default_factory=dict)  # analysis section -> its options (default if absent)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        options = self.__dict__.get("phases", {})
        if name in options:
            return options[name]
        from .phases.registry import registered_phases

        phase = registered_phases().get(name)
        if phase is None:
            raise AttributeError(f"{type(self).__name__} has no section {name!r}")
        return phase.options()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PipelineConfig:
        """Parse a workflow config mapping (as loaded from YAML or JSON), strictly.

        Sections left out take their defaults; so may `tasks` (unlike in the workflow).

        Raises:
            ConfigError: an unknown key, a value of the wrong type or out of range, a
                reserved task name, ... (the message names the key path and the value).
        """
        from .phases.registry import registered_phases

        values = validate_config(raw, require_tasks=False)
        return cls(
            model=ModelConfig(**values["model"]),
            tasks={name: TaskConfig(name=name, **spec) for name, spec in values["tasks"].items()},
            fisher=FisherConfig(**values["fisher"]),
            phases={section: phase.options(**values[section]) for section, phase in registered_phases().items()},
        )


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
