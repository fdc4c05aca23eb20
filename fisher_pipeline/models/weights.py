"""The weights of the model a phase 1 store was made from, for the criteria that need them."""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import StoreMismatchError
from ..store import FisherStore
from .loading import load_model, model_source, weights_hash


def load_weights(config: ModelConfig, store: FisherStore) -> dict[str, np.ndarray]:
    """Parameter name -> float32 value of the model at `config.path` (tied weights once).

    Raises:
        StoreMismatchError: the model's weights are not the ones `store` was computed from.
        ModelLoadError: the model cannot be loaded.
    """
    expected = store.attrs.get("weights_hash")
    found = weights_hash(model_source(config)[0])
    if expected is not None and found != expected:
        raise StoreMismatchError(
            f"model {config.path} (weights {found}) is not the model store {store.path} was made from (weights "
            f"{expected}): point model.path at that model, or rerun phase 1 with this one"
        )
    model = load_model(config).model
    return {name: param.detach().numpy() for name, param in model.named_parameters()}
