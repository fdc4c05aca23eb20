"""Batches, per-sample token-sum losses and sampled labels.

Token-sum convention: `l_i = sum over labelled positions t of -log p(x_t | x_<t)`. The
backward pass uses `sum_i l_i`; since samples do not interact in a transformer's
forward pass, `d(sum_i l_i)/d(activations of i) = d l_i / d(activations of i)`, so the
per-sample gradients the hooks form are exactly `g_i = d l_i / d theta`. Right padding
keeps every real token's position and attention unchanged, and padded positions get
exactly zero gradient (nothing reads them and they carry no label).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.samples import TokenizedSample


@dataclass
class Batch:
    """A right-padded micro-batch.

    Attributes:
        ids: sample ids, `[b]`.
        input_ids: int64 `[b, t]`.
        attention_mask: int64 `[b, t]`, 1 on real tokens.
        label_mask: bool `[b, t]`, True where token t is a target.
    """

    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.ids, self.input_ids.to(device), self.attention_mask.to(device), self.label_mask.to(device))

    @property
    def n_tokens(self) -> torch.Tensor:
        """Labelled tokens per sample, `[b]`."""
        return self.label_mask.sum(1)


def collate(samples: list[TokenizedSample], pad_id: int) -> Batch:
    """Right-pad `samples` into one `Batch`."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    label_mask = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = sample.input_ids
        attention_mask[row, :n] = 1
        label_mask[row, :n] = sample.label_mask
    return Batch([s.id for s in samples], input_ids, attention_mask, label_mask)


def sample_labels(logits: torch.Tensor, batch: Batch, seed: int) -> torch.Tensor:
    """Targets drawn from the model's own predictive distribution (sampled Fisher).

    Each sample gets its own generator seeded from (seed, sample id), so the labels do
    not depend on batching or order. Returns int64 `[b, t]` (position t's target).
    """
    targets = batch.input_ids.clone()
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)  # [b, t-1, v]
    for row, sample_id in enumerate(batch.ids):
        digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
        generator = torch.Generator(device=probs.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        drawn = torch.multinomial(probs[row], 1, generator=generator).squeeze(1)
        targets[row, 1:] = torch.where(batch.label_mask[row, 1:], drawn, targets[row, 1:])
    return targets


def scored_positions(label_mask: torch.Tensor) -> torch.Tensor:
    """bool `[b, t]`: positions whose prediction enters the loss (`per_sample_loss`).

    Position t's logits predict token t + 1, so t is scored iff `label_mask[:, t + 1]`;
    the last position predicts nothing.
    """
    scored = torch.zeros_like(label_mask)
    scored[:, :-1] = label_mask[:, 1:]
    return scored


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Token-sum negative log-likelihood per sample.

    Args:
        logits: `[b, t, v]`; position t predicts token t + 1.
        targets: int64 `[b, t]`; token t is predicted from positions < t.
        label_mask: bool `[b, t]`, which targets count.

    Returns:
        `[b]` losses (float32, or float64 for a float64 model).
    """
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision log-softmax is too coarse
        logits = logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets[:, 1:], reduction="none")  # [b, t-1]
    return torch.where(label_mask[:, 1:], nll, 0.0).sum(1)
