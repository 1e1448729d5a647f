"""Inference: answer a question, emit the confidence token, and decide whether to trust it.

    from conftok import load_adapter, predict
    model, tokenizer, domains = load_adapter("checkpoints/qwen_confidence/best_calibration", bf16=True)
    p = predict(model, tokenizer, {"question": "is the sky blue", "passage": "The sky is blue."}, "boolq",
                domains=domains, threshold=0.7)
    print(p.answer, p.token, round(p.p_confident, 3), p.decision)   # yes <C_READ> 0.912 answer
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from conftok.domains import resolve_domains
from conftok.evaluate import generate
from conftok.prompts import encode_prompt

__all__ = ["Prediction", "predict"]


@dataclass(frozen=True)
class Prediction:
    """One answer with its confidence.

    Attributes:
        response: the generated answer text (without the token).
        answer: the parsed answer ("yes"/"no", an option letter) or None when unreadable.
        token: the confidence token the model emitted, or None.
        p_confident: p(C) / (p(C) + p(U)) right after the answer.
        decision: "answer" when p_confident >= threshold, else "route" (send to a stronger model,
            or abstain).
    """

    response: str
    answer: str | None
    token: str | None
    p_confident: float
    decision: str
    domain: str


@torch.no_grad()
def predict(model, tokenizer, question: "str | Mapping[str, Any]", dataset: str, *, domains=None,
            threshold: float = 0.5, max_new_tokens: int = 16) -> Prediction:
    """Answer ``question`` (user-turn text, or a raw row the domain knows how to ask, e.g.
    ``{"question", "passage"}`` or ``{"question", "options"}``) from data set ``dataset``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    domain = resolve_domains(domains).for_dataset(dataset)
    row = question if isinstance(question, Mapping) else {"question": question}
    text = domain.build_question(row) if isinstance(question, Mapping) else question
    prompt = encode_prompt(tokenizer, text)
    c_id, u_id = tokenizer.convert_tokens_to_ids(list(domain.tokens))
    was_training = model.training
    model.eval()
    try:
        gen = generate(model, tokenizer, [prompt], stop_tokens=resolve_domains(domains).tokens,
                       max_new_tokens=max_new_tokens,  # the answer's budget; the token gets a step more
                       batch_size=1, progress=False, score_ids=(c_id, u_id))[0]
        p = gen.p_confident  # read after the answer, a cut one included
    finally:
        model.train(was_training)
    answer = domain.parse_answer(gen.text, row)
    return Prediction(gen.text, answer, gen.stop_token, float(p), "answer" if p >= threshold else "route", domain.name)
