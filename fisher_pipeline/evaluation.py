"""Held-out loss of a model: token-sum loss per sample, scored only where labels are.

`heldout_losses` runs the model's body once per batch and its LM head only on the
positions whose next token is labelled (a fraction of all positions on completion
tasks), which gives the same losses as `engine.loss.per_sample_loss` on the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.samples import TokenizedSample
from .engine.loss import collate


@torch.inference_mode()
def heldout_losses(model: nn.Module, samples: list[TokenizedSample], pad_id: int,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-sum loss and labelled-token count of every sample, in `samples`' order.

    Samples are batched by length (less padding); right padding changes no loss.

    Returns:
        losses float64 `[n]`, n_tokens int64 `[n]`.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    losses = torch.zeros(len(samples), dtype=torch.float64)
    counts = torch.zeros(len(samples), dtype=torch.int64)
    body, head = model.base_model, model.get_output_embeddings()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([samples[i] for i in rows], pad_id).to(device)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        scored = batch.label_mask[:, 1:]  # position t predicts token t + 1
        logits = head(hidden[:, :-1][scored]).float()
        nll = F.cross_entropy(logits, batch.input_ids[:, 1:][scored], reduction="none").double()
        which = torch.nonzero(scored)[:, 0]
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=nll.device).index_add_(0, which, nll)
        losses[rows] = per_row.cpu()
        counts[rows] = scored.sum(1).cpu()
    return losses, counts
