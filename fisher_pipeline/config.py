"""Options of each phase as dataclasses: the workflow config maps onto them one to one.

`config/README.md` documents every key; `workflow/schemas/config.schema.yaml` holds the
same defaults for Snakemake's validation (a test keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

#: Attention projections of every supported family (weights and biases).
ATTENTION_PROJECTIONS = (
    r"\.(self_attn|attn|attention)\."
    r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj|query_key_value|dense)\.(weight|bias)$"
)
BUNDLED_MODEL_PATH = "resources/models/SmolLM2-135M-Instruct"
SCOPES = ("global", "per_layer", "per_tensor")  # where mask units compete
GRANULARITIES = ("element", "head", "neuron")  # what a mask unit is
METRICS = ("jaccard", "dice", "overlap_coefficient")  # mask overlap metrics


@dataclass(frozen=True)
class ModelConfig:
    """Which model to analyse and how to load it."""

    path: str = BUNDLED_MODEL_PATH  # local HuggingFace folder (safetensors) or a .gguf file
    trust_remote_code: bool = False  # run code shipped with the model folder (off: safer)
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"; gradients are the same


@dataclass(frozen=True)
class TaskConfig:
    """One task: where its text comes from and how many samples to take."""

    name: str
    source: str  # "builtin:arithmetic|code|prose" or a path to .jsonl / .txt / .csv
    format: str = "auto"  # "auto" (from the file suffix), "jsonl", "text" or "csv"
    column: str = "text"  # CSV column holding the text
    n_samples: int = 64  # samples to take (fewer: a warning, and all that exist are used)
    max_length: int = 128  # tokens per sample at most (longer samples are truncated)
    seed: int = 0  # drives sample choice (and arithmetic generation)


@dataclass(frozen=True)
class FisherConfig:
    """Phase 1 options: how per-sample gradients are computed and what is stored."""

    labels: str = "empirical"  # "empirical" (data labels) or "sampled" (model's own predictions)
    engine: str = "hooks"  # "hooks" (batched, fast) or "loop" (batch-1 reference)
    batch_size: int = 16  # samples per micro-batch (per-sample tensors alive at once)
    seed: int = 0  # seeds sampled labels
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    per_sample_params: str = ATTENTION_PROJECTIONS  # regex: parameters whose g_i are stored
    per_sample_dtype: str = "float16"  # "float16" or "float32" for stored g_i
    fisher_m2_params: str = ATTENTION_PROJECTIONS  # regex: parameters with elementwise M2 of g^2
    chunk_elements: int = 1 << 25  # per-sample elements materialised at once for big tensors


@dataclass(frozen=True)
class ImportanceOptions:
    """Settings of phase 2."""

    rank_by: str = "mean"  # rank (and colour heatmaps) by Fisher per element ("mean") or per unit ("sum")
    log_color: bool = True  # heatmap colours on a log scale: Fisher spans orders of magnitude

    def __post_init__(self) -> None:
        if self.rank_by not in ("mean", "sum"):
            raise ConfigError(f"importance rank_by must be 'mean' or 'sum', got {self.rank_by!r}")

    @property
    def score_column(self) -> str:
        return f"fisher_{self.rank_by}"



@dataclass(frozen=True)
class MaskOptions:
    """Settings of phase 3."""

    sparsities: tuple[float, ...] = (0.5, 0.9)  # fractions of units removed, each in [0, 1]
    scope: str = "global"  # where units compete: "global", "per_layer" or "per_tensor"
    granularity: str = "element"  # what a unit is: "element", "head" or "neuron"
    include: str | None = None  # regex searched in parameter names; only matches are masked (None: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        if not self.sparsities:
            raise ConfigError("masks sparsities is empty: list at least one fraction to remove, e.g. [0.5, 0.9]")
        bad = [s for s in self.sparsities if not 0.0 <= s <= 1.0]
        if bad:
            raise ConfigError(f"masks sparsities must lie in [0, 1] (fraction removed), got {bad}")
        if len({f"{s:g}" for s in self.sparsities}) != len(self.sparsities):  # names as stored
            raise ConfigError(f"masks sparsities has duplicates: {list(self.sparsities)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"masks scope must be one of {SCOPES}, got {self.scope!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"masks granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ConfigError(f"masks include {self.include!r} is not a valid regex ({err})") from None



@dataclass(frozen=True)
class OverlapOptions:
    """Settings of phase 4."""

    heatmap_metric: str = "jaccard"  # global metric of the task x task heatmaps: jaccard, dice, overlap_coefficient

    def __post_init__(self) -> None:
        if self.heatmap_metric not in METRICS:
            raise ConfigError(f"overlap heatmap_metric must be one of {METRICS}, got {self.heatmap_metric!r}")



@dataclass(frozen=True)
class ScaledOptions:
    """Settings of phase 7."""

    damping: float = 1e-8  # lambda in g / (F + lambda), in Fisher units (token-sum loss); >= 0
    eta: float = 1.0  # size of the natural-gradient step whose EWC cost is measured

    def __post_init__(self) -> None:
        if not math.isfinite(self.damping) or self.damping < 0:
            raise ConfigError(f"scaled damping (lambda) must be a finite number >= 0, got {self.damping!r}")
        if not math.isfinite(self.eta):
            raise ConfigError(f"scaled eta must be finite, got {self.eta!r}")


_CHOICES = {
    ("ModelConfig", "attn_implementation"): ("sdpa", "eager"),
    ("TaskConfig", "format"): ("auto", "jsonl", "text", "csv"),
    ("FisherConfig", "labels"): ("empirical", "sampled"),
    ("FisherConfig", "engine"): ("hooks", "loop"),
    ("FisherConfig", "device"): ("cpu", "cuda", "auto"),
    ("FisherConfig", "per_sample_dtype"): ("float16", "float32"),
}
_POSITIVE = {"n_samples", "max_length", "batch_size", "chunk_elements"}
_REGEXES = {"per_sample_params", "fisher_m2_params"}
#: Keys whose type the analysis phases' own checks would not report clearly.
_NUMBERS = {("ScaledOptions", "damping"), ("ScaledOptions", "eta")}
_BOOLEANS = {("ImportanceOptions", "log_color")}
_NUMBER_LISTS = {("MaskOptions", "sparsities")}
_OPTIONAL_STRINGS = {("MaskOptions", "include")}

#: Config sections of the analysis phases -> their options dataclasses.
_PHASE_SECTIONS: dict[str, type] = {
    "importance": ImportanceOptions,
    "masks": MaskOptions,
    "overlap": OverlapOptions,
    "scaled": ScaledOptions,
}


def _build(cls: type, section: str, values: Mapping[str, Any], **extra: Any):
    """Build dataclass `cls` from `values`, naming any unknown or invalid key."""
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys of '{section}': {', '.join(sorted(known - set(extra)))}"
        )
    _check_types(cls, section, values)
    obj = cls(**{**values, **extra})
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        choices = _CHOICES.get((cls.__name__, f.name))
        if choices and value not in choices:
            raise ConfigError(f"{section}.{f.name} = {value!r}; choose one of {', '.join(choices)}")
        if f.name in _POSITIVE and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{section}.{f.name} = {value!r}; it must be a positive integer")
        if f.name in _REGEXES:
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"{section}.{f.name} = {value!r} is not a valid regex: {err}") from None
    return obj


def _check_types(cls: type, section: str, values: Mapping[str, Any]) -> None:
    """Refuse values of the wrong type before `cls` is built (its checks assume the types)."""

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for key, value in values.items():
        where = (cls.__name__, key)
        if where in _NUMBERS and not is_number(value):
            hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if isinstance(value, str) else ""
            raise ConfigError(f"{section}.{key} = {value!r}; it must be a number{hint}")
        if where in _BOOLEANS and not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} = {value!r}; it must be true or false")
        if where in _NUMBER_LISTS and (
            isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__")
            or not all(is_number(v) for v in value)
        ):
            raise ConfigError(f"{section}.{key} = {value!r}; it must be a list of numbers, e.g. [0.5, 0.9]")
        if where in _OPTIONAL_STRINGS and value is not None and not isinstance(value, str):
            raise ConfigError(f"{section}.{key} = {value!r}; it must be a regex string or null")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole workflow config: model, tasks by name, phase options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    importance: ImportanceOptions = field(default_factory=ImportanceOptions)  # phase 2
    masks: MaskOptions = field(default_factory=MaskOptions)  # phase 3
    overlap: OverlapOptions = field(default_factory=OverlapOptions)  # phase 4
    scaled: ScaledOptions = field(default_factory=ScaledOptions)  # phase 7

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "PipelineConfig":
        """Parse a workflow config dict (as loaded from YAML), strictly."""
        sections = {"model", "tasks", "fisher", *_PHASE_SECTIONS}
        unknown = sorted(set(raw) - sections)
        if unknown:
            raise ConfigError(
                f"unknown top-level config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(sections))}"
            )
        tasks = raw.get("tasks", {}) or {}
        if not isinstance(tasks, Mapping):
            raise ConfigError("config 'tasks' must map task names to task settings")
        return cls(
            model=_build(ModelConfig, "model", raw.get("model", {}) or {}),
            tasks={name: task_config(name, spec) for name, spec in tasks.items()},
            fisher=_build(FisherConfig, "fisher", raw.get("fisher", {}) or {}),
            **{name: _build(cls, name, raw.get(name, {}) or {}) for name, cls in _PHASE_SECTIONS.items()},
        )


def task_config(name: str, spec: Mapping[str, Any]) -> TaskConfig:
    """Build the `TaskConfig` of task `name` from its config mapping."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"task name {name!r} may hold only letters, digits, '_' and '-'")
    if "source" not in spec:
        raise ConfigError(f"tasks.{name}.source is missing (e.g. 'builtin:prose' or a .jsonl path)")
    return _build(TaskConfig, f"tasks.{name}", spec, name=name)


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
