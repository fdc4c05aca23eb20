"""One workflow run at a time in a folder.

Snakemake marks the outputs of running jobs incomplete; a second `snakemake` started in the
same folder meanwhile stops on those marks with the advice to `--rerun-incomplete`, which
would redo the first run's running jobs. The workflow therefore claims the folder
(`atomic.Claim` on `.snakemake/fisher_pipeline_run`) when a run starts (`hold`, from the
Snakefile's `onstart`, which dry runs skip), and every later invocation in the folder
checks the claim as soon as the Snakefile is read (`check`), before Snakemake's own
checks. The kernel drops the claim when the run's process ends, however it ends.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import Claim, claim_holder
from .errors import OutputBusyError

#: The claimed name, relative to the workflow's working folder.
RUN_CLAIM = Path(".snakemake", "fisher_pipeline_run")

_held: Claim | None = None


def _message(folder: Path, holder: str) -> str:
    return (f"another snakemake run is working in {folder} ({holder}). Wait for it to finish, or stop it "
            "(Ctrl-C, or `kill` its pid) and then start again: until it ends its running jobs' outputs are "
            "incomplete, and `--rerun-incomplete` would redo them. Runs of other configs need another folder "
            "(`snakemake --directory`) or other output paths")


def check(folder: str | os.PathLike = ".") -> None:
    """Raise `OutputBusyError` if a workflow run holds `folder` (another process, never this one)."""
    global _held
    if _held is not None:
        return
    holder = claim_holder(Path(folder) / RUN_CLAIM)
    if holder is not None:
        raise OutputBusyError(_message(Path(folder).resolve(), holder))


def hold(folder: str | os.PathLike = ".") -> None:
    """Claim `folder` for this process's run, until the process ends (`OutputBusyError` if taken)."""
    global _held
    if _held is None:
        try:
            _held = Claim(Path(folder) / RUN_CLAIM)
        except OutputBusyError:
            raise OutputBusyError(_message(Path(folder).resolve(), claim_holder(Path(folder) / RUN_CLAIM)
                                           or "a process that has just ended")) from None
