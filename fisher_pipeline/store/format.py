"""The store format's constants: version, dtypes, loss convention, where a store is staged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: 2: head geometry in the attrs (`geometry`), `group_labels/` and group attrs gone.
#: 3: per-sample gates (`gate/`), group saliencies and input second moments (`input_sq/`).
FORMAT_VERSION = 3


#: Versions the reader opens: a version 2 store lacks only the arrays version 3 added,
#: and their readers say so.
READABLE_VERSIONS = (2, 3)


#: dtype of the stored per-sample gates: sums of float32 products, float32 keeps all of
#: their precision at half float64's disk and bandwidth.
GATE_DTYPE = np.dtype("float32")


LOSS_CONVENTION = "token_sum"


def partial_path(path: str | os.PathLike) -> Path:
    """Where a store is written before it is complete (then published by `atomic.publish`)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")
