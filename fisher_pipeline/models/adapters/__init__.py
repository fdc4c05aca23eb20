"""Architecture adapters, looked up by `config.model_type`."""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedArchitectureError
from ...layout import GroupSpec, TensorSlice
from .base import ArchitectureAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter
from .phi3 import Phi3Adapter

ADAPTERS: tuple[type[ArchitectureAdapter], ...] = (LlamaAdapter, GPT2Adapter, GPTNeoXAdapter, Phi3Adapter)

__all__ = [
    "ADAPTERS", "ArchitectureAdapter", "GroupSpec", "TensorSlice", "adapter_for", "supported_model_types",
]


def supported_model_types() -> list[str]:
    """Every `model_type` some adapter handles."""
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of `model`'s architecture; a clear error if there is none."""
    # A bare nn.Module has no config; it is unsupported, not an AttributeError.
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise UnsupportedArchitectureError(
        f"no architecture adapter for model_type {model_type!r} "
        f"({type(model).__name__}); supported model types: {', '.join(supported_model_types())} "
        f"(families: {'; '.join(adapter.family for adapter in ADAPTERS)}). "
        "Head slices and neuron groups need an adapter: see README 'Supported architectures'."
    )
