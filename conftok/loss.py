"""The training loss: cross-entropy at the confidence token's position only.

Batches are padded on the left, so every example's token is its last position. The model is run
on the input WITHOUT that token and asked for logits at the last position only
(``logits_to_keep=1``): one (B, V) matrix instead of (B, T, V). On a tiny model this is 22x
faster a step than full logits (DESIGN.md); the result equals :func:`masked_lm_loss` over full
logits, which a test checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftok.data import IGNORE_INDEX

__all__ = ["position_ids_from_mask", "confidence_logits", "confidence_token_loss", "masked_lm_loss",
           "p_confident"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def confidence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) for the token that follows each row of a left-padded batch."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=1,  # never pass labels with this: transformers raises; CE is computed here
        use_cache=False,
    )
    return out.logits[:, -1, :]  # (B, 1, V) -> (B, V)


def confidence_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the confidence token; returns ``(loss, logits (B, V))``.

    ``batch`` comes from :class:`conftok.data.ConfidenceCollator`: labels are IGNORE_INDEX
    everywhere but the last column.
    """
    labels = batch["labels"]
    assert bool((labels[:, :-1] == IGNORE_INDEX).all()) and bool((labels[:, -1] != IGNORE_INDEX).all()), \
        "labels must supervise the last position only (left-padded ConfidenceDataset batches)"
    # Position t's logits predict token t+1: feed everything but the token, read the last position.
    logits = confidence_logits(model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])
    return F.cross_entropy(logits.float(), labels[:, -1]), logits


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Standard causal-LM loss over full logits (B, T, V), ignoring IGNORE_INDEX labels."""
    # Shift: logits at t score the label at t+1.
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def p_confident(logits: torch.Tensor, confident_id: int, unconfident_id: int) -> torch.Tensor:
    """p(C) / (p(C) + p(U)) from logits (..., V); equals a softmax over the two logits."""
    pair = logits[..., [confident_id, unconfident_id]].float()
    return torch.softmax(pair, dim=-1)[..., 0]
