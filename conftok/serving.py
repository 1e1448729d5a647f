"""Read p_confident from what an OpenAI-compatible server (vLLM, TGI) returns for a generated token.

A server does not hand out logits, but with ``logprobs=True, top_logprobs=k`` it lists the ``k``
most likely tokens of each generated step with their log-probabilities. At the step where the
confidence token was generated (the last step: the exported model stops there), C and U are
usually both among them, and

    p_confident = p(C) / (p(C) + p(U)) = 1 / (1 + exp(logprob(U) - logprob(C)))

which is what :func:`conftok.loss.p_confident` computes from the logits (the normalising constant
cancels). No model, tokenizer or torch is needed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from conftok.domains import Domain, resolve_domains

__all__ = ["p_confident_from_logprobs"]


def p_confident_from_logprobs(top_logprobs: "Mapping[str, float] | Iterable[Any]",
                              domain: "Domain | str | Sequence[str]", *, domains=None) -> float:
    """p(C) / (p(C) + p(U)) from the top log-probabilities a server returns for one generated token.

    Args:
        top_logprobs: one step's candidates, in any of the forms servers use:

            - a dict token -> logprob (vLLM and OpenAI completions: ``logprobs.top_logprobs[i]``);
            - a list of entries with ``token`` and ``logprob`` (OpenAI chat completions:
              ``logprobs.content[i].top_logprobs``; dicts or the ``openai`` client's objects);
            - a list of entries with ``text`` and ``logprob`` (TGI ``details.top_tokens[i]``).

            Tokens are compared after stripping surrounding whitespace. A token listed twice
            (two ids that decode alike) counts with the sum of its probabilities.
        domain: a :class:`~conftok.domains.Domain`, a domain name (``"read"``; looked up in
            ``domains``, the default domains unless given), or the pair of tokens
            ``("<C_READ>", "<U_READ>")`` (confident first).
        domains: where a domain name is looked up (a DomainSet, list or file; see
            :func:`~conftok.domains.resolve_domains`).

    Returns:
        p_confident in [0, 1]. When both tokens are listed it is exact. When only one is, the
        other did not make the top k, so its log-probability is at most the smallest listed one;
        it is taken to be that smallest value, which gives the value closest to 0.5 that the
        list allows: a lower bound on the true p_confident when C is listed (the truth is at least
        this), an upper bound when U is listed (the truth is at most this). The larger k, the
        tighter the bound; with ``top_logprobs=20`` the missing token is rarer than the 20th. That holds for
        a list of the top k alone (greedy decoding, or the chat API's ``top_logprobs``); a completions dict of a
        sampled step also lists the sampled token, which may be rarer than the missing one: no bound there.

    Raises:
        ValueError: when neither token is listed (ask for more ``top_logprobs``, or read the
            step where the confidence token was generated), when a log-probability is not a
            number or is NaN, or when the list is empty.

    Example (hand-computed): ``{"<C_READ>": log(0.6), "<U_READ>": log(0.2), "Yes": log(0.1)}``
    gives 0.6 / (0.6 + 0.2) = 0.75. ``{"<C_READ>": log(0.6), "Yes": log(0.1)}`` gives
    0.6 / (0.6 + 0.1) = 0.857..., a lower bound (p(U) <= 0.1).
    """
    confident, unconfident = _token_pair(domain, domains)
    listed = _read_candidates(top_logprobs)
    if not listed:
        raise ValueError("top_logprobs is empty: request logprobs=True with top_logprobs >= 2 "
                         "(vLLM: start the server with --max-logprobs 20 or more)")
    log_c, log_u = listed.get(confident), listed.get(unconfident)
    if log_c is None and log_u is None:
        shown = sorted(listed, key=listed.get, reverse=True)[:8]
        hint = ""
        if "" in listed:
            hint = (" Some tokens came back as '': servers that skip special tokens in their output also"
                    " blank them here; request with skip_special_tokens=False (vLLM: extra_body=).")
        raise ValueError(f"neither {confident} nor {unconfident} is among the {len(listed)} top log-probabilities "
                         f"(most likely: {shown}); read the step where the confidence token was generated, "
                         f"or ask for more top_logprobs.{hint}")
    floor = min(listed.values())
    if log_c is None:
        log_c = floor
    if log_u is None:
        log_u = floor
    if log_c == -math.inf and log_u == -math.inf:
        raise ValueError(f"both {confident} and {unconfident} have probability 0 (logprob -inf): "
                         "p_confident is undefined")
    # p(C) / (p(C) + p(U)) = sigmoid(log_c - log_u), written to never overflow exp().
    diff = log_c - log_u
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    return math.exp(diff) / (1.0 + math.exp(diff))


def _token_pair(domain, domains) -> tuple[str, str]:
    if isinstance(domain, Domain):
        return domain.tokens
    if isinstance(domain, str):
        return resolve_domains(domains).by_name(domain).tokens
    if isinstance(domain, Sequence) and len(domain) == 2 and all(isinstance(t, str) for t in domain):
        if domain[0] == domain[1]:
            raise ValueError(f"the confident and unconfident tokens must differ, got {list(domain)}")
        return domain[0], domain[1]
    raise TypeError(f"domain must be a Domain, a domain name or a (confident, unconfident) token pair, "
                    f"got {domain!r}")


def _read_candidates(top_logprobs) -> dict[str, float]:
    """token -> logprob from a dict, or a list of entries with token/text and logprob."""
    if isinstance(top_logprobs, Mapping):
        items = list(top_logprobs.items())
    elif isinstance(top_logprobs, (str, bytes)) or not isinstance(top_logprobs, Iterable):
        raise TypeError(f"top_logprobs must be a dict token -> logprob or a list of {{'token', 'logprob'}} "
                        f"entries, got {type(top_logprobs).__name__}")
    else:
        items = [_entry(e, i) for i, e in enumerate(top_logprobs)]
    out: dict[str, float] = {}
    for token, logprob in items:
        if not isinstance(token, str):
            raise TypeError(f"top_logprobs: token must be a string, got {token!r}")
        if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or math.isnan(logprob):
            raise ValueError(f"top_logprobs: logprob of {token!r} must be a number, got {logprob!r}")
        if logprob > 1e-6:
            raise ValueError(f"top_logprobs: logprob of {token!r} is {logprob!r}, above 0: not a log-probability")
        key = token.strip()
        out[key] = float(logprob) if key not in out else _logaddexp(out[key], float(logprob))
    return out


def _entry(entry, i: int) -> tuple[Any, Any]:
    get = entry.get if isinstance(entry, Mapping) else lambda k: getattr(entry, k, None)
    token = get("token")
    if token is None:
        token = get("text")  # TGI
    logprob = get("logprob")
    if token is None or logprob is None:
        raise ValueError(f"top_logprobs[{i}] needs 'token' (or 'text') and 'logprob', got {entry!r}")
    return token, logprob


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))
