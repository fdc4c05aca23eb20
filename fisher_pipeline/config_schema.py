"""The workflow config's JSON schema: strict YAML, assembly, validation, messages.

`schemas/config.schema.yaml` holds the top level and phase 1's sections (`model`,
`tasks`, `fisher`); each analysis phase declares its own section in its package's
`__init__.py` with `@config_section(name, schema)`. A key's `description` is its
documentation (config/README.md is rendered from it); `title`, where a message needs a
few words for the key, is that. `config_schema()` assembles the whole
from the registered phases; `validate_config` checks a config against it, fills in the
defaults and reads text values (from `--config`, or YAML's `1e-5`) as the types the
schema wants. `fisher_pipeline.config` holds the dataclasses built from it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, dataclass_transform

import yaml

from .errors import ConfigError
from .phase_registry import registered_phases, reserved_task_names

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


# --- YAML files and JSON strings -----------------------------------------------------------
class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping.

    Plain YAML loaders keep the last value silently, so a task listed twice under
    `tasks:` would quietly lose its first definition.
    """


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key: the base constructor reports it
            continue
        if first is not None:
            raise ConfigError(
                f"{key_node.start_mark.name}, line {line}: key {key!r} appears twice in one mapping (first on "
                f"line {first}); YAML would silently keep only the last one. Remove or rename one of them."
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_strict(path: str | Path) -> Any:
    """Load a YAML (or JSON) file, refusing duplicate keys.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or repeats a key in a mapping
            (the message names the file, the line and the key).
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as stream:
            return yaml.load(stream, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML config such as "
                          f"config/config.yaml") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: pass the path of a YAML file") from None
    except yaml.YAMLError as err:
        where = f", line {err.problem_mark.line + 1}" if getattr(err, "problem_mark", None) else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where} is not valid YAML: {problem}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The config mapping held by YAML file `path` (empty file: `{}`), read strictly."""
    raw = load_yaml_strict(path)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"config file {path} holds a {_type_name(raw)}, not a mapping of sections: write top-level keys "
            f"such as 'model:', 'tasks:' and 'fisher:' (see config/config.yaml)"
        )
    return dict(raw)


def parse_config_json(text: str, flag: str = "--config-json") -> dict[str, Any]:
    """The config mapping held by JSON string `text` (given with command-line `flag`)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{flag} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): pass a JSON object "
            f"of config sections, e.g. '{{\"masks\": {{\"sparsities\": [0.5]}}}}' (double quotes inside, single "
            f"quotes around it in a shell)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag} holds a JSON {_type_name(raw)}, not an object of config sections: pass e.g. "
                          f"'{{\"masks\": {{\"sparsities\": [0.5]}}}}'")
    return raw


def _type_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)


# --- the schema ----------------------------------------------------------------------------
@functools.cache
def core_schema() -> dict[str, Any]:
    return load_yaml_strict(SCHEMA_PATH)


def _section_schema(name: str, schema: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A section's schema: given as YAML text or a mapping (with `properties`), or from the core file."""
    if schema is None:
        return core_schema()["properties"][name]
    parsed = yaml.load(schema, Loader=StrictLoader) if isinstance(schema, str) else copy.deepcopy(dict(schema))
    if not isinstance(parsed, dict) or "properties" not in parsed:
        raise TypeError(f"the schema of config section {name!r} must be a mapping with 'properties'")
    return {"type": "object", "additionalProperties": False, "default": {}, **parsed}


def config_schema(*, require_tasks: bool = True) -> dict[str, Any]:
    """The whole config's JSON schema: phase 1's sections plus every registered phase's section.

    Args:
        require_tasks: the workflow needs at least one task; the Python API may parse
            configs that only hold some sections (`require_tasks=False`).
    """
    schema = copy.deepcopy(core_schema())
    for section, phase in registered_phases().items():
        schema["properties"][section] = copy.deepcopy(phase.options.__config_schema__)
    tasks = schema["properties"]["tasks"]
    tasks["propertyNames"]["not"]["enum"] = sorted(reserved_task_names())
    if not require_tasks:
        schema["required"] = [key for key in schema.get("required", []) if key != "tasks"]
        tasks.pop("minProperties", None)
        tasks["default"] = {}
    return schema


@functools.cache
def _filling_validator_class() -> type:
    """A Draft 2020-12 validator that also fills `default`s in, the way Snakemake's `validate` does."""
    from jsonschema import Draft202012Validator, validators

    check_properties = Draft202012Validator.VALIDATORS["properties"]

    def properties(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": properties})


def validate_config(raw: Mapping[str, Any], *, require_tasks: bool = True,
                    command_line: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a workflow config against `config_schema()`; return a copy with defaults filled in.

    Strings are first read as the type the schema wants where they can be: `"1e-5"` (which
    YAML reads as text) for a number, `"16"` for an integer, `"[0.3]"` for a list.

    Args:
        raw: the config mapping (from YAML, JSON or Snakemake).
        require_tasks: refuse a config without tasks (the workflow's case).
        command_line: the values given with Snakemake's `--config`, whose nested values
            Snakemake reads as text (YAML's BaseLoader): there `null` and `~` also mean null.

    Raises:
        ConfigError: naming every offending key path, its value and what is allowed.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections (model, tasks, fisher, ...), got a "
                          f"{_type_name(raw)}")
    schema = config_schema(require_tasks=require_tasks)
    instance = _coerce(_plain(raw), schema, _plain(command_line) if command_line else None)
    errors = list(_filling_validator_class()(schema).iter_errors(instance))
    if errors:
        raise ConfigError(_messages(errors, schema))
    return instance


# --- reading text as the type the schema wants -----------------------------------------------
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _types(schema: Mapping[str, Any]) -> list[str]:
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else list(types)


def _coerce(value: Any, schema: Mapping[str, Any], text: Any = None) -> Any:
    """`value` with strings read as the schema's type where unambiguous (see `validate_config`).

    `text` mirrors `value` where it came from Snakemake's `--config` (leaves are then text).
    """
    types = _types(schema)
    if isinstance(value, str) and ("string" not in types or (text is not None and "null" in types)):
        value = _from_text(value, types, from_command_line=text is not None)
    if value is None and types == ["object"]:
        return {}  # an empty section (`masks:` with nothing under it)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, Mapping) else {}
        return {key: _coerce(item, properties.get(key, extra), _child(text, key)) for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_coerce(item, items, True if text is not None else None) for item in value]
    return value


def _child(text: Any, key: str) -> Any:
    if isinstance(text, dict):
        return text.get(key)
    return text


def _from_text(value: str, types: list[str], *, from_command_line: bool) -> Any:
    stripped = value.strip()
    if "integer" in types and _INTEGER.fullmatch(stripped):
        return int(stripped)
    if "number" in types and _NUMBER.fullmatch(stripped):
        number = float(stripped)
        return int(number) if _INTEGER.fullmatch(stripped) else number
    if "boolean" in types and stripped.lower() in _BOOLEANS:
        return _BOOLEANS[stripped.lower()]
    if "null" in types and (stripped in ("null", "Null", "NULL", "~") or (from_command_line and not stripped)):
        return None
    if ("array" in types and stripped.startswith("[")) or ("object" in types and stripped.startswith("{")):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return value
    return value


def _plain(value: Any) -> Any:
    """A deep copy with mappings as dicts and tuples as lists (what JSON schema checks)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --- error messages --------------------------------------------------------------------------
_TYPE_WORDS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string",
               "object": "a mapping", "null": "null", "array": "a list"}


def _location(prefix: str, parts) -> str:
    where = prefix
    for part in parts:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return where


def _messages(errors: list, schema: Mapping[str, Any] | None = None, prefix: str = "") -> str:
    """One line naming every error (at most five), in key order."""
    errors = sorted(errors, key=lambda e: ([str(p) for p in e.absolute_path], e.validator))
    lines = list(dict.fromkeys(_message(error, schema, prefix) for error in errors))
    more = f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
    return "; ".join(lines[:5]) + more


def _message(error, root: Mapping[str, Any] | None, prefix: str) -> str:
    parts = [*(prefix.split(".") if prefix else []), *error.absolute_path]
    where = _location("", parts)
    kind, value, schema = error.validator, error.instance, error.schema
    if "propertyNames" in error.absolute_schema_path:
        name = value
        if kind == "not":
            reason = error.validator_value.get("description", "reserved")
            return f"{where or 'config'}: the name {name!r} is reserved ({reason}); choose another name"
        return f"{where or 'config'}: the name {name!r} is not allowed: use only {schema.get('description', kind)}"
    if kind == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        extra = sorted(set(value) - set(known))
        if not where:
            return f"unknown top-level config key(s) {', '.join(extra)}; valid: {', '.join(known)}"
        return (f"unknown config key(s) {', '.join(f'{where}.{key}' for key in extra)}; "
                f"valid keys of '{where}': {', '.join(known)}")
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        if not where and missing == ["tasks"]:
            return "the config has no 'tasks': add at least one, e.g. tasks: {prose: {source: 'builtin:prose'}}"
        described = [(key, _label(schema.get("properties", {}).get(key, {}))) for key in missing]
        return "; ".join(f"{_location(where, [key])} is missing" + (f" ({text})" if text else "")
                         for key, text in described)
    if kind == "minProperties" and parts == ["tasks"]:
        return "the config has no tasks: add at least one under 'tasks:', e.g. prose: {source: 'builtin:prose'}"
    shown = f"{where} = {value!r}"
    if kind == "enum":
        return f"{shown}: choose one of {', '.join(map(str, error.validator_value))}"
    if kind == "type":
        quoted = isinstance(value, str) and {"number", "integer"} & set(_types(schema))
        return f"{shown}: must be {_describe(schema)}{_hint(root, parts, bool(quoted))}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"{shown}: must be {bounds[kind]} {error.validator_value}"
    if kind == "minItems":
        described = f" ({_label(schema)})" if _label(schema) else ""
        return f"{shown}: must hold at least {error.validator_value} item(s){described}"
    if kind == "uniqueItems":
        return f"{shown}: holds the same item twice"
    return f"{shown}: {error.message}"


def _label(schema: Mapping[str, Any]) -> str | None:
    """What a key is, in a few words for a message: its `title` (its `description` is the
    documentation, config/README.md, too long for one line)."""
    return schema.get("title")


def _describe(schema: Mapping[str, Any]) -> str:
    words = []
    for kind in _types(schema):
        item = schema.get("items", {}).get("type") if kind == "array" else None
        words.append(f"a list of {item}s" if isinstance(item, str) else _TYPE_WORDS.get(kind, kind))
    return " or ".join(words)


def _hint(root: Mapping[str, Any] | None, parts: list, quoted: bool) -> str:
    """How to write a value of the key at `parts`: in YAML, and with Snakemake's --config."""
    keys = []
    for part in parts:
        if isinstance(part, int):
            break
        keys.append(part)
    schema = _subschema(root, keys) if root is not None and len(keys) >= 2 else None
    if schema is None:
        return ""
    example = (schema.get("examples") or [schema.get("default")])[0]
    if example is None:
        return ""
    flow = yaml_flow(example)
    nested = flow
    for key in reversed(keys[1:]):
        nested = f"{{{key}: {nested}}}"
    return (f" (in YAML: {keys[-1]}: {flow}; on the Snakemake command line: --config {keys[0]}='{nested}'"
            f"{'; write numbers without quotes' if quoted else ''})")


def _subschema(root: Mapping[str, Any], keys: list[str]) -> Mapping[str, Any] | None:
    schema = root
    for key in keys:
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        schema = properties.get(key, extra if isinstance(extra, Mapping) else None)
        if schema is None:
            return None
    return schema


def yaml_flow(value: Any) -> str:
    """`value` in YAML flow style, numbers as YAML reads them as numbers (1.0e-05, not 1e-05):
    the examples of messages and the defaults of config/README.md."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_flow(item) for item in value) + "]"
    if value is None:
        return "null"
    return str(value)


# --- dataclasses checked against their section -------------------------------------------------
def _check_fields(obj: Any, where: str, schema: Mapping[str, Any]) -> None:
    """Refuse field values of `obj` that its section of the schema (or finiteness) refuses."""
    properties = schema.get("properties", {})
    values = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name in properties}
    validator = _validator(schema)
    errors = list(validator.iter_errors(values))
    if errors:
        section, _, task = where.partition(".")
        root = {"properties": {section: {"additionalProperties": schema} if task else schema}}
        raise ConfigError(_messages(errors, root, prefix=where))
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where}.{key} = {value!r}: must hold finite numbers (not nan or inf)")


@functools.cache
def _validator(schema: Mapping[str, Any]):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema)


def schema_checked(where: Callable[[Any], str], schema: Callable[[], Mapping[str, Any]]):
    """Make `cls` a frozen dataclass whose fields are checked against `schema()` when built."""

    def decorate(cls: type) -> type:
        own_post_init = cls.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            _check_fields(self, where(self), schema())
            if own_post_init is not None:
                own_post_init(self)

        __post_init__.__doc__ = own_post_init.__doc__ if own_post_init else None
        cls.__post_init__ = __post_init__
        return dataclass(frozen=True)(cls)

    return decorate


class _HashableSchema(dict):
    """A schema dict usable as a cache key (by identity: schemas are never mutated once built)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


@dataclass_transform(frozen_default=True)
def config_section(name: str, schema: str | Mapping[str, Any] | None = None) -> Callable[[type], type]:
    """Class decorator: `cls` becomes the frozen options dataclass of config section `name`.

    Args:
        name: the section's top-level key in the workflow config (e.g. "masks").
        schema: the section's JSON schema as YAML text (or a mapping) with `properties`:
            each key's type, bounds, choices and `default` (equal to the field's default;
            a test checks). `type: object`, `additionalProperties: false` and `default: {}`
            are implied. None: the section is in `schemas/config.schema.yaml`.

    Every instance is checked against the schema when built (a `ConfigError` names the
    key); the class's own `__post_init__` runs afterwards, for checks a schema cannot say.
    """
    section = _HashableSchema(_section_schema(name, schema))

    def decorate(cls: type) -> type:
        cls = schema_checked(lambda _: name, lambda: section)(cls)
        cls.__config_section__ = name
        cls.__config_schema__ = section
        return cls

    return decorate


def _task_schema() -> Mapping[str, Any]:
    return _HashableSchema(core_schema()["properties"]["tasks"]["additionalProperties"])


TASK_SCHEMA = _task_schema()
