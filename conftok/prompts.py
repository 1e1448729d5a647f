"""One prompt format for tagging, training, validation and inference.

With a chat template the user turn is the question and the assistant turn is the answer then
the confidence token::

    <chat prompt(user=question), add_generation_prompt=True> + answer + <C_X>

Tokenizers without a chat template fall back to the plain format::

    "Question: {question}\\nAnswer:" + " " + answer + <C_X>

The answer and token are tokenized apart from the prompt, exactly as a generation that starts
from the prompt's ids produces them, so the supervised position in training is the one the model
sees at validation time. The tokens absorb a preceding space (``lstrip=True``), so
``"Yes <C_READ>"`` is ``Yes`` then ``<C_READ>``.
"""

from __future__ import annotations

__all__ = ["PLAIN_PROMPT", "has_chat_template", "render_prompt", "encode_prompt", "encode_answer",
           "encode_example"]

PLAIN_PROMPT = "Question: {question}\nAnswer:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, question: str) -> str:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def encode_prompt(tokenizer, question: str) -> list[int]:
    # The rendered template already holds BOS where the model wants one.
    ids = tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    if not has_chat_template(tokenizer) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    text = answer.strip()
    if not has_chat_template(tokenizer):
        text = " " + text  # the plain prompt ends with "Answer:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, question: str, answer: str, token_id: int, max_length: int):
    """Token ids of prompt + answer + confidence token, at most ``max_length`` long.

    Truncation cuts the question from its start (a passage's head goes first, the question and
    options at its end stay), never the answer or the token. Returns ``(prompt_ids, answer_ids,
    truncated)`` (the token is appended by the caller), or None when even an empty question does
    not fit.
    """
    answer_ids = encode_answer(tokenizer, answer)
    prompt_ids = encode_prompt(tokenizer, question)
    budget = max_length - len(answer_ids) - 1
    if len(prompt_ids) <= budget:
        return prompt_ids, answer_ids, False
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    keep = max(len(q_ids) - (len(prompt_ids) - budget), 0)
    # Re-tokenizing a decoded slice can merge differently at the cut; shrink until it fits, down to no
    # question at all (which fits exactly when the budget is the empty prompt's length).
    while True:
        prompt_ids = encode_prompt(tokenizer, tokenizer.decode(q_ids[len(q_ids) - keep:]))
        excess = len(prompt_ids) - budget
        if excess <= 0:
            return prompt_ids, answer_ids, True
        if keep == 0:
            return None
        keep = max(keep - excess, 0)
