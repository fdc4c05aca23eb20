"""Subcommands of `python -m fisher_pipeline` for the analysis phases, made from the registry.

Each registered `PhaseCommand` becomes a subcommand that reads its phase's config section,
parses it strictly into the phase's options dataclass, calls the phase's run function and
prints the files written. The workflow passes only the section a rule depends on, as JSON
(`--config-json '{"masks": {...}}'`), so that editing another section never reruns it;
from a shell, `--config config/config.yaml` reads the same section from a YAML file.

Inputs of a cross-task command are given as `TASK=PATH` pairs, in the order outputs list them.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from ..errors import ConfigError
from ..phase_registry import Phase, PhaseCommand, phase_commands


def add_phase_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add every registered phase subcommand to the `python -m fisher_pipeline` parser's `subparsers`."""
    for phase, command in phase_commands():
        parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        _add_section_args(parser, phase.section, command.context)
        out = f", e.g. {command.out_example}" if command.out_example else ""
        if command.per_task:
            parser.add_argument(command.input_flag, dest="input", required=True,
                                help=f"the task's {command.input_help}")
            parser.add_argument("--task", help="task name written into the outputs (default: the input's task)")
        else:
            parser.add_argument(command.input_flag, dest="inputs", required=True, nargs="+", metavar="TASK=PATH",
                                help=f"each task's {command.input_help}, in output order")
            for extra in command.extra_inputs:
                parser.add_argument(extra.flag, dest=extra.dest, required=extra.required, nargs="+",
                                    metavar="TASK=PATH" if extra.keyed else "PATH",
                                    help=f"each task's {extra.help}" if extra.keyed else extra.help)
        parser.add_argument("--out", required=True, help=f"output directory (replaced atomically){out}")
        parser.set_defaults(func=functools.partial(_run, phase, command))


def _add_section_args(parser: argparse.ArgumentParser, section: str, context: tuple[str, ...] = ()) -> None:
    sections = " and ".join(f"'{s}'" for s in (section, *context))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help=f"workflow config YAML; its {sections} section(s) are used")
    source.add_argument("--config-json",
                        help=f"JSON object holding the {sections} section(s), e.g. '{{\"{section}\": {{}}}}'")


def _pipeline(args: argparse.Namespace, section: str, command: str, context: tuple[str, ...]) -> Any:
    """`section` and the phase 1 sections in `context` from `--config` or `--config-json`, as a
    `PipelineConfig` (strictly parsed; defaults fill gaps)."""
    from ..config import PipelineConfig, parse_config_json, read_config_file

    allowed = {section, *context}
    if args.config_json is not None:
        raw = parse_config_json(args.config_json)
        if set(raw) - allowed:
            keys = " and ".join(f"'{k}'" for k in (section, *context))
            raise ConfigError(
                f"--config-json of `{command}` must be a JSON object with only the key{'s' if context else ''} {keys} "
                f"(got keys {', '.join(sorted(raw))}): pass e.g. '{{\"{section}\": {{}}}}'"
            )
    else:
        whole = read_config_file(args.config)
        raw = {key: whole.get(key) or {} for key in allowed if key in whole or key == section}
    return PipelineConfig.from_dict(raw)


def _task_paths(values: list[str], flag: str) -> dict[str, str]:
    """`["a=x.zarr", "b=y.zarr"]` -> `{"a": "x.zarr", "b": "y.zarr"}`, refusing malformed or repeated tasks."""
    pairs: dict[str, str] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise ConfigError(f"{flag} takes TASK=PATH pairs, got {value!r}: write e.g. {flag} code=results/x "
                              f"prose=results/y")
        if task in pairs:
            raise ConfigError(f"{flag} names task {task!r} twice")
        pairs[task] = path
    return pairs


def _run(phase: Phase, command: PhaseCommand, args: argparse.Namespace) -> None:
    pipeline = _pipeline(args, phase.section, command.name, command.context)
    options = getattr(pipeline, phase.section)
    extra = {"pipeline": pipeline} if command.context else {}
    if command.per_task:
        written = command.load()(args.input, args.out, options, task=args.task, **extra)
    else:
        for more in command.extra_inputs:
            values = getattr(args, more.dest)
            extra[more.dest] = _task_paths(values, more.flag) if more.keyed and values is not None else values
        written = command.load()(_task_paths(args.inputs, command.input_flag), args.out, options, **extra)
    for key, path in written.items():
        print(f"{key}\t{path}")
