"""Subcommands of `python -m fisher_pipeline` for analysis phases 2, 3, 4 and 7.

Each subcommand reads its phase's config section, parses it strictly into the phase's
options dataclass, calls the phase's `run_*` function and prints the files written.
The workflow passes only the section a rule depends on, as JSON
(`--config-json '{"masks": {...}}'`), so that editing another section never reruns it;
from a shell, `--config config/config.yaml` reads the same section from a YAML file.

Stores of several tasks are given as `TASK=PATH` pairs, in the order outputs list them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_SECTION_OF = {
    "importance": "importance",
    "rank-agreement": "importance",
    "masks": "masks",
    "overlap": "overlap",
    "scaled": "scaled",
    "scaled-cross": "scaled",
}


def add_phase_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the analysis subcommands to the `python -m fisher_pipeline` parser's `subparsers`."""
    _per_task(subparsers, "importance", _cmd_importance,
              "phase 2: Fisher importance tables and layer x head heatmaps of one task",
              "results/importance/{task}")
    _cross_task(subparsers, "rank-agreement", _cmd_rank_agreement, "--stores",
                "phase 2 across tasks: Spearman rank agreement of importance between tasks",
                "results/importance/rank_agreement")
    _per_task(subparsers, "masks", _cmd_masks,
              "phase 3: pruning masks of one task for every configured sparsity", "results/masks/{task}")
    _cross_task(subparsers, "overlap", _cmd_overlap, "--masks",
                "phase 4: overlap of the tasks' masks, with hypergeometric expectations and p-values",
                "results/overlap")
    _per_task(subparsers, "scaled", _cmd_scaled,
              "phase 7: mean and natural-gradient norms of one task", "results/scaled/{task}")
    _cross_task(subparsers, "scaled-cross", _cmd_scaled_cross, "--stores",
                "phase 7 across tasks: natural-gradient cosines and EWC costs", "results/scaled/cross_task")


def _per_task(subparsers, name: str, func: Callable, help_text: str, out_example: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    _add_section_args(parser, name)
    parser.add_argument("--store", required=True, help="the task's phase 1 store, e.g. results/fisher/prose.zarr")
    parser.add_argument("--task", help="task name written into the outputs (default: the store's task)")
    parser.add_argument("--out", required=True, help=f"output directory (replaced atomically), e.g. {out_example}")
    parser.set_defaults(func=func)


def _cross_task(subparsers, name: str, func: Callable, inputs_flag: str, help_text: str, out_example: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    _add_section_args(parser, name)
    what = "masks.zarr written by phase 3" if inputs_flag == "--masks" else "phase 1 store"
    parser.add_argument(inputs_flag, dest="inputs", required=True, nargs="+", metavar="TASK=PATH",
                        help=f"each task's {what}, in output order")
    parser.add_argument("--out", required=True, help=f"output directory (replaced atomically), e.g. {out_example}")
    parser.set_defaults(func=func)


def _add_section_args(parser: argparse.ArgumentParser, command: str) -> None:
    section = _SECTION_OF[command]
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help=f"workflow config YAML; its '{section}' section is used")
    source.add_argument("--config-json",
                        help=f"JSON object holding the '{section}' section, e.g. '{{\"{section}\": {{}}}}'")


def _options(args: argparse.Namespace) -> Any:
    """The options dataclass of the command's section (strictly parsed; defaults fill gaps)."""
    from ..config import PipelineConfig

    section = _SECTION_OF[args.command]
    if args.config_json is not None:
        try:
            raw = json.loads(args.config_json)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config-json is not valid JSON ({err})") from None
        if not isinstance(raw, dict) or set(raw) - {section}:
            raise ConfigError(
                f"--config-json of `{args.command}` must be a JSON object with only the key '{section}', "
                f"got {args.config_json!r}"
            )
    else:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {args.config} does not hold a mapping of sections")
        raw = {section: raw.get(section) or {}}
    return getattr(PipelineConfig.from_dict(raw), section)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    """`["a=x.zarr", "b=y.zarr"]` -> `{"a": "x.zarr", "b": "y.zarr"}`, refusing malformed or repeated tasks."""
    pairs: dict[str, str] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise ConfigError(f"{flag} takes TASK=PATH pairs, got {value!r}")
        if task in pairs:
            raise ConfigError(f"{flag} names task {task!r} twice")
        pairs[task] = path
    return pairs


def _report(paths: dict[str, Path]) -> None:
    for key, path in paths.items():
        print(f"{key}\t{path}")


def _cmd_importance(args: argparse.Namespace) -> None:
    from .importance import run_importance

    _report(run_importance(args.store, args.out, _options(args), task=args.task))


def _cmd_rank_agreement(args: argparse.Namespace) -> None:
    from .agreement import run_rank_agreement

    _report(run_rank_agreement(_pairs(args.inputs, "--stores"), args.out, _options(args)))


def _cmd_masks(args: argparse.Namespace) -> None:
    from .masks import run_masks

    _report(run_masks(args.store, args.out, _options(args), task=args.task))


def _cmd_overlap(args: argparse.Namespace) -> None:
    from .overlap import run_overlap

    _report(run_overlap(_pairs(args.inputs, "--masks"), args.out, _options(args)))


def _cmd_scaled(args: argparse.Namespace) -> None:
    from .scaled import run_scaled_task

    _report(run_scaled_task(args.store, args.out, _options(args), task=args.task))


def _cmd_scaled_cross(args: argparse.Namespace) -> None:
    from .scaled import run_scaled_cross

    _report(run_scaled_cross(_pairs(args.inputs, "--stores"), args.out, _options(args)))
