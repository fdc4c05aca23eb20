"""The store format's constants: version, dtypes, loss convention."""

from __future__ import annotations

import numpy as np

#: 2: head geometry in the attrs (`geometry`), `group_labels/` and group attrs gone.
#: 3: per-sample gates (`gate/`), group saliencies and input second moments (`input_sq/`).
#: 4: `integrity.json`, the size and CRC-32 of every file (`store.integrity`).
FORMAT_VERSION = 4


#: Versions the reader opens: a version 2 store lacks only the arrays version 3 added,
#: and their readers say so; versions 2 and 3 have no integrity record (a warning).
READABLE_VERSIONS = (2, 3, 4)

#: The first version whose stores carry `integrity.json`.
RECORDED_VERSION = 4


#: dtype of the stored per-sample gates: sums of float32 products, float32 keeps all of
#: their precision at half float64's disk and bandwidth.
GATE_DTYPE = np.dtype("float32")


LOSS_CONVENTION = "token_sum"
