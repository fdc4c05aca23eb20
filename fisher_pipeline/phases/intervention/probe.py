"""The model on each task's held-out samples: a step is applied, measured and undone, bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

#: A change counts as measured (`resolved`) when the first-order prediction exceeds this many
#: times the task's rounding floor (`HeldoutProbe.rounding`).
RESOLUTION = 30.0


class HeldoutProbe:
    """The model, each task's held-out samples and their dense losses; steps are measured and undone.

    `measure(task, changes)` adds `changes` (parameter name -> float32 array of its shape) to
    the parameters, scores `task`'s held-out samples, and puts the saved parameters back
    bit for bit before returning the mean change of the per-sample token-sum loss.
    """

    def __init__(self, model, samples: Mapping[str, list], pad_id: int, batch_size: int):
        import torch

        from ...evaluation import heldout_losses

        self.model, self.samples, self.pad_id, self.batch_size = model, samples, pad_id, batch_size
        self.params = dict(model.named_parameters())
        self._losses = heldout_losses
        self._torch = torch
        self.dense = {task: heldout_losses(model, batch, pad_id, batch_size)[0].numpy()
                      for task, batch in samples.items()}
        self.rounding = {task: self._rounding(task) for task in samples}

    def _rounding(self, task: str, draws: int = 1) -> float:
        """The float rounding in a measured change: the largest |change| under random steps of
        relative size 1e-7 of every weight matrix, whose true effect is far below it."""
        rng = np.random.default_rng(0)
        floor = 0.0
        for _ in range(draws):
            changes = {name: (1e-7 * p.detach().cpu().numpy() * rng.standard_normal(tuple(p.shape))).astype(np.float32)
                       for name, p in self.params.items() if p.ndim == 2}
            floor = max(floor, abs(self.measure(task, changes)))
        return floor

    @contextmanager
    def stepped(self, changes: Mapping[str, np.ndarray]):
        """Parameters + changes inside the block; the saved originals put back on leaving."""
        torch = self._torch
        saved = {}
        try:
            with torch.no_grad():
                for name, change in changes.items():
                    param = self.params[name]
                    saved[name] = param.detach().clone()
                    change = change if isinstance(change, torch.Tensor) else torch.from_numpy(
                        np.asarray(change, dtype=np.float32))
                    param.add_(change.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self.params[name].copy_(original)

    def resolved(self, task: str, predicted: float) -> bool:
        """Whether a predicted change stands `RESOLUTION` times above the task's rounding floor."""
        return abs(predicted) > RESOLUTION * self.rounding[task]

    def measure(self, task: str, changes: Mapping[str, np.ndarray]) -> float:
        """Mean over `task`'s held-out samples of the token-sum loss change under `changes`."""
        with self.stepped(changes):
            stepped = self._losses(self.model, self.samples[task], self.pad_id, self.batch_size)[0].numpy()
        return float(np.mean(stepped - self.dense[task]))
