"""The planner's config section (`plan`): whether a run checks that phase 1 fits the machine.

Not an analysis phase: it declares a section and no subcommand (`python -m fisher_pipeline
plan` is the package's own, `fisher_pipeline.planner` holds the arithmetic).
"""

from __future__ import annotations

from ...config_schema import config_section
from ...phase_registry import register_phase


@config_section("plan", """
description: the resource planner (PlanOptions); `python -m fisher_pipeline plan` prints the plan
properties:
  check:
    type: boolean
    default: true
    description: >-
      Before the first job of a run (not in a dry run: `python -m fisher_pipeline plan` shows the same), compare
      the planner's host memory (and, with `fisher.device` cuda or auto on a machine with a GPU, device memory)
      of every phase 1 job with this machine, and stop the run when one does not fit, printing the plan and the
      settings that would fit (`model.dtype: bfloat16`, a smaller `fisher.batch_size`, `fisher.state_device:
      cpu`, more `fisher.param_shards`). Checked only where jobs run on this machine (not with a cluster
      executor, whose jobs get the plan's `mem_mb`). `false` runs anyway: for a plan you know to be pessimistic
      (docs/scaling.md).
  host_memory_mb:
    type: [integer, "null"]
    minimum: 1
    default: null
    description: >-
      Host memory the check compares with, in MB (10^6 bytes). `null`: this machine's, the smaller of
      /proc/meminfo's total and the memory limit of the process's cgroup (a container's).
  device_memory_mb:
    type: [integer, "null"]
    minimum: 1
    default: null
    description: >-
      GPU memory the check compares with when the model runs on a GPU, in MB. `null`: the first CUDA device's.
""")
class PlanOptions:
    """Settings of the resource planner."""

    check: bool = True  # stop a run whose phase 1 jobs do not fit this machine's memory
    host_memory_mb: int | None = None  # host memory to check against, MB; None: this machine's
    device_memory_mb: int | None = None  # GPU memory to check against, MB; None: the first CUDA device's


register_phase(PlanOptions)
