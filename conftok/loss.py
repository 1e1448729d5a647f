"""The training loss: cross-entropy at the confidence token's position only.

Batches are padded on the left, so every example's token is its last position. The model is run
on the input WITHOUT that token and asked for logits at the last position only
(``logits_to_keep=1``): one (B, V) matrix instead of (B, T, V). On a tiny model this is 22x
faster a step than full logits (DESIGN.md); the result equals :func:`masked_lm_loss` over full
logits, which a test checks.

:func:`training_loss` adds two optional terms on the positions that predict the answer's tokens
(the last few positions, so logits are still kept for a handful of positions only). Neither teaches
the answer; both stop the adapter from damaging it, which the token loss alone does on real data
(bench/README.md: with no negative positions, the cheapest way to raise p(token) where the answer
ends is to raise it everywhere, and the trained model then emits the token before any answer):

- placement, ``-log(1 - p(any confidence token))`` at each answer position: the token belongs
  after the answer, not inside it;
- KL(base || tuned) at the same positions, the base being the model with the adapter disabled:
  the answer's distribution stays the base model's.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from conftok.data import IGNORE_INDEX

__all__ = ["position_ids_from_mask", "confidence_logits", "confidence_token_loss", "masked_lm_loss",
           "p_confident", "LossTerms", "training_loss"]


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


def _check_last_position_only(labels: torch.Tensor) -> None:
    assert bool((labels[:, :-1] == IGNORE_INDEX).all()) and bool((labels[:, -1] != IGNORE_INDEX).all()), \
        "labels must supervise the last position only (left-padded ConfidenceDataset batches)"


def confidence_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the confidence token; returns ``(loss, logits (B, V))``.

    ``batch`` comes from :class:`conftok.data.ConfidenceCollator`: labels are IGNORE_INDEX
    everywhere but the last column.
    """
    labels = batch["labels"]
    _check_last_position_only(labels)
    # Position t's logits predict token t+1: feed everything but the token, read the last position.
    logits = confidence_logits(model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])
    return F.cross_entropy(logits.float(), labels[:, -1]), logits


class LossTerms(NamedTuple):
    loss: torch.Tensor  # token + placement_weight * placement + kl_weight * kl; backward this
    token: torch.Tensor  # cross-entropy of the confidence token
    placement: torch.Tensor  # mean -log(1 - p(confidence token)) over answer positions (0 if not computed)
    kl: torch.Tensor  # mean KL(base || tuned) over answer positions (0 if not computed)
    logits: torch.Tensor  # (B, V) at the token's position


def _forward_last(model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                 logits_to_keep=keep, use_cache=False).logits


def training_loss(model, batch: dict[str, torch.Tensor], *, confidence_ids: Sequence[int] = (),
                  placement_weight: float = 0.0, kl_weight: float = 0.0) -> LossTerms:
    """The token's cross-entropy plus the optional placement and KL terms (module docstring).

    With both weights 0 this is :func:`confidence_token_loss` (same forward, ``logits_to_keep=1``).
    Otherwise the forward keeps ``1 + longest answer`` positions and ``batch`` needs the
    collator's ``answer_mask``; the KL term runs the model a second time, without gradients and
    with the adapter disabled (``model.disable_adapter()``, a PEFT model).
    """
    if placement_weight < 0 or kl_weight < 0:
        raise ValueError(f"placement_weight and kl_weight must be >= 0, got {placement_weight}, {kl_weight}")
    zero = torch.zeros((), device=batch["input_ids"].device)
    if not placement_weight and not kl_weight:
        token, logits = confidence_token_loss(model, batch)
        return LossTerms(token, token, zero, zero, logits)
    if "answer_mask" not in batch:
        raise KeyError("placement/KL terms need the batch's answer_mask (ConfidenceDataset + ConfidenceCollator)")
    if placement_weight and not confidence_ids:
        raise ValueError("the placement term needs the confidence token ids")
    labels = batch["labels"]
    _check_last_position_only(labels)
    input_ids, attention_mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    # Column t of the input without the token predicts token t+1: the answer's tokens are predicted by
    # the columns where answer_mask[:, 1:] is set, all within the last `longest` columns before the token's.
    predicts_answer = batch["answer_mask"][:, 1:].bool()
    longest = int(predicts_answer.sum(-1).max())
    keep = longest + 1
    logits = _forward_last(model, input_ids, attention_mask, keep)  # (B, keep, V)
    token = F.cross_entropy(logits[:, -1].float(), labels[:, -1])
    mask = predicts_answer[:, -keep:]  # (B, keep); the last column (the token's) is never set
    n = mask.sum().clamp(min=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    placement = zero
    if placement_weight:
        # -log(1 - sum_c p_c) = logsumexp(all) - logsumexp(all but the confidence tokens), in log space.
        others = log_probs.clone()
        others[..., list(confidence_ids)] = -torch.inf
        placement = -(torch.logsumexp(others, dim=-1) * mask).sum() / n
    kl = zero
    if kl_weight:
        with torch.no_grad(), model.disable_adapter():
            base = torch.log_softmax(_forward_last(model, input_ids, attention_mask, keep).float(), dim=-1)
        kl = ((base.exp() * (base - log_probs)).sum(-1) * mask).sum() / n
    loss = token + placement_weight * placement + kl_weight * kl
    return LossTerms(loss, token, placement, kl, logits[:, -1])


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
