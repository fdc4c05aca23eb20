"""The analysis phases, each declared once by its own package.

A phase is a subpackage of `fisher_pipeline.phases` whose `__init__.py` declares it and
nothing heavier: its options dataclass (with `fisher_pipeline.config_schema.config_section`,
which carries the config section's name and schema) and one call::

    register_phase(MaskOptions, PhaseCommand("masks", f"{__name__}.compute:run_masks",
                                             "phase 3: pruning masks of one task", ...))

The run function is named as `"module:function"` and imported only when the command runs,
so that reading and checking a config never imports torch, scipy or matplotlib (a config
mistake is reported in well under a second). Everything else reads the registry: the
`python -m fisher_pipeline` subcommands (`phases/cli.py`), the sections
`PipelineConfig.from_dict` parses, the assembled config schema (`config_schema()`) and the
task names cross-task outputs reserve. Every subpackage of `fisher_pipeline.phases` is
imported on first use, so a new phase registers itself without an edit anywhere else in the
package; so are the modules another installed package names as entry points of group
`fisher_pipeline.phases`. docs/adding_a_phase.md walks through adding a phase.

This module imports nothing of the package: the config and the phases sit above it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

#: Sections of phase 1; every other section belongs to a registered analysis phase.
CORE_SECTIONS = ("model", "tasks", "fisher")


@dataclass(frozen=True)
class ExtraInput:
    """A further input flag of a cross-task command (besides its `input_flag`)."""

    flag: str  # e.g. "--heldout-stores"
    help: str  # what one value is
    keyed: bool = True  # TASK=PATH pairs (a dict), or plain paths (a list)
    required: bool = True

    @property
    def dest(self) -> str:
        """The keyword `run` gets: the flag without dashes, `-` -> `_`."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class PhaseCommand:
    """One subcommand of `python -m fisher_pipeline` that runs a phase and prints what it wrote.

    `run` is called as `run(input, out_dir, options, task=task)` for a per-task command and
    as `run({task: input, ...}, out_dir, options)` for a cross-task one, and returns
    {name: path} of the files it wrote.
    """

    name: str  # the subcommand, e.g. "masks" (a rule's shell command calls it)
    #: the phase's run function (see above), or where it lives as "module:function", imported
    #: when the command runs (keeps config checks free of the phase's numerics)
    run: Callable[..., Mapping[str, Any]] | str
    help: str  # one line for --help
    per_task: bool = True  # one job per task, or one job across all tasks (inputs as TASK=PATH pairs)
    input_flag: str = ""  # the flag naming the input(s); default "--store" per task, "--stores" across tasks
    input_help: str = "phase 1 store, e.g. results/fisher/prose.zarr"  # what one input is
    out_example: str = ""  # e.g. "results/masks/{task}", for --help
    reserves: str | None = None  # output directory named like a task (e.g. "rank_agreement"): no task may take it
    #: other config sections the command reads too (phase 1's `model` and `tasks`, or another
    #: phase's settings, e.g. the held-out checks read `conflicts` and `qkov`); `run` then gets
    #: `pipeline=PipelineConfig`
    context: tuple[str, ...] = ()
    #: further inputs of a cross-task command, each `--flag VALUE ...` passed to `run` as the
    #: keyword named like the flag (`--heldout-stores` -> `heldout_stores`): TASK=PATH pairs
    #: (a dict) where `ExtraInput.keyed`, else a list of paths
    extra_inputs: tuple[ExtraInput, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.run, str) and not re.fullmatch(r"[\w.]+:\w+", self.run):
            raise ValueError(f"PhaseCommand {self.name!r}: run = {self.run!r} must be a function or "
                             "'package.module:function'")
        if not self.input_flag:
            object.__setattr__(self, "input_flag", "--store" if self.per_task else "--stores")
        if not self.input_flag.startswith("--"):
            raise ValueError(f"PhaseCommand {self.name!r}: input_flag must be a long option such as '--store'")
        if self.per_task and self.extra_inputs:
            raise ValueError(f"PhaseCommand {self.name!r}: only a cross-task command takes extra inputs")
        if self.per_task and self.reserves:
            raise ValueError(f"PhaseCommand {self.name!r}: only a cross-task command reserves a task name")

    def load(self) -> Callable[..., Mapping[str, Any]]:
        """The run function, imported from its module if `run` names it."""
        if callable(self.run):
            return self.run
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Phase:
    """A registered phase: its config section, options dataclass and subcommands."""

    section: str  # top-level config key (from the options' @config_section)
    options: type  # the options dataclass; `options.__config_schema__` is the section's schema
    commands: tuple[PhaseCommand, ...]


_PHASES: dict[str, Phase] = {}


def register_phase(options: type, *commands: PhaseCommand) -> Phase:
    """Register (or extend) the phase whose options dataclass is `options`, with its subcommands.

    Call it once at the end of the phase's module. Several modules may register commands
    of one section (phase 2's `importance` and `rank-agreement` share `ImportanceOptions`).
    Registering a command of the same name again replaces it (a module imported twice).

    Raises:
        TypeError: `options` is not declared with `@config_section(...)`.
        ValueError: the section is phase 1's or is taken by other options, or a
            subcommand name is taken by another section.
    """
    section = getattr(options, "__config_section__", None)
    if section is None or not hasattr(options, "__config_schema__"):
        raise TypeError(f"{options!r} is not declared with @config_section(name, schema) "
                        "(fisher_pipeline.config_schema)")
    if section in CORE_SECTIONS:
        raise ValueError(f"config section {section!r} belongs to phase 1; choose another section name")
    current = _PHASES.get(section)
    if current is not None and _qualname(current.options) != _qualname(options):
        raise ValueError(f"config section {section!r} is already registered with {_qualname(current.options)}")
    for other in _PHASES.values():
        taken = {c.name for c in other.commands} & {c.name for c in commands}
        if other.section != section and taken:
            raise ValueError(f"subcommand(s) {sorted(taken)} already registered by section {other.section!r}")
    mine = {c.name: c for c in (current.commands if current else ())}
    mine.update({c.name: c for c in commands})
    _PHASES[section] = phase = Phase(section, options, tuple(mine.values()))
    return phase


def unregister_phase(section: str) -> None:
    """Forget a registered section (for tests that register a toy phase)."""
    _PHASES.pop(section, None)


def registered_phases() -> dict[str, Phase]:
    """Section -> phase, for every phase module of the package (imported on first use)."""
    _discover()
    return dict(_PHASES)


def phase_commands() -> list[tuple[Phase, PhaseCommand]]:
    """Every registered subcommand with its phase, in registration order."""
    return [(phase, command) for phase in registered_phases().values() for command in phase.commands]


def reserved_task_names() -> set[str]:
    """Names no task may take: cross-task outputs sit where a task's output of that name would."""
    return {command.reserves for _, command in phase_commands() if command.reserves}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: The package whose subpackages are the phases (imported on first use: this module imports none of them).
PHASES_PACKAGE = "fisher_pipeline.phases"
#: Entry-point group through which another installed package adds phases (its modules register themselves).
ENTRY_POINT_GROUP = "fisher_pipeline.phases"


def _discover() -> None:
    """Import every subpackage of `fisher_pipeline.phases` and the modules of the entry points
    of group `fisher_pipeline.phases` (each registers itself)."""
    package = importlib.import_module(PHASES_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            importlib.import_module(f"{PHASES_PACKAGE}.{module.name}")
    for entry_point in _entry_points(tuple(sys.path)):
        importlib.import_module(entry_point.module)


@functools.cache
def _entry_points(_path: tuple[str, ...]) -> tuple:
    return tuple(metadata.entry_points(group=ENTRY_POINT_GROUP))
