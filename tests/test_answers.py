"""Answer extraction: yes/no and option letters from model-style text, ground-truth normalisers."""

from __future__ import annotations

import pytest

from conftok.answers import (
    normalize_option_label,
    normalize_yes_no_label,
    parse_option_letter,
    parse_yes_no,
)

OPTIONS = {
    "A": "Medication",
    "B": "Gentamicin",
    "C": "Ceftriaxone",
    "D": "Iron deficiency anemia",
}


class TestAnswerExtraction:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("Yes", "yes"),
            ("no.", "no"),
            ("Yes, because the passage says it was founded in 1820.", "yes"),
            ("True", "yes"),
            ("FALSE", "no"),
            (" yes", "yes"),
            ("**Yes**", "yes"),
            ("Answer: No", "no"),
            ("The answer is yes.", "yes"),
            ("Yes <C_READ>", "yes"),
            ("No<U_READ><|im_end|>", "no"),
            ("No, it is not mentioned.", "no"),
            ("It is not true that the river is longer.", "no"),
            ("That is not false.", "yes"),
            ("There is no evidence against it, so yes.", "yes"),  # determiner "no" skipped
            ("Yes or no: the answer is no", "no"),  # an explicit answer wins
            ("Yes. No wait, no.", "yes"),  # the first decision is the committed one
        ],
    )
    def test_parse_yes_no(self, text, expected):
        assert parse_yes_no(text) == expected

    @pytest.mark.parametrize(
        "text",
        ["maybe", "", "   ", "<C_READ>", "yes or no?", "True/False", "I cannot tell.",
         "There is no answer in the passage", "Nonetheless, knowing it", "The answer is yes or no",
         "Answer: No/Yes"],
    )
    def test_parse_yes_no_none(self, text):
        assert parse_yes_no(text) is None

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("C", "C"),
            ("c", "C"),
            ("(B)", "B"),
            ("B)", "B"),
            ("A: Medication", "A"),
            ("A. Medication", "A"),
            ("The answer is D", "D"),
            ("Answer: (c)", "C"),
            ("**C**<C_MED>", "C"),
            ("The correct option is (B).", "B"),
            ("I choose (b)", "B"),
            ("B is correct", "B"),
            ("Option C is right", "C"),
            ("so the drug given was (C).", "C"),
            ("A 45-year-old man. The answer is C", "C"),
        ],
    )
    def test_parse_option_letter(self, text, expected):
        assert parse_option_letter(text, OPTIONS) == expected
        assert parse_option_letter(text) == expected

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("Ceftriaxone", "C"),
            ("  ceftriaxone. ", "C"),
            ("The patient was given gentamicin.", "B"),
            ("Iron-deficiency anemia", "D"),  # punctuation normalised
            ("iron deficiency", "D"),  # answer contained in the option text
            ("A Medication", "A"),  # bare letter followed by its own option text
        ],
    )
    def test_option_text_only(self, text, expected):
        assert parse_option_letter(text, OPTIONS) == expected

    def test_option_text_needs_options(self):
        assert parse_option_letter("Ceftriaxone") is None

    def test_option_text_ambiguous_is_none(self):
        options = {"A": "Vitamin B1", "B": "Vitamin B12", "C": "Iron", "D": "Zinc"}
        assert parse_option_letter("vitamin", options) is None  # inside two options
        assert parse_option_letter("Vitamin B12", options) == "B"  # exact, not b1

    def test_widest_contained_option_wins(self):
        options = {"A": "Iron", "B": "Iron deficiency anemia", "C": "Zinc", "D": "Scurvy"}
        assert parse_option_letter("This is iron deficiency anemia.", options) == "B"

    @pytest.mark.parametrize(
        "text",
        [
            "A 45-year-old man presents with fever.",
            "Answer: A 45-year-old man",
            "A patient like this needs rest",
            "The answer is a beta blocker",
        ],
    )
    def test_article_a_is_not_a_letter(self, text):
        assert parse_option_letter(text, OPTIONS) is None
        assert parse_option_letter(text) is None

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("A. Gentamicin\nB.", None),  # a restated option list is no choice
            ("A. Medication\nB. Gentamicin\nC. Ceftriaxone", None),
            ("(A) Medication\n(B) Gentamicin", None),
            ("A. Medication\nB. Gentamicin\n\nThe correct answer is B", "B"),
            ("C.\n\nThe answer is C because", "C"),
            ("A. Medication\n\nThe correct answer is", "A"),  # one line: a choice
        ],
    )
    def test_restated_option_list(self, text, expected):
        assert parse_option_letter(text, OPTIONS) == expected

    NUTRIENTS = {"A": "Iron", "B": "Folate", "C": "Vitamin B12", "D": "Zinc"}

    @pytest.mark.parametrize("text, expected", [
        ("B\nExplanation: the patient has no iron deficiency", "B"),  # was A, from "iron" in the explanation
        ("The answer is C\nThis patient lacks iron", "C"),
        ("Answer: B\nBecause", "B"),
        ("(D)\nZinc is needed for wound healing", "D"),
        ("A\nB\nC\nD", None),  # the letters restated, one a line: no choice
    ])
    def test_a_letter_alone_on_its_line(self, text, expected):
        assert parse_option_letter(text, self.NUTRIENTS) == expected

    @pytest.mark.parametrize("text, expected", [
        ("A. Folate", None), ("(A) Folate", None), ("The answer is A: Vitamin B12 deficiency", None),
        ("B. Folate", "B"), ("B. Folate, because the smear shows", "B"), ("A. Iron deficiency", "A"),
        ("C. Vitamin B12", "C"), ("A. Something else entirely", "A"),
    ])
    def test_a_letter_with_another_options_text_is_no_choice(self, text, expected):
        assert parse_option_letter(text, self.NUTRIENTS) == expected

    @pytest.mark.parametrize("text, expected", [
        ("B. Folate\n\nA. Iron is wrong because", "B"),  # a choice, then another option's explanation
        ("B\n\nA. Iron is stored as ferritin", "B"),
        ("C. Vitamin B12\nA. Iron\nB. Folate", "C"),
        ("A. Iron\nB. Folate", None), ("B. Folate\nC. Vitamin B12", None),  # in order: the list restated
    ])
    def test_option_lines_out_of_order_are_a_choice_and_explanations(self, text, expected):
        assert parse_option_letter(text, self.NUTRIENTS) == expected

    @pytest.mark.parametrize("text, expected", [
        ("It's C", "C"), ("I'd go with C.", "C"), ("So, B.", "B"), ("I think it's B.", "B"), ("It is D!", "D"),
        ("Treat it with a", None), ("So, F.", None), ("A patient like this, B.", None), ("Either A, or it's B", None),
    ])
    def test_a_capital_letter_closing_the_answer(self, text, expected):
        assert parse_option_letter(text, self.NUTRIENTS) == expected

    @pytest.mark.parametrize("text", ["A, B, C or D", "B, C and D", "D, E.", "A, B"])
    def test_listed_letters_are_no_choice(self, text):
        assert parse_option_letter(text, {**self.NUTRIENTS, "E": "Copper"}) is None

    def test_a_contained_and_a_containing_option_together_widest_wins(self):
        """"iron deficiency" contains option A's text and is contained in B's: of the two, B, whose text holds A's."""
        options = {"A": "Iron", "B": "Iron deficiency anemia", "C": "Zinc", "D": "Scurvy"}
        assert parse_option_letter("iron deficiency", options) == "B"

    def test_letters_must_be_option_keys(self):
        options = {"A": "x", "B": "y", "C": "z", "D": "w"}
        assert parse_option_letter("E", options) is None
        assert parse_option_letter("E") == "E"  # A-E without options
        assert parse_option_letter("F") is None
        assert parse_option_letter("(e)", {"a": "x", "e": "y"}) == "E"  # keys any case

    @pytest.mark.parametrize("text", ["", "I am not sure", "(A) or (B)", "<C_MED>"])
    def test_parse_option_letter_none(self, text):
        assert parse_option_letter(text, OPTIONS) is None

    @pytest.mark.parametrize(
        ("value", "expected"),
        [(True, "yes"), (False, "no"), ("true", "yes"), ("FALSE", "no"), (" Yes ", "yes"),
         ("no", "no"), (1, "yes"), (0, "no"), ("1", "yes"), ("0", "no")],
    )
    def test_normalize_yes_no_label(self, value, expected):
        assert normalize_yes_no_label(value) == expected

    def test_normalize_yes_no_label_numpy(self):
        np = pytest.importorskip("numpy")
        assert normalize_yes_no_label(np.bool_(True)) == "yes"
        assert normalize_yes_no_label(np.int64(0)) == "no"

    @pytest.mark.parametrize("value", ["maybe", "", 2, -1, 0.5, None, "y", ["yes"]])
    def test_normalize_yes_no_label_errors(self, value):
        with pytest.raises(ValueError, match="yes/no label") as excinfo:
            normalize_yes_no_label(value)
        assert repr(value) in str(excinfo.value)

    @pytest.mark.parametrize(
        ("value", "expected"), [("c", "C"), ("(C)", "C"), ("C", "C"), (" b. ", "B"), ("D)", "D")]
    )
    def test_normalize_option_label(self, value, expected):
        assert normalize_option_label(value) == expected

    def test_normalize_option_label_with_options(self):
        assert normalize_option_label("d", OPTIONS) == "D"
        with pytest.raises(ValueError, match="'E'.*A, B, C, D"):
            normalize_option_label("E", OPTIONS)

    @pytest.mark.parametrize("value", ["Ceftriaxone", "AB", "", "1", 3, None, "F"])
    def test_normalize_option_label_errors(self, value):
        with pytest.raises(ValueError, match="option label") as excinfo:
            normalize_option_label(value)
        assert repr(value) in str(excinfo.value)
