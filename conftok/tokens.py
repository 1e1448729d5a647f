"""Confidence tokens: add them to a tokenizer and model, and initialise their rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AddedToken

from conftok.domains import DomainError, resolve_domains, vocabulary_clash

__all__ = ["END_OF_TURN_TOKENS", "add_confidence_tokens", "end_of_turn_token_id", "init_token_rows", "token_ids"]

# Tokens that close an assistant turn in common chat templates, preferred over eos because they
# are what the model predicts right after an answer (ChatML, Llama 3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_token_id(tokenizer) -> int:
    """Id of the token that ends an assistant turn: a known end-of-turn token, else eos."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no end-of-turn or eos token to initialise confidence tokens from; "
                         "use init='mean'")
    return tokenizer.eos_token_id


def token_ids(tokenizer, tokens: Sequence[str]) -> dict[str, int]:
    """Ids of tokens that must each be one added token; raises naming the ones that are not."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise KeyError(f"tokenizer lacks confidence token(s) {missing}; call add_confidence_tokens first")
    return {t: vocab[t] for t in tokens}


@torch.no_grad()
def add_confidence_tokens(tokenizer, model, tokens: Sequence[str] | None = None,
                          init: str = "end_of_turn") -> dict[str, int]:
    """Add confidence tokens as special tokens and initialise their embedding rows.

    Each token becomes one id and absorbs a preceding space (``lstrip=True``), so ``"Yes <C_READ>"``
    encodes as ``Yes``, ``<C_READ>``; this survives ``save_pretrained``/reload. The embedding
    matrix grows only when the tokenizer outgrows it (it never shrinks: Qwen2.5-7B has spare rows
    past its tokenizer, and new ids land there). Rows of newly added tokens are set, input and
    output alike, from the end-of-turn token's rows (``init="end_of_turn"``: C and U start equal,
    so p_confident starts at 0.5, and the token starts where the model would stop) or from the
    mean of all rows (``init="mean"``). Calling it again adds and changes nothing: the rows of tokens the
    tokenizer already held are left as the model has them (:func:`init_token_rows` sets them; ``build_model``
    calls it on every base model it prepares). A token that is
    already another entry of the vocabulary (``<|im_end|>``) raises :class:`~conftok.domains.DomainError`.

    Args:
        tokenizer: a Hugging Face tokenizer.
        model: the causal LM (before PEFT wrapping), or None to change the tokenizer only.
        tokens: token strings, e.g. ``["<C_READ>", "<U_READ>"]``; None (the default) adds the
            default domains' tokens, ``<C_READ>``, ``<U_READ>``, ``<C_MED>``, ``<U_MED>``.
        init: ``"end_of_turn"`` or ``"mean"``.

    Returns:
        token -> id for every token given.
    """
    if init not in ("end_of_turn", "mean"):
        raise ValueError(f"init must be 'end_of_turn' or 'mean', got {init!r}")
    if tokens is None:
        tokens = resolve_domains().tokens
    if isinstance(tokens, str):  # one string would be read letter by letter
        raise TypeError(f"tokens must be a list of token strings, got the string {tokens!r}")
    if not tokens:
        raise ValueError("no confidence tokens given")
    clashes = [clash for t in dict.fromkeys(tokens) if (clash := vocabulary_clash(tokenizer, t))]
    if clashes:
        raise DomainError("; ".join(clashes))
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens(
            [AddedToken(t, lstrip=True, rstrip=False, special=True, normalized=False) for t in new],
            special_tokens=True,
        )
    ids = token_ids(tokenizer, tokens)
    for t in tokens:
        encoded = tokenizer(f"x {t}", add_special_tokens=False)["input_ids"]
        assert encoded[-1] == ids[t], f"{t} does not encode as one id"
    if model is None or not new:
        return ids

    init_token_rows(model, tokenizer, [ids[t] for t in new], init)
    return ids


@torch.no_grad()
def init_token_rows(model, tokenizer, ids: Sequence[int], init: str = "end_of_turn") -> None:
    """Grow the embedding matrix if ``ids`` fall past it (never shrink) and set their input and
    output rows from the end-of-turn token's rows or the mean of the real tokens' rows.

    Deterministic, so a fresh base model prepared the same way matches the one an adapter was
    trained on (the adapter then restores the trained rows)."""
    if init not in ("end_of_turn", "mean"):
        raise ValueError(f"init must be 'end_of_turn' or 'mean', got {init!r}")
    ids = list(ids)
    embed = model.get_input_embeddings()
    if max(ids) >= embed.weight.shape[0]:
        # mean_resizing=False: rows are set below; no point paying for a covariance estimate.
        model.resize_token_embeddings(max(len(tokenizer), max(ids) + 1), mean_resizing=False)
        embed = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is None or output.weight is embed.weight
    if init == "end_of_turn":
        source = end_of_turn_token_id(tokenizer)
        embed.weight[ids] = embed.weight[source].clone()
        if not tied:
            output.weight[ids] = output.weight[source].clone()
    else:
        # Mean over the rows of real tokens only, not new or spare ones (Qwen2.5 pads its matrix).
        n = min(ids)
        embed.weight[ids] = embed.weight[:n].mean(0, keepdim=True).to(embed.weight.dtype)
        if not tied:
            output.weight[ids] = output.weight[:n].mean(0, keepdim=True).to(output.weight.dtype)
    if output is not None and getattr(output, "bias", None) is not None:
        output.bias[ids] = output.bias[source] if init == "end_of_turn" else output.bias[:min(ids)].mean()
