"""Demo data: deterministic, well-formed, balanced, train/val disjoint, answers consistent."""

from __future__ import annotations

import collections
import json
import re

import pytest

from conftok.demo_data import DEMO_FILES, make_boolq_rows, make_medqa_rows, write_demo_data

N = 200
BEHAVIOURS = "|".join(
    ["migrate in winter", "hibernate", "lay eggs", "live in groups", "hunt at night",
     "build nests", "change colour with the seasons", "dig burrows"]
)


def _born_died(passage: str) -> tuple[int, int]:
    born = int(re.search(r"in (\d{4})\.", passage).group(1))
    return born, int(re.search(r"death in (\d{4})", passage).group(1))


@pytest.fixture(scope="module")
def boolq():
    return {split: make_boolq_rows(N, seed=0, split=split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def medqa():
    return {split: make_medqa_rows(N, seed=0, split=split) for split in ("train", "val")}


class TestDemoData:
    def test_deterministic(self, boolq, medqa):
        assert make_boolq_rows(N, seed=0) == boolq["train"]
        assert make_medqa_rows(N, seed=0, split="val") == medqa["val"]
        assert make_boolq_rows(N, seed=1) != boolq["train"]
        assert make_medqa_rows(N, seed=1) != medqa["train"]

    def test_prefix_stable(self, boolq):
        # A smaller n is not a prefix (answers are balanced per n) but is still deterministic.
        assert make_boolq_rows(7, seed=3) == make_boolq_rows(7, seed=3)
        assert make_boolq_rows(0) == [] and make_medqa_rows(0) == []

    def test_boolq_schema(self, boolq):
        for split, rows in boolq.items():
            assert len(rows) == N
            for i, row in enumerate(rows, start=1):
                assert set(row) == {"id", "question", "passage", "title", "answer"}
                assert isinstance(row["answer"], bool)
                assert row["question"] == row["question"].lower() and not row["question"].endswith("?")
                assert row["passage"] and row["title"]
                prefix = "demo-boolq-" if split == "train" else "demo-boolq-v"
                assert row["id"] == f"{prefix}{i:04d}"

    def test_medqa_schema(self, medqa):
        for split, rows in medqa.items():
            for i, row in enumerate(rows, start=1):
                assert set(row) == {"id", "question", "options", "answer"}
                assert list(row["options"]) == ["A", "B", "C", "D"]
                assert row["answer"] in row["options"]
                assert all(isinstance(t, str) and t for t in row["options"].values())
                prefix = "demo-medqa-" if split == "train" else "demo-medqa-v"
                assert row["id"] == f"{prefix}{i:04d}"

    def test_boolq_answers_balanced(self, boolq):
        for rows in boolq.values():
            assert sum(row["answer"] for row in rows) == N // 2
        odd = make_boolq_rows(11, seed=5)
        assert sum(row["answer"] for row in odd) in (5, 6)

    def test_boolq_uses_every_template(self, boolq):
        # Each template has its own passage opening; all of them show up in 200 rows.
        openings = ["is a small town", "is found in the", "runs a small farm", "both rise in",
                    "was invented by", "are a football club", "was a painter"]
        for opening in openings:
            assert any(opening in row["passage"] for row in boolq["train"]), opening

    def test_medqa_letters_uniform(self, medqa):
        for rows in medqa.values():
            counts = collections.Counter(row["answer"] for row in rows)
            assert counts == {"A": N // 4, "B": N // 4, "C": N // 4, "D": N // 4}

    def test_medqa_correct_option_once(self, medqa):
        for rows in medqa.values():
            for row in rows:
                texts = [t.lower() for t in row["options"].values()]
                assert len(set(texts)) == 4, row  # distractors distinct from each other
                assert texts.count(row["options"][row["answer"]].lower()) == 1

    def test_medqa_questions_unique_until_exhausted(self, medqa):
        questions = [row["question"] for row in medqa["val"][:40]]
        assert len(set(questions)) == len(questions)

    def test_train_val_disjoint(self, boolq, medqa):
        for rows in (boolq, medqa):
            train = {row["question"] for row in rows["train"]}
            val = {row["question"] for row in rows["val"]}
            assert not train & val
        # BoolQ questions are unique within a split too.
        assert len({row["question"] for row in boolq["train"]}) == N

    def test_boolq_names_disjoint(self, boolq):
        def names(rows):
            return {row["title"] for row in rows}

        assert not names(boolq["train"]) & names(boolq["val"])

    def test_boolq_answers_follow_from_passage(self, boolq):
        # Re-derive the answers of the questions that a regex can check.
        checked = 0
        for row in boolq["train"] + boolq["val"]:
            p, q = row["passage"], row["question"]
            if m := re.match(r"was .+ founded before (\d+)$", q):
                year = int(re.search(r"founded in (\d+)", p).group(1))
                assert (year < int(m.group(1))) == row["answer"], row
            elif m := re.match(r"does .+ have more than ([\d,]+) inhabitants$", q):
                people = int(re.search(r"about ([\d,]+) inhabitants", p).group(1).replace(",", ""))
                assert (people > int(m.group(1).replace(",", ""))) == row["answer"], row
            elif m := re.match(r"is the (\w+) river longer than the (\w+)$", q):
                km = {n.lower(): int(k) for n, k in re.findall(r"(\w+)(?: is|, at) (\d+) kilometres", p)}
                assert (km[m.group(1)] > km[m.group(2)]) == row["answer"], row
            elif m := re.match(r"does .+ still have more than (\d+) (\w+)$", q):
                kept = int(re.search(rf"(\d+) {m.group(2)}", p).group(1))
                sold = int(re.search(r"sold (\d+)", p).group(1))
                assert (kept - sold > int(m.group(1))) == row["answer"], row
            elif m := re.match(r"was (.+) older than (\d+) at death$", q):
                born, died = _born_died(p)
                assert (died - born > int(m.group(2))) == row["answer"], row
            elif m := re.match(rf"does the .+? (never )?({BEHAVIOURS})$", q):
                verb, rest = (m.group(2) + " ").split(" ", 1)
                assert m.group(2) in p or f"{verb}s {rest}".strip() in p, row  # it is stated
                does = f"does not {m.group(2)}" not in p
                assert (does if m.group(1) is None else not does) == row["answer"], row
            elif m := re.match(r"does .+ keep more (\w+) than (\w+)$", q):
                first, second = (int(re.search(rf"(\d+) {k}", p).group(1)) for k in m.groups())
                assert (first > second) == row["answer"], row
            elif m := re.match(r"did .+ live in \w+ for more than (\d+) years$", q):
                born, died = _born_died(p)
                moved_at = int(re.search(r"age of (\d+)", p).group(1))
                assert (died - born - moved_at > int(m.group(1))) == row["answer"], row
            else:
                continue
            checked += 1
        assert checked > 100

    def test_write_demo_data(self, tmp_path):
        paths = write_demo_data(tmp_path / "demo", n_train=12, n_val=5, seed=0)
        assert set(paths) == set(DEMO_FILES)
        for name, path in paths.items():
            assert path.name == DEMO_FILES[name]
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(rows) == (12 if name.endswith("train") else 5)
        written = [json.loads(x) for x in paths["medqa_val"].read_text().splitlines()]
        assert written == make_medqa_rows(5, 0, split="val")
        assert not list((tmp_path / "demo").glob(".*tmp"))  # no temp files left behind
        # Rewriting replaces the files, it does not append.
        write_demo_data(tmp_path / "demo", n_train=3, n_val=2)
        assert len(paths["boolq_train"].read_text().splitlines()) == 3

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="split must be one of"):
            make_boolq_rows(3, split="test")
        with pytest.raises(ValueError, match="n must be >= 0, got -1"):
            make_medqa_rows(-1)
