"""The training loss: cross-entropy at the confidence token's position only.

Batches are padded on the left, so every example's token is its last position. The model is run
on the input WITHOUT that token and asked for logits at the last position only
(``logits_to_keep=1``): one (B, V) matrix instead of (B, T, V). On a tiny model this is 22x
faster a step than full logits (0.031 s against 0.658 s); the result equals :func:`masked_lm_loss` over full
logits, which a test checks.

:func:`training_loss` adds two optional terms on the positions that predict the answer's tokens
(the last few positions, so logits are still kept for a handful of positions only). Neither teaches
the answer; both stop the adapter from damaging it, which the token loss alone does on real data
(bench/README.md: with no negative positions, the cheapest way to raise p(token) where the answer
ends is to raise it everywhere, and the trained model then emits the token before any answer):

- placement, ``-log(1 - p(any confidence token))`` at each answer position: the token belongs
  after the answer, not inside it;
- KL(base || tuned) at the same positions, the base being the model with the adapter disabled:
  the answer's distribution stays the base model's. Costs a second forward (no gradients).

Cheaper guards, none of which needs a second forward (bench/README.md compares them):

- answer cross-entropy, ``-log p(answer token)`` at the same positions: the answers are the base
  model's own greedy outputs, so this holds the tuned model to them (self-distillation on hard
  labels). ``answer_ce_rows="correct"`` keeps only rows tagged confident (Self-REF, Chuang et al.
  2025: the wrong answers' tokens are masked so the model is not taught them);
- stored KL: KL(base || tuned) against the base distribution computed once before training and
  kept compactly per answer position as its top-k log-probabilities plus the rest's mass
  (:func:`base_topk`); the KL between the two distributions coarsened to those k + 1 outcomes,
  a lower bound of the full KL that tightens as k grows.

The token's cross-entropy can weight its classes (``token_weights``, a (V,) vector; the training
loop sets C and U of each domain to n / (2 n_class), the inverse of their frequency).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from conftok.data import IGNORE_INDEX

__all__ = ["padded_attention_guard", "BatchFacts", "host_facts", "CHECKPOINTING_KWARGS", "LoraInputsUncast",
           "position_ids_from_mask", "confidence_logits", "confidence_token_loss", "masked_lm_loss", "p_confident",
           "LossTerms", "training_loss", "base_topk", "attach_base_topk", "rows_base_topk", "token_budget_batches",
           "ANSWER_CE_ROWS", "TermSizes", "term_sizes", "group_loss"]

ANSWER_CE_ROWS = ("all", "correct")


def padded_attention_guard(attention_mask: torch.Tensor, *, always: bool = False, padded: bool | None = None):
    """A context for the forward AND backward of a left-padded batch on CUDA: SDPA's math kernel.

    A padding position's query attends to nothing (every key before it is padding too). On an H100
    (torch 2.11, bf16) the fused SDPA kernels (memory-efficient, cuDNN) then give non-finite
    gradients while the forward stays finite: SmolLM2 training turned NaN at the first batch whose
    padded rows were fully masked; eager attention, fp32, and the math kernel stayed finite over
    the same 40 steps (bench/README.md). So batches with padding run the math kernel; batches without
    keep the fused ones. Length-grouped batches still hold rows of several lengths (442 of 443 have
    padding on the real rows at batch 8), so on CUDA nearly every step runs the math kernel, whose
    scores ``conftok.memory``'s estimate counts. Costs a host sync (the mask check) unless
    ``padded`` is given, and, on padded batches, attention memory O(B x heads x T^2). A no-op on the
    CPU, and for attention implementations other than SDPA. Gradient checkpointing recomputes the forward in
    the backward: models checkpointed with :data:`CHECKPOINTING_KWARGS` (``build_model`` does)
    recompute under the forward's kernels, so the backward need not be inside this guard.

    ``always=True``: the math kernel for every CUDA batch, padded or not (no host sync). For compiled
    layers (``conftok.compiling``), which keep the kernel they were traced with. ``padded``: whether
    the batch has padding, read from its host copy (:func:`host_facts`): no host sync either. Inside a
    block where the math kernel is already the only one allowed, nothing is read.
    """
    if not attention_mask.is_cuda or _math_only():
        return nullcontext()
    if padded is None and not always:
        padded = not bool(attention_mask.all())  # a CPU-GPU sync
    if not (always or padded):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _math_only() -> bool:
    b = torch.backends.cuda
    fused = b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled()
    return b.math_sdp_enabled() and not fused


class BatchFacts(NamedTuple):
    """What :func:`training_loss` would otherwise read from a batch on the device (a host sync each):
    read once from the batch's host copy before it moves (:func:`host_facts`)."""
    padded: bool  # any padding in the attention mask
    answer_columns: int  # the longest answer's length (the answer_mask's positions that predict a token); 0 if none


def host_facts(batch: dict[str, torch.Tensor]) -> BatchFacts:
    """:class:`BatchFacts` of a collated batch still on the CPU (a packed batch too: it holds the padded batch's
    labels and masks); checks its labels as :func:`training_loss` does."""
    _check_last_position_only(batch["labels"])
    answer_mask = batch.get("answer_mask")
    columns = int(answer_mask[:, 1:].sum(-1).max()) if answer_mask is not None and answer_mask.numel() else 0
    return BatchFacts(padded=not bool(batch["attention_mask"].all()), answer_columns=columns)


class LoraInputsUncast:
    """A context for the forward under bf16 autocast: each LoRA projection takes its input as it comes.

    PEFT casts a LoRA layer's input to its (fp32) LoRA weights' dtype; under autocast the product
    casts it back to bf16. That is two copies of the activation per projection and two more in the
    backward, 784 kernels a step for a 28-layer model with seven projections; without them a step of
    a 28-layer model ran 10.6% fewer operations on the CPU (bench/README.md). The products are bf16 either
    way: the loss is the cast path's. Outside autocast a bf16 input would meet fp32 LoRA weights: use
    it only inside ``torch.autocast``. The layers are found once; entering and leaving sets one flag on
    each. A checkpointed layer (:data:`CHECKPOINTING_KWARGS`) is recomputed under the contexts its
    forward ran in, so the backward need not be inside it.
    """

    active: list["LoraInputsUncast"] = []  # entered and not yet left, innermost last

    def __init__(self, model):
        self.layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        self._saved: list[list[bool]] = []

    def __enter__(self):
        self._saved.append([m.cast_input_dtype_enabled for m in self.layers])
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        LoraInputsUncast.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        active = LoraInputsUncast.active
        del active[len(active) - 1 - active[::-1].index(self)]  # this one's innermost entry
        for m, value in zip(self.layers, self._saved.pop()):
            m.cast_input_dtype_enabled = value


@contextmanager
def _as_in_the_forward(backends, uncasts):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends), ExitStack() as stack:
        for uncast in uncasts:
            stack.enter_context(uncast)
        yield


def _recompute_as_the_forward():
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation runs under what the forward ran
    under (read now, as the forward runs): the SDPA kernels it was allowed and any
    :class:`LoraInputsUncast`, whatever is in force at backward time."""
    from torch.nn.attention import SDPBackend

    flags = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
             SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
             SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled()}
    return nullcontext(), _as_in_the_forward([b for b, on in flags.items() if on], list(LoraInputsUncast.active))


# gradient_checkpointing_kwargs for every model conftok checkpoints. Non-reentrant, and each layer is
# recomputed as its forward ran (_recompute_as_the_forward). A padded batch's forward runs under
# padded_attention_guard (SDPA's math kernel); a backward called outside that guard (a user's own
# loop) would otherwise recompute with the fused kernels, and torch.utils.checkpoint stops with
# "Recomputed values ... have different metadata" (seen on an H200 with every such loop). Likewise a
# forward under LoraInputsUncast.
CHECKPOINTING_KWARGS = {"use_reentrant": False, "context_fn": _recompute_as_the_forward}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def confidence_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      padded: bool | None = None) -> torch.Tensor:
    """Logits (B, V) for the token that follows each row of a left-padded batch."""
    with padded_attention_guard(attention_mask, padded=padded):
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
    kl: torch.Tensor  # mean KL(base || tuned) over answer positions, live or stored, the confidence tokens left
    # out of both (0 if not computed)
    logits: torch.Tensor  # (B, V) at the token's position
    answer_ce: torch.Tensor  # mean -log p(answer token) over the guarded rows' answer positions (0 if not computed)


def _forward_last(model, input_ids, attention_mask, keep: int, padded: bool | None = None) -> torch.Tensor:
    with padded_attention_guard(attention_mask, padded=padded):
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep, use_cache=False).logits


def training_loss(model, batch: dict[str, torch.Tensor], *, confidence_ids: Sequence[int] | torch.Tensor = (),
                  confident_ids: Sequence[int] | torch.Tensor = (), placement_weight: float = 0.0,
                  kl_weight: float = 0.0, answer_ce_weight: float = 0.0, answer_ce_rows: str = "all",
                  stored_kl_weight: float = 0.0, token_weights: torch.Tensor | None = None,
                  facts: BatchFacts | None = None) -> LossTerms:
    """The token's cross-entropy plus the optional guard terms (module docstring).

    ``loss = token + placement_weight * placement + kl_weight * kl + stored_kl_weight * kl(stored)
    + answer_ce_weight * answer_ce``. With every weight 0 this is :func:`confidence_token_loss`
    (same forward, ``logits_to_keep=1``). Otherwise the forward keeps ``1 + longest answer``
    positions and ``batch`` needs the collator's ``answer_mask``; the live KL term runs the model a
    second time, without gradients and with the adapter disabled (``model.disable_adapter()``, a
    PEFT model); the stored KL term needs ``base_topk_ids``/``base_topk_logp`` in the batch
    (:func:`attach_base_topk` before training). ``confidence_ids``: every
    confidence token (placement; left out of both KL terms); ``confident_ids``: the C tokens
    (``answer_ce_rows="correct"``).

    Both KL terms compare the base and the tuned distributions over the tokens other than the confidence
    tokens (each renormalised there). The base model has no such tokens: its new rows are copies of
    ``<|im_end|>``'s (:func:`conftok.tokens.add_confidence_tokens`), so over the whole vocabulary the
    reference would give each one end of turn's probability at every answer position, and the KL would hold
    the tuned model to it against the placement term (with both weights 1, at half the copied mass, never
    near 0). Left out, only the placement term acts on them.

    Host syncs: none if ``facts`` (:func:`host_facts` of the batch's CPU copy) is given and the ids are
    tensors on the batch's device; otherwise the labels' check, the padding check and the answers'
    length each read the device, and id lists are copied to it.
    """
    weights = {"placement_weight": placement_weight, "kl_weight": kl_weight, "answer_ce_weight": answer_ce_weight,
               "stored_kl_weight": stored_kl_weight}
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise ValueError(f"loss weights must be >= 0, got {negative}")
    if kl_weight and stored_kl_weight:
        raise ValueError("use kl_weight (live KL) or stored_kl_weight (stored KL), not both")
    if answer_ce_rows not in ANSWER_CE_ROWS:
        raise ValueError(f"answer_ce_rows must be one of {list(ANSWER_CE_ROWS)}, got {answer_ce_rows!r}")
    zero = torch.zeros((), device=batch["input_ids"].device)
    labels = batch["labels"]
    if facts is None:
        _check_last_position_only(labels)
    padded = None if facts is None else facts.padded
    if not any(weights.values()):
        logits = confidence_logits(model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], padded=padded)
        token = _token_ce(logits, labels[:, -1], token_weights)
        return LossTerms(token, token, zero, zero, logits, zero)
    if "answer_mask" not in batch:
        raise KeyError("guard terms need the batch's answer_mask (ConfidenceDataset + ConfidenceCollator)")
    if placement_weight and not len(confidence_ids):
        raise ValueError("the placement term needs the confidence token ids")
    if (kl_weight or stored_kl_weight) and not len(confidence_ids):
        raise ValueError("the KL terms need the confidence token ids (confidence_ids): they are left out of the KL")
    if answer_ce_weight and answer_ce_rows == "correct" and not len(confident_ids):
        raise ValueError("answer_ce_rows='correct' needs the confident token ids (confident_ids)")
    if stored_kl_weight and "base_topk_ids" not in batch:
        raise KeyError("the stored KL term needs base_topk_ids/base_topk_logp in the batch "
                       "(conftok.loss.attach_base_topk before training)")
    input_ids, attention_mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    # Column t of the input without the token predicts token t+1: the answer's tokens are predicted by
    # the columns where answer_mask[:, 1:] is set, all within the last `longest` columns before the token's.
    predicts_answer = batch["answer_mask"][:, 1:].bool()
    longest = int(predicts_answer.sum(-1).max()) if facts is None else facts.answer_columns
    keep = longest + 1
    logits = _forward_last(model, input_ids, attention_mask, keep, padded)  # (B, keep, V)
    token = _token_ce(logits[:, -1], labels[:, -1], token_weights)
    mask = predicts_answer[:, -keep:]  # (B, keep); the last column (the token's) is never set
    n = mask.sum().clamp(min=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
    placement = kl = answer_ce = zero
    if placement_weight or kl_weight or stored_kl_weight:
        confidence = torch.as_tensor(confidence_ids, device=log_probs.device)
        others = log_probs.index_fill(-1, confidence, -torch.inf)  # the confidence tokens left out
        not_confidence = torch.logsumexp(others, dim=-1)  # log(1 - sum_c p_c), (B, keep)
    if placement_weight:
        placement = -(not_confidence * mask).sum() / n
    if kl_weight:
        with torch.no_grad(), model.disable_adapter():
            base = _forward_last(model, input_ids, attention_mask, keep, padded).float()
            base = torch.log_softmax(base.index_fill(-1, confidence, -torch.inf), dim=-1)
        tuned = others - not_confidence.unsqueeze(-1)  # renormalised over the other tokens
        # -inf - -inf at the confidence tokens: their share of the KL is 0 (the base gives them none)
        kl = ((base.exp() * (base - tuned).index_fill(-1, confidence, 0.0)).sum(-1) * mask).sum() / n
    if stored_kl_weight:
        tuned_top = log_probs[:, :-1].gather(-1, batch["base_topk_ids"].long()) - not_confidence[:, :-1, None]
        kl = _stored_kl(tuned_top, batch["base_topk_logp"], mask[:, :-1])
    if answer_ce_weight:
        # The column that predicts input column j + 1 scores the token there: targets are the last `keep` ids.
        targets = batch["input_ids"][:, -keep:]  # (B, keep); the last one is the confidence token, never masked in
        rows = mask
        if answer_ce_rows == "correct":
            rows = mask & torch.isin(labels[:, -1], torch.as_tensor(confident_ids, device=labels.device))[:, None]
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep)
        answer_ce = (nll * rows).sum() / rows.sum().clamp(min=1)
    loss = token + placement_weight * placement + (kl_weight or stored_kl_weight) * kl + answer_ce_weight * answer_ce
    return LossTerms(loss, token, placement, kl, logits[:, -1], answer_ce)


class TermSizes(NamedTuple):
    """What each of :func:`training_loss`'s terms averages over in one batch (:func:`term_sizes`)."""
    token: float  # the rows (weighted or not, the token's term is a mean over them)
    answer: float  # the positions that predict an answer token (placement, live or stored KL)
    answer_ce: float  # those of them in the rows answer_ce guards (all rows, or the confident ones)


def term_sizes(batch: dict[str, torch.Tensor], *, token_weights: torch.Tensor | None = None,
               confident_ids: Sequence[int] = (), answer_ce_rows: str = "all") -> TermSizes:
    """:class:`TermSizes` of a collated batch, read from its host copy (no device involved).

    Gradient accumulation weighs each micro-batch's mean terms by these (:func:`group_loss`), so that a
    step's gradient is the mean over all its rows and answer positions, as one batch of them all would
    give, and not a mean of the micro-batches' means (which weighs the rows of a small micro-batch, or
    the answer positions of short answers, more)."""
    targets = batch["labels"][:, -1]
    token = float(len(targets))  # class weights scale each row's term, not the mean's denominator (_token_ce)
    answer_mask = batch.get("answer_mask")
    if answer_mask is None:
        return TermSizes(token, 0.0, 0.0)
    predicts_answer = answer_mask[:, 1:].bool()
    guarded = predicts_answer
    if answer_ce_rows == "correct":
        guarded = predicts_answer & torch.isin(targets, torch.as_tensor(list(confident_ids), dtype=targets.dtype))[:, None]
    return TermSizes(token, float(predicts_answer.sum()), float(guarded.sum()))


def group_loss(terms: LossTerms, shares: TermSizes, *, placement_weight: float = 0.0, kl_weight: float = 0.0,
               answer_ce_weight: float = 0.0, stored_kl_weight: float = 0.0, **ignored) -> torch.Tensor:
    """A micro-batch's part of its step's loss: each of ``terms`` (a micro-batch's means, :func:`training_loss`)
    times its ``shares`` (the micro-batch's :func:`term_sizes` over the whole step's), weighted as
    ``training_loss`` weighs them. Summed over a step's micro-batches, this is the loss of one batch of them
    all; with every share 1 it is ``terms.loss``."""
    return (terms.token * shares.token + placement_weight * terms.placement * shares.answer
            + (kl_weight or stored_kl_weight) * terms.kl * shares.answer
            + answer_ce_weight * terms.answer_ce * shares.answer_ce)


def _token_ce(logits: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """The token's cross-entropy, a mean over the rows; with ``token_weights`` (V,) each row's times its target's
    weight, still divided by the rows (not by the batch's summed weights, F.cross_entropy's ``weight=``: a batch of
    one class then cancels its own weight, and at batch 1 the weights do nothing). The weights average 1 over the
    data (:func:`conftok.train` sets n / (2 n_class)), so C and U total n / 2 each over an epoch, however the rows
    are batched."""
    if token_weights is None:
        return F.cross_entropy(logits.float(), target)
    return (F.cross_entropy(logits.float(), target, reduction="none") * token_weights[target].float()).mean()


def _stored_kl(tuned_top: torch.Tensor, topk_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) on the k + 1 outcomes "each of the base's top k, or anything else".

    ``tuned_top`` (B, L, k) the tuned log-probabilities of the base's top-k ids and ``topk_logp`` (B, L, k)
    the base's, both over the tokens other than the confidence tokens, left-padded like the answer
    positions; ``mask`` (B, L) the answer positions.
    """
    base_top = topk_logp.float()
    base_rest = torch.log1p(-base_top.exp().sum(-1).clamp(max=1 - 1e-6))  # (B, L)
    tuned_rest = torch.log1p(-tuned_top.exp().sum(-1).clamp(max=1 - 1e-6))
    per_position = (base_top.exp() * (base_top - tuned_top)).sum(-1) + base_rest.exp() * (base_rest - tuned_rest)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def base_topk(model, batch: dict[str, torch.Tensor], k: int,
              confidence_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's top-k log-probabilities at each answer position of a collated batch, over the
    tokens other than ``confidence_ids`` (renormalised there; :func:`training_loss` leaves them out of the KL).

    Returns ``(ids, logp)``, each (B, L, k) for L = the longest answer, left-padded like the
    answer positions (the column that predicts the token is not included); k is at most the other
    tokens' number. Run with the adapter disabled (or before it is added); :func:`training_loss`'s
    stored KL reads them back.
    """
    input_ids, attention_mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    longest = int(batch["answer_mask"][:, 1:].sum(-1).max())
    logits = _forward_last(model, input_ids, attention_mask, longest + 1)[:, :-1].float()  # (B, L, V)
    confidence = torch.as_tensor(list(confidence_ids), dtype=torch.long, device=logits.device)
    logits = logits.index_fill(-1, confidence, -torch.inf)
    logp, ids = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1] - len(confidence)), dim=-1)
    return ids, logp


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


@torch.no_grad()
def attach_base_topk(dataset, model, k: int, *, batch_size: int = 16, progress: bool = True,
                     autocast_dtype: torch.dtype | None = None) -> None:
    """Store the base model's top-k log-probabilities at every answer position of a
    :class:`conftok.data.ConfidenceDataset` (``dataset.base_topk``; the stored KL guard reads them).

    Run once before training (a PEFT model's adapter is disabled here, dropout off), under the autocast
    the training steps run with (``autocast_dtype``, e.g. bfloat16; None: none): float32 weights read in
    float32 would leave a KL floor of rounding alone against bf16-autocast steps. Costs one
    forward over the data set without gradients, and ``k`` ids (int32) and log-probabilities (fp16)
    per answer token in memory: 6k bytes a token, 192 bytes at k = 32.
    :func:`conftok.reference_cache.attach_base_topk_cached` keeps them on disk between runs.
    """
    dataset.base_topk = None  # so the items below are the plain ones
    dataset.base_topk = rows_base_topk(dataset, model, k, range(len(dataset)), batch_size=batch_size,
                                       progress=progress, autocast_dtype=autocast_dtype)


def token_budget_batches(sorted_lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` slices of rows sorted by length: at most ``batch_size`` rows, and at most
    ``batch_size x`` their mean length in padded tokens. A few long rows then get batches of their own
    instead of padding a whole batch of short ones (64 real rows at batch 64: 627 tokens a row padded
    for all 64, where the mean is 250)."""
    if not sorted_lengths:
        return []
    budget = batch_size * sum(sorted_lengths) / len(sorted_lengths)
    slices, start = [], 0
    for end, length in enumerate(sorted_lengths):
        if end > start and (end - start == batch_size or (end - start + 1) * length > budget):
            slices.append((start, end))
            start = end
    slices.append((start, len(sorted_lengths)))
    return slices


@torch.no_grad()
def rows_base_topk(dataset, model, k: int, rows, *, batch_size: int = 16, progress: bool = False,
                   autocast_dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The base model's top-k ``(ids int32, logp fp16)``, each (answer length, k) on the CPU, for
    ``rows`` (indices) of a :class:`conftok.data.ConfidenceDataset`, in the order given. Batches
    rows of similar length (:func:`token_budget_batches`); a PEFT model's adapter is disabled, dropout off;
    each forward under ``torch.autocast(dtype=autocast_dtype)`` where given (:func:`attach_base_topk`)."""
    from tqdm.auto import tqdm

    from conftok.data import ConfidenceCollator

    rows = list(rows)
    device = next(model.parameters()).device
    collate = ConfidenceCollator(0)
    disable = getattr(model, "disable_adapter", None)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    order = sorted(rows, key=lambda i: len(dataset.examples[i][0]))  # similar lengths batch together
    batches = token_budget_batches([len(dataset.examples[i][0]) for i in order], batch_size)
    was_training = model.training
    model.eval()  # no dropout: the reference is the base model's own distribution
    try:
        with disable() if disable is not None else nullcontext():
            for start, stop in tqdm(batches, desc="Base top-k", disable=not progress, leave=False):
                idx = order[start:stop]
                batch = {key: v.to(device) for key, v in collate([dataset[i] for i in idx]).items()}
                with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
                    ids, logp = base_topk(model, batch, k, dataset.confidence_ids)  # (B, L, k), left-padded
                ids, logp = ids.to("cpu", torch.int32), logp.to("cpu", torch.float16)  # one copy a batch, not a row
                for row, i in enumerate(idx):
                    n = dataset.examples[i][2]  # this row's answer length
                    found[i] = (ids[row, ids.shape[1] - n:].clone(), logp[row, logp.shape[1] - n:].clone())
    finally:
        model.train(was_training)
    return [found[i] for i in rows]
