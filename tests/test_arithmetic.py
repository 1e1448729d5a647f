"""The arithmetic positive control: its generator, the number task and the three-domain file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftok.answers import normalize_number_label, parse_number
from conftok.arithmetic import LEVELS, make_arithmetic_rows, question_pool
from conftok.domains import load_domains_file

DOMAINS_FILE = Path(__file__).resolve().parent.parent / "domains" / "read_med_math.yaml"


@pytest.mark.parametrize("text, expected", [
    ("12", "12"), ("12.", "12"), ("7 + 5 = 12", "12"), ("The answer is 15 <C_MATH>", "15"), ("**42**", "42"),
    ("The sum is 1,234.", "1234"), ("-3", "-3"), ("5 + 7 equals 12", "12"), ("12.0", "12"),
    ("3 - 1 is 2.", "2"), ("7 minus 5 is 2", "2"), ('The answer is "11"', "11"), ("Answer: (7)", "7"),
    ("26 + 3 = 5\n\nThe answer is 5", "5"),
    ("2.5", None), ("To solve this problem, we need to", None), ("", None), ("x2 is", None),
    ("12345678901234567890", "12345678901234567890"), ("-0", "0"), ("1,000.00", "1000"),  # exact: no float
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("value, expected", [(12, "12"), ("12", "12"), (" 012 ", "12"), (-3, "-3"), (4.0, "4")])
def test_number_label(value, expected):
    assert normalize_number_label(value) == expected


@pytest.mark.parametrize("value", [True, 2.5, "twelve", "1 2", None, [3]])
def test_number_label_rejects(value):
    with pytest.raises(ValueError, match="not an integer"):
        normalize_number_label(value)


def test_pool_answers_are_right():
    for name, pool in question_pool().items():
        for question, answer in pool[:: max(1, len(pool) // 50)]:
            expr = question.replace("What is", "").replace("Calculate", "").replace("Compute", "").rstrip("?.= ")
            expr = expr.replace(" plus ", "+").replace(" minus ", "-").replace(" times ", "*").replace(" x ", "*")
            assert eval(expr) == answer, (name, question)  # noqa: S307 - digits and + - * only


def test_rows_are_distinct_deterministic_and_disjoint():
    train = make_arithmetic_rows(300, seed=0)
    assert train == make_arithmetic_rows(300, seed=0)
    assert len({r["question"] for r in train}) == 300
    held_out = make_arithmetic_rows(200, seed=1, exclude={r["question"] for r in train})
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    assert {r["level"] for r in train} == set(LEVELS)
    assert make_arithmetic_rows(50, seed=2) != make_arithmetic_rows(50, seed=3)


def test_too_many_rows_is_an_error():
    with pytest.raises(ValueError, match="only 288 unused"):
        make_arithmetic_rows(289, seed=0, levels=["sub_1d"])
    with pytest.raises(ValueError, match="unknown arithmetic level"):
        make_arithmetic_rows(1, seed=0, levels=["division"])


def test_math_domain_from_file():
    domains = load_domains_file(DOMAINS_FILE)
    assert [d.name for d in domains] == ["read", "med", "math"]
    math = domains.for_dataset("arithmetic")
    assert math.tokens == ("<C_MATH>", "<U_MATH>")
    row = {"question": "What is 7 + 5?", "answer": 12}
    assert math.build_question(row) == "What is 7 + 5?\nAnswer with the number only."
    assert math.gold_answer(row) == "12"
    assert math.parse_answer("7 + 5 = 12", row) == "12"
    assert math.parse_answer("7 + 5 = 13", row) != math.gold_answer(row)


def test_math_rows_train_through_the_dataset(tmp_path, tokenizer):
    """A tagged arithmetic file reads and tokenizes with no change to the training code."""
    from conftok.data import ConfidenceDataset
    from conftok.tokens import add_confidence_tokens
    from conftest import write_jsonl

    domains = load_domains_file(DOMAINS_FILE)
    add_confidence_tokens(tokenizer, None, tokens=domains.tokens)
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"question": "What is 2 + 2?\nAnswer with the number only.", "tagged_response": "4 <C_MATH>", "dataset": "arithmetic"},
        {"question": "What is 9 x 9?\nAnswer with the number only.", "tagged_response": "18 <U_MATH>", "dataset": "arithmetic"},
    ])
    ds = ConfidenceDataset(path, tokenizer, 128, domains=domains)
    assert ds.token_counts() == {"<C_MATH>": 1, "<U_MATH>": 1}
