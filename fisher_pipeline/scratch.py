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

    def view(self, *shape: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """An uninitialised float32 tensor of `shape` (on `like`'s device, default CPU)."""
        device = like.device if like is not None else torch.device("cpu")
        numel = math.prod(shape)
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.device != device:
            self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self._buffer[:numel].view(shape)
