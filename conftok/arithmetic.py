"""Arithmetic questions of graded difficulty: the positive control for the confidence token.

BoolQ and MedQA cannot show whether the recipe learns *which* answers are right: a 135M model
answers "No" to nearly every yes/no question and "A" to most multiple-choice ones, so whether
it is right depends on the gold label alone. On small arithmetic the same model is right on some
questions and wrong on others, and which depends on the question (the operation, the numbers, the
wording) in a way its own hidden states carry (bench/README.md: a linear probe on them predicts
correctness). The project generates these questions itself: offline, no licence questions, as many
as a study needs, and new ones for a check that was never trained on.

Rows are the ``number`` task's raw rows: ``{"id", "question", "answer": int, "level"}``; the
domain asks them with "Answer with the number only." (``domains/read_med_math.yaml``).

Levels (``LEVELS``; measured on SmolLM2-135M-Instruct, greedy, bench/README.md):

- ``add_1d``, ``sub_1d``, ``mul_1d``: single-digit operands ("What is 7 + 5?", "Calculate 7 times 5."),
  each in several wordings; the model is right on roughly half of them.
- ``add_2d1d``, ``sub_teen``, ``add_3x1d``: a two-digit operand or three terms; the model is rarely
  right. They get a smaller share (``weight``) so that most of the signal lies within levels.

>>> rows = make_arithmetic_rows(3, seed=0)
>>> sorted(rows[0])
['answer', 'id', 'level', 'question']
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["LEVELS", "Level", "make_arithmetic_rows", "question_pool"]

_TEMPLATES = ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}.", "{a} {op} {b} = ?")


@dataclass(frozen=True)
class Level:
    """A family of questions: every (question, answer) it can produce, and its share of a draw."""

    name: str
    pool: Callable[[], list[tuple[str, int]]]
    weight: float


def _binary(pairs, words: tuple[str, ...], result: Callable[[int, int], int]) -> Callable[[], list[tuple[str, int]]]:
    def pool() -> list[tuple[str, int]]:
        return [(t.format(a=a, op=w, b=b), result(a, b)) for a, b in pairs for w in words for t in _TEMPLATES]
    return pool


def _three_terms() -> list[tuple[str, int]]:
    return [(f"What is {a} + {b} + {c}?", a + b + c) for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)]


_DIGITS = range(1, 10)
LEVELS: dict[str, Level] = {level.name: level for level in (
    Level("add_1d", _binary([(a, b) for a in _DIGITS for b in _DIGITS], ("+", "plus"), int.__add__), 1.0),
    Level("sub_1d", _binary([(a, b) for a in range(2, 10) for b in range(1, a)], ("-", "minus"), int.__sub__), 1.0),
    Level("mul_1d", _binary([(a, b) for a in range(2, 10) for b in range(2, 10)], ("x", "times", "*"), int.__mul__), 1.0),
    Level("add_2d1d", _binary([(a, b) for a in range(10, 100) for b in _DIGITS], ("+",), int.__add__), 1 / 3),
    Level("sub_teen", _binary([(a, b) for a in range(11, 19) for b in range(a - 9, 10)], ("-",), int.__sub__), 1 / 3),
    Level("add_3x1d", _three_terms, 1 / 3),
)}


def question_pool(levels: Collection[str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Every question each level can produce, in a fixed order."""
    names = list(LEVELS) if levels is None else list(levels)
    unknown = sorted(set(names) - set(LEVELS))
    if unknown:
        raise ValueError(f"unknown arithmetic level(s) {unknown}; known: {list(LEVELS)}")
    return {name: LEVELS[name].pool() for name in names}


def make_arithmetic_rows(n: int, seed: int, *, exclude: Collection[str] = (), levels: Collection[str] | None = None,
                         id_prefix: str = "math") -> list[dict[str, Any]]:
    """``n`` distinct arithmetic rows drawn by ``seed``, none of whose questions is in ``exclude``.

    Each row's level is drawn with the levels' weights, then a question of that level not drawn
    before; a level that runs out is dropped from the draw. Same (n, seed, exclude) -> same rows.
    Raises ``ValueError`` when the pool holds fewer than ``n`` unused questions.

    Train and evaluation parts that never share a question::

        train = make_arithmetic_rows(560, seed=0)
        held_out = make_arithmetic_rows(320, seed=1, exclude={r["question"] for r in train})
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    excluded = set(exclude)
    remaining: dict[str, list[tuple[str, int]]] = {}
    for name, pool in question_pool(levels).items():
        left = [q for q in pool if q[0] not in excluded]
        rng.shuffle(left)
        if left:
            remaining[name] = left
    available = sum(map(len, remaining.values()))
    if available < n:
        raise ValueError(f"asked for {n} arithmetic rows but only {available} unused questions are left")
    rows = []
    while len(rows) < n:
        names = list(remaining)
        name = rng.choices(names, weights=[LEVELS[k].weight for k in names])[0]
        question, answer = remaining[name].pop()
        if not remaining[name]:
            del remaining[name]
        rows.append({"id": f"{id_prefix}-{seed}-{len(rows):05d}", "question": question, "answer": answer, "level": name})
    return rows


def level_accuracy(records: list[Mapping[str, Any]], rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Share of right answers per level, for evaluation records in the order of ``rows``."""
    out: dict[str, list[bool]] = {}
    for rec, row in zip(records, rows):
        out.setdefault(row["level"], []).append(bool(rec["correct"]))
    return {k: sum(v) / len(v) for k, v in out.items()}
