"""Padding-free batches: a batch's rows concatenated into one row, each row's positions restarting at 0.

Left padding makes every row as long as the batch's longest, and the model computes on the padding
too (a third of the work with shuffled batches of real rows, a few percent with length-grouped
ones: ``bench/padding.py``). Padding-free, the rows are laid end to end as one (1, N) sequence,
N = the batch's real tokens, with ``position_ids`` that restart at 0 at each row's start and the row
boundaries (``cu_seq_lens``, as in transformers' ``DataCollatorWithFlattening``) passed to
flash-attention's variable-length kernel, so no row attends to another and no padding is computed.
This needs ``attn_implementation="flash_attention_2"`` (the ``flash_attn`` package, a CUDA GPU):
SDPA and eager attention in transformers 5.17 also keep packed rows apart (a block-diagonal mask
built from ``position_ids``), which the tests use on the CPU, but they build an N x N mask and
compute attention between all N tokens, which costs more than the padding it saves.

Logits are kept only where the loss reads them: ``logits_to_keep`` takes a 1-D tensor of positions
(transformers 5.17), here each row's last ``keep`` positions (the one that predicts the confidence
token, and those that predict the answer's tokens when a guard term needs them), gathered back into
the (B, keep, V) layout of the padded path. So the loss itself is :func:`conftok.loss.training_loss`
unchanged: :func:`packed_training_loss` hands it a :class:`PackedModel`, which runs the model
padding-free whenever the loss calls it (the KL term's second forward, with the adapter disabled,
included).

Batches come from :class:`PackedConfidenceCollator`: the left-padded batch of
:class:`~conftok.data.ConfidenceCollator` (the loss's terms read its labels and masks) plus where
each row's real tokens of the input (the row without its token) lie in the flattened sequence.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from conftok.data import ConfidenceCollator
from conftok.loss import LossTerms, training_loss

__all__ = ["FLASH_ATTENTION", "HOST_KEYS", "PACKED_KEYS", "PackedConfidenceCollator", "PackedModel", "packed_logits",
           "packed_token_loss", "packed_training_loss", "check_padding_free"]

FLASH_ATTENTION = "flash_attention_2"
# The collator's keys besides the padded batch's: index of each real input token in the (B, T - 1)
# input, its position, row boundaries (int32, as flash-attention takes them) and the longest row.
PACKED_KEYS = ("packed_index", "packed_position_ids", "cu_seq_lens", "max_length")
# Keys a training step leaves on the host when it moves a batch: flash-attention takes the longest row as a
# Python int, read from a CPU tensor without waiting for the device.
HOST_KEYS = ("max_length",)


@dataclass
class PackedConfidenceCollator:
    """:class:`~conftok.data.ConfidenceCollator`'s left-padded batch plus the flattening of its input.

    The input is each row without its last token (the confidence token, which the loss predicts
    from the position before it). For rows of input lengths l_0, l_1, ... the flattened sequence is
    row 0's real tokens, then row 1's, ...: ``packed_index`` (N,) indexes them in the padded input
    ``input_ids[:, :-1].reshape(-1)``, ``packed_position_ids`` (1, N) is 0..l_0-1, 0..l_1-1, ...,
    ``cu_seq_lens`` (B + 1,) is 0, l_0, l_0 + l_1, ... and ``max_length`` (a 0-d tensor) the
    longest l_i.

    Example: rows of 3 and 2 tokens padded to T = 3 give the input columns 0..1 (2 wide);
    row 0's input is columns 0, 1 and row 1's column 1 only (column 0 is padding), so
    ``packed_index = [0, 1, 3]``, ``packed_position_ids = [[0, 1, 0]]``, ``cu_seq_lens = [0, 2, 3]``.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = ConfidenceCollator(self.pad_token_id)(examples)
        real = batch["attention_mask"][:, :-1].bool()  # (B, T - 1): the input without the token
        lengths = real.sum(-1)  # (B,)
        batch["packed_index"] = real.reshape(-1).nonzero().squeeze(-1)  # (N,), row after row
        batch["packed_position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)  # (1, N)
        batch["cu_seq_lens"] = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
        batch["max_length"] = lengths.max()
        return batch


def packed_logits(model, batch: dict[str, torch.Tensor], input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits (B, keep, V) at each row's last ``keep`` input positions, computed padding-free.

    ``input_ids`` is the padded input (B, T - 1) the loss would give the model; ``batch`` holds the
    collator's :data:`PACKED_KEYS`. Where a row has fewer than ``keep`` tokens the missing leading
    columns are 0 (in the padded path they are padding, which no loss term reads).
    """
    if input_ids.shape[0] + 1 != batch["cu_seq_lens"].shape[0] or input_ids.shape[1] + 1 != batch["input_ids"].shape[1]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} is not the batch's input without its last column "
                         f"(batch input_ids {tuple(batch['input_ids'].shape)}, {batch['cu_seq_lens'].shape[0] - 1} rows)")
    flat_ids = input_ids.reshape(-1)[batch["packed_index"]].unsqueeze(0)  # (1, N)
    cu = batch["cu_seq_lens"]
    starts, ends = cu[:-1].long(), cu[1:].long()  # (B,)
    index = ends[:, None] - keep + torch.arange(keep, device=cu.device)  # (B, keep): each row's last positions
    present = index >= starts[:, None]
    index = torch.maximum(index, starts[:, None])  # a short row repeats its first position; zeroed below
    max_length = int(batch["max_length"])  # a Python int for flash-attention: a device sync unless on the host
    out = model(input_ids=flat_ids, attention_mask=None, position_ids=batch["packed_position_ids"],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length,
                logits_to_keep=index.reshape(-1), use_cache=False)
    logits = out.logits.reshape(len(index), keep, -1)  # (1, B * keep, V) -> (B, keep, V)
    return logits.masked_fill(~present[..., None], 0.0)


class PackedModel:
    """Stands in for ``model`` in :func:`conftok.loss.training_loss` on one packed batch: each call
    (``model(input_ids=..., attention_mask=..., position_ids=..., logits_to_keep=k)``) runs the
    model padding-free and returns logits in the padded layout; ``disable_adapter`` is the model's."""

    def __init__(self, model, batch: dict[str, torch.Tensor]):
        self.model = model
        self.batch = batch

    def __call__(self, *, input_ids: torch.Tensor, logits_to_keep: int, **ignored) -> SimpleNamespace:
        # attention_mask and position_ids of the padded input are replaced by the packing.
        return SimpleNamespace(logits=packed_logits(self.model, self.batch, input_ids, logits_to_keep))

    def disable_adapter(self):
        return self.model.disable_adapter()


def packed_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the confidence token from a packed batch; ``(loss, logits (B, V))``.

    The padding-free twin of :func:`conftok.loss.confidence_token_loss`: one logit row per example,
    at its last input position.
    """
    logits = packed_logits(model, batch, batch["input_ids"][:, :-1], 1)[:, -1]  # (B, V)
    return F.cross_entropy(logits.float(), batch["labels"][:, -1]), logits


def packed_training_loss(model, batch: dict[str, torch.Tensor], **loss_kwargs) -> LossTerms:
    """:func:`conftok.loss.training_loss` (every term, same keyword arguments) on a packed batch."""
    return training_loss(PackedModel(model, batch), batch, **loss_kwargs)


def check_padding_free(model=None, bf16: bool = True) -> None:
    """Raise ValueError unless padding-free training can run: flash-attention importable and, given a
    model, loaded with ``attn_implementation="flash_attention_2"`` and computing in 16 bits (its weights,
    or bf16 autocast: ``bf16``)."""
    if model is not None and not bf16:
        dtype = next(model.parameters()).dtype
        if dtype == torch.float32:  # flash-attention's kernels take fp16/bf16 only: it would fail at the first step
            raise ValueError("padding_free=True needs bf16=True: flash-attention 2 computes in fp16/bf16 only, and "
                             "with bf16=False the model computes in float32. Set bf16=True or padding_free=False")
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("padding_free=True needs flash-attention 2, which is not installed (pip install flash-attn, "
                         "on a CUDA machine); SDPA and eager attention would compute attention across the whole "
                         "flattened batch, which costs more than padding. Set padding_free=False (the default).")
    if model is not None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        found = getattr(config, "_attn_implementation", None)
        if found != FLASH_ATTENTION:
            raise ValueError(f"padding_free=True needs the model loaded with attn_implementation={FLASH_ATTENTION!r}, "
                             f"got {found!r} (build_model passes it when given a name; load a model object "
                             "with it yourself)")
