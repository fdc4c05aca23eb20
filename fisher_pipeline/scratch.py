"""A reusable flat buffer handing out views, to avoid re-allocating large temporaries."""

from __future__ import annotations

import math

import torch


class Scratch:
    """Grows once to the largest size asked for, then hands out views of it.

    A view is valid until the next `view` call on the same `Scratch`.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def view(self, *shape: int, like: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised tensor of `shape` with `like`'s device and dtype (default float32, CPU;
        `dtype` overrides `like`'s)."""
        device = like.device if like is not None else torch.device("cpu")
        dtype = dtype or (like.dtype if like is not None else torch.float32)
        numel = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < numel or buffer.device != device or buffer.dtype != dtype:
            self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return self._buffer[:numel].view(shape)
