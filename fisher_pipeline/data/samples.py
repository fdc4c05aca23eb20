"""Samples before and after tokenization, and the seeded order they are chosen in."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextSample:
    """One raw sample: plain `text`, or a `prompt` with its `completion`.

    Attributes:
        id: stable id, derived from where the text comes from (file line, topic,
            function name), never from a position after shuffling, so the same text
            keeps its id whatever the seed or sample count.
        text: plain text; the loss covers every token after the first.
        prompt: context for `completion`; its tokens are not labelled.
        completion: the labelled part of a prompt/completion pair.
    """

    id: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    def __post_init__(self) -> None:
        plain = self.text is not None and self.prompt is None and self.completion is None
        pair = self.text is None and self.prompt is not None and self.completion is not None
        if not (plain or pair):
            raise ValueError(
                f"sample {self.id!r} needs either 'text' or both 'prompt' and 'completion'"
            )

    @property
    def is_pair(self) -> bool:
        """Whether this is a prompt/completion pair (loss on the completion only)."""
        return self.text is None


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenized sample, ready for a causal language model.

    Attributes:
        id: the `TextSample.id` it was made from.
        input_ids: int64 `[T]` token ids, `T <= max_length`.
        label_mask: bool `[T]`; True at `t` when token `t` is a target predicted from
            tokens `< t`. `label_mask[0]` is always False (nothing predicts token 0).
    """

    id: str
    input_ids: torch.Tensor
    label_mask: torch.Tensor

    def __post_init__(self) -> None:
        # Cheap checks that catch layout mistakes before they become silent loss bugs.
        if self.input_ids.dim() != 1 or self.input_ids.shape != self.label_mask.shape:
            raise ValueError(
                f"sample {self.id!r}: input_ids {tuple(self.input_ids.shape)} and label_mask "
                f"{tuple(self.label_mask.shape)} must be 1-D of the same length"
            )
        if self.input_ids.dtype != torch.int64 or self.label_mask.dtype != torch.bool:
            raise ValueError(f"sample {self.id!r}: input_ids must be int64 and label_mask bool")
        if self.label_mask.numel() and bool(self.label_mask[0]):
            raise ValueError(f"sample {self.id!r}: label_mask[0] must be False")

    @property
    def n_tokens(self) -> int:
        """Number of labelled tokens (targets of the loss)."""
        return int(self.label_mask.sum())


def seeded_order(ids: list[str], seed: int) -> list[int]:
    """Positions of `ids` in a pseudo-random order fixed by `seed`.

    Each id gets a sort key from a hash of (seed, id), so the order does not depend on
    Python's `random` implementation, and adding ids (a line appended to a file) only
    slots them in among the others: the relative order of existing ids is unchanged.
    """
    keys = [hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest() for sample_id in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)
