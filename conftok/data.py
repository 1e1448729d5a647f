"""Tagged training data: ``{"question", "tagged_response", "dataset"}`` JSON lines.

Every row is checked when the file is read; all bad rows are reported together, each as
``FILE:LINE: field 'NAME': problem; what is allowed``. The file is UTF-8 without BOM; blank lines
are skipped (they count in the line numbers); extra fields are allowed. Labels are ``IGNORE_INDEX`` everywhere except the
confidence token, which is always the last position of an example.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from conftok.domains import TOKEN_PATTERN, DomainSet, resolve_domains
from conftok.inputs import MAX_REPORTED_PROBLEMS, InputError, line_problems, problems_message, read_json_lines
from conftok.prompts import encode_answer, encode_example, encode_prompt
from conftok.tokens import token_ids

__all__ = ["IGNORE_INDEX", "DataError", "TaggedRow", "read_tagged_rows", "ConfidenceDataset",
           "ConfidenceCollator", "split_tagged_response"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("question", "tagged_response", "dataset")
ROW_SHAPE = "each row is a JSON object with non-empty strings 'question', 'tagged_response' and 'dataset'"


class DataError(InputError):
    """A data file has bad rows; the message lists each as FILE:LINE: problem."""


@dataclass(frozen=True)
class TaggedRow:
    question: str
    answer: str
    token: str
    dataset: str
    domain: str
    line: int


@functools.lru_cache(maxsize=16)
def _token_finder(tokens: tuple[str, ...]) -> re.Pattern:
    """The domain set's own tokens (any form a domain may give them: ``<SURE_LAW>``) and anything shaped like a
    confidence token (``<C_X>``, to name tokens the domains lack); longest first."""
    return re.compile("|".join([*map(re.escape, sorted(tokens, key=len, reverse=True)), TOKEN_PATTERN.pattern]))


def split_tagged_response(response: str, domains: DomainSet, dataset: str) -> tuple[str, str]:
    """Split ``"Yes <C_READ>"`` into ``("Yes", "<C_READ>")``; raise ValueError saying what is wrong."""
    domain = domains.for_dataset(dataset)
    found = _token_finder(tuple(domains.tokens)).findall(response)
    known = [t for t in found if domains.for_token(t) is not None]
    expected = " or ".join(domain.tokens)
    if not known:
        extra = f" (found unknown token(s) {found})" if found else ""
        raise ValueError(f"no confidence token; expected {expected} at the end{extra}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} confidence tokens {found}; expected exactly one, {expected}, at the end")
    token = found[0]
    if token not in domain.tokens:
        other = domains.for_token(token)
        raise ValueError(f"token {token} belongs to domain {other.name!r}, but dataset {dataset!r} "
                         f"is in domain {domain.name!r} ({' / '.join(domain.tokens)})")
    answer, _, after = response.rpartition(token)
    if after.strip():
        raise ValueError(f"text after the confidence token: {after.strip()[:40]!r}; the token must end the response")
    answer = answer.strip()
    if not answer:
        raise ValueError(f"no answer before the confidence token; expected 'ANSWER {token}'")
    return answer, token


def read_tagged_rows(path: str | Path, domains: DomainSet | None = None) -> list[TaggedRow]:
    """Read and check every row of a tagged JSONL file; raise :class:`DataError` listing bad rows
    (:class:`~conftok.inputs.InputFileMissing`, a FileNotFoundError, when there is no file)."""
    domains = resolve_domains(domains)
    values, problems = read_json_lines(path, "tagged JSON lines file")
    rows = []
    for line_no, obj in values:
        try:
            rows.append(_parse_row(obj, line_no, domains))
        except ValueError as e:
            problems.append((line_no, str(e)))
    if problems:
        raise DataError(problems_message(path, line_problems(path, problems), "bad row(s)"))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or blank); {ROW_SHAPE}, one per line")
    return rows


def _parse_row(obj, line_no: int, domains: DomainSet) -> TaggedRow:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}; {ROW_SHAPE}")
    for name in REQUIRED_FIELDS:
        value = obj.get(name)
        if value is None:
            raise ValueError(f"field {name!r}: missing; {ROW_SHAPE}")
        if not isinstance(value, str):
            raise ValueError(f"field {name!r}: expected a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise ValueError(f"field {name!r}: empty; expected a non-empty string")
    dataset = obj["dataset"]
    try:
        domain = domains.for_dataset(dataset)
    except KeyError as e:
        raise ValueError(f"field 'dataset': {e.args[0]}") from None
    try:
        answer, token = split_tagged_response(obj["tagged_response"], domains, dataset)
    except ValueError as e:
        raise ValueError(f"field 'tagged_response': {e}") from None
    return TaggedRow(obj["question"], answer, token, dataset, domain.name, line_no)


class ConfidenceDataset(torch.utils.data.Dataset):
    """Tokenized tagged rows for the one-token loss.

    ``ds[i]`` is ``{"input_ids", "attention_mask", "labels", "answer_mask"}`` (1-D LongTensors of
    one length): chat prompt + answer + confidence token, labels ``IGNORE_INDEX`` everywhere but
    the last position (the token), ``answer_mask`` 1 on the answer's tokens (for the loss's
    placement and KL terms, which look at the positions that predict them). Questions are cut from
    the start to fit ``max_seq_length``; a row that does not fit even then (its answer and token
    alone are too long) is a :class:`DataError` naming each such line and the length it needs: a
    silently smaller training set is worse than a clear stop.

    Args:
        path: tagged JSONL file.
        tokenizer: tokenizer that already holds the domains' tokens (``add_confidence_tokens``).
        max_seq_length: longest example in tokens.
        domains: a :class:`DomainSet` or spec for :func:`resolve_domains`; defaults read/med.
    """

    def __init__(self, path, tokenizer, max_seq_length: int = 2048, domains=None):
        self.path = Path(path)
        self.domains = resolve_domains(domains)
        self.rows = read_tagged_rows(self.path, self.domains)
        ids = token_ids(tokenizer, self.domains.tokens)
        self.examples: list[tuple[list[int], int, int]] = []  # (ids without the token, token id, answer length)
        # The stored KL guard's reference per example, (ids, logp) of shape (answer length, k): set by
        # conftok.loss.attach_base_topk before training.
        self.base_topk: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.confidence_ids = sorted(ids.values())  # every domain's tokens (left out of the stored KL's reference)
        self.kept_rows: list[TaggedRow] = []
        self.truncated = 0
        skipped = []
        for row in self.rows:
            encoded = encode_example(tokenizer, row.question, row.answer, ids[row.token], max_seq_length)
            if encoded is None:
                skipped.append(row.line)
                continue
            prompt_ids, answer_ids, truncated = encoded
            self.truncated += truncated
            self.examples.append((prompt_ids + answer_ids, ids[row.token], len(answer_ids)))
            self.kept_rows.append(row)
        if skipped:
            # What each row needs at the least: its answer and token after the prompt of an empty question.
            empty_prompt = len(encode_prompt(tokenizer, ""))
            by_line = {row.line: row for row in self.rows}
            needs = [(line, empty_prompt + len(encode_answer(tokenizer, by_line[line].answer)) + 1) for line in skipped]
            problems = line_problems(self.path, [
                (line, f"field 'tagged_response': the answer and its token need {need} tokens with an empty "
                       f"question, more than max_seq_length={max_seq_length}") for line, need in needs])
            which = f"all {len(self.rows)} rows are" if not self.examples else f"{len(skipped)} of {len(self.rows)} rows are"
            raise DataError(f"{self.path}: {which} longer than max_seq_length={max_seq_length} even with the question "
                            f"cut; allowed: max_seq_length >= {max(need for _, need in needs)} (the longest such "
                            "row's need), or remove those rows:\n  " + "\n  ".join(problems[:MAX_REPORTED_PROBLEMS]))
        if self.truncated:
            logger.info("%s: cut the question of %d rows to fit max_seq_length=%d",
                        self.path, self.truncated, max_seq_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        context, token_id, answer_length = self.examples[i]
        input_ids = torch.tensor(context + [token_id], dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-1] = token_id
        answer_mask = torch.zeros_like(input_ids)
        answer_mask[-1 - answer_length:-1] = 1
        item = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "answer_mask": answer_mask}
        if self.base_topk is not None:
            item["base_topk_ids"], item["base_topk_logp"] = self.base_topk[i]
        return item

    def lengths(self) -> list[int]:
        """Tokens per example, token included (what ``ds[i]["input_ids"]`` holds), without building tensors."""
        return [len(context) + 1 for context, _, _ in self.examples]

    def token_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.kept_rows:
            counts[row.token] = counts.get(row.token, 0) + 1
        return counts


@dataclass
class ConfidenceCollator:
    """Pads a list of examples on the LEFT (so the token is every row's last position); nothing else."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "answer_mask": 0,
                "base_topk_ids": 0, "base_topk_logp": -1e4}  # log p = -1e4: probability 0, and no inf * 0
        batch = {}
        for key in examples[0]:
            # Sequences (and the stored base top-k, (answer length, k) a row) are padded at the front,
            # to the batch's longest: the ends line up, where the token and the answer are.
            length = max(len(e[key]) for e in examples)
            batch[key] = torch.stack([
                torch.cat([e[key].new_full((length - len(e[key]), *e[key].shape[1:]), fill[key]), e[key]])
                for e in examples
            ])
        return batch
