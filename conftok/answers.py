"""Answer extraction: read a yes/no or an option letter out of a model's free-text answer.

The tagger and the validator both need to decide whether a generated answer is right, so the
rules live here, in one place, as pure functions (``re`` only). Parsers return ``None`` when
the text holds no answer or an ambiguous one; an unparseable answer is then counted as wrong,
never guessed. The ground-truth normalisers are strict instead: a label that is not one of the
allowed forms is a data error and raises ``ValueError``.

Rules, in brief (the docstrings give the details):

* Trailing special tokens (``<C_READ>``, ``<|im_end|>``, ...) and markdown emphasis are
  removed first.
* yes/no: the FIRST decision word (yes, no, true, false) decides; an explicit "answer is X"
  wins over it; "yes or no" / "true/false" as the first decision is ambiguous (``None``).
* option letter: an explicit letter (leading, after "answer"/"option", or in parentheses)
  wins; otherwise the option text is matched. A bare letter followed by more words counts only
  when those words are its own option text, so the article in "A 45-year-old man ..." is not
  read as option A.
* number: the number after the last "=", "is", "equals" or "answer:" wins; otherwise the first
  number in the text ("12", "12.", "The sum is 12"); thousands separators are allowed ("1,234").
"""

from __future__ import annotations

import numbers
import re
import string
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_OPTION_LETTERS",
    "normalize_number_label",
    "normalize_option_label",
    "normalize_yes_no_label",
    "parse_number",
    "parse_option_letter",
    "parse_yes_no",
]

DEFAULT_OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")

# One or more `<...>` tokens (no spaces inside) at the very end: confidence tokens, `<|im_end|>`.
_TRAILING_TOKENS = re.compile(r"(?:\s*<[^<>\s]+>)+\s*$")
# Markdown emphasis and code marks that models wrap answers in: **Yes**, __B__, `C`.
_MARKDOWN = re.compile(r"[*_`#]+")

_YES_WORDS = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_DECISION = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
# An explicit statement of the answer: "answer is no", "Answer: yes", "final answer - true".
_ANSWER_IS_DECISION = re.compile(
    r"\banswer\s*(?:is|would\s+be|:|-|=)\s*[\"'(]*\s*(yes|no|true|false)\b", re.IGNORECASE
)
# "yes or no", "yes/no", "true or false": a restatement of the question, not an answer.
_DISJUNCTION_AFTER = re.compile(r"\s*(?:or|/|\|)\s*(yes|no|true|false)\b", re.IGNORECASE)
_CLAUSE_START = re.compile(r"(?:^|[.!?:;,\n\"'(])\s*$")
_WORD_NEXT = re.compile(r"\s+[A-Za-z]")
_NOT_BEFORE = re.compile(r"\bnot\s+$", re.IGNORECASE)


def _clean(text: str) -> str:
    """Drop trailing special tokens and markdown marks; collapse surrounding whitespace."""
    text = _TRAILING_TOKENS.sub("", text)
    return _MARKDOWN.sub("", text).strip()


def _is_determiner_no(text: str, match: re.Match[str]) -> bool:
    """True for the "no" of "there is no evidence": inside a clause and followed by a word.

    "No it is not" (clause start) and "I think no." (followed by punctuation) stay answers.
    """
    if match.group(1).lower() != "no":
        return False
    at_clause_start = _CLAUSE_START.search(text[: match.start()]) is not None
    return not at_clause_start and _WORD_NEXT.match(text, match.end()) is not None


def parse_yes_no(text: str) -> str | None:
    """Read "yes" or "no" from a free-text answer; ``None`` when there is none or it is ambiguous.

    Rule: trailing ``<...>`` tokens and markdown marks are removed; then

    1. an explicit "answer is X" / "Answer: X" anywhere decides (unless X is joined to another
       decision word, as in 3);
    2. otherwise the first decision word (yes, no, true, false; whole words, any case) decides,
       with true = yes and false = no; "not true" reads as no and "not false" as yes; a "no"
       inside a clause and followed by a word is a determiner ("there is no evidence, so yes")
       and is skipped;
    3. if that first decision word is joined to another one by "or" or "/" ("yes or no",
       "True/False"), the text restates the question and the result is ``None``.

    A later contradiction ("Yes. No wait, no") does not count: the first decision is the
    answer the model committed to, which is what the confidence token is about.

    >>> parse_yes_no("Yes, because the passage says so.")
    'yes'
    >>> parse_yes_no("The answer is FALSE.")
    'no'
    >>> parse_yes_no("yes or no?") is None
    True
    """
    cleaned = _clean(text)
    if not cleaned:
        return None
    explicit = _ANSWER_IS_DECISION.search(cleaned)
    if explicit is not None:
        # "The answer is yes or no": offered, not chosen, as in rule 3
        return None if _DISJUNCTION_AFTER.match(cleaned, explicit.end()) else _YES_WORDS[explicit.group(1).lower()]
    first = next((m for m in _DECISION.finditer(cleaned) if not _is_determiner_no(cleaned, m)), None)
    if first is None:
        return None
    if _DISJUNCTION_AFTER.match(cleaned, first.end()):
        return None
    value = _YES_WORDS[first.group(1).lower()]
    word = first.group(1).lower()
    if word in ("true", "false") and _NOT_BEFORE.search(cleaned[: first.start()]):
        value = "no" if value == "yes" else "yes"
    return value


def _normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: "Vitamin B12." -> "vitamin b12"."""
    table = str.maketrans({c: " " for c in string.punctuation})
    return " ".join(text.lower().translate(table).split())


def _contains_phrase(haystack: str, needle: str) -> bool:
    """Whole-word containment of normalised texts ("b1" is not inside "b12")."""
    return f" {needle} " in f" {haystack} "


def _allowed_letters(options: Mapping[str, str] | None) -> tuple[str, ...]:
    if options is None:
        return DEFAULT_OPTION_LETTERS
    return tuple(str(key).strip().upper() for key in options)


def _option_texts(options: Mapping[str, str] | None) -> dict[str, str]:
    """Letter -> normalised option text (empty texts dropped: they can match nothing)."""
    if not options:
        return {}
    texts = {str(key).strip().upper(): _normalize_text(str(value)) for key, value in options.items()}
    return {letter: text for letter, text in texts.items() if text}


# Words that may follow a bare upper-case letter and still make it an answer: "B is correct".
_LETTER_VERBS = re.compile(r"\s+(?:is|was|would|seems|appears|because)\b|\s*[-\u2013\u2014]\s")
_LEADING_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answers?|options?|choices?)\b"
    r"(?:\s+is|\s+would\s+be)?\s*[:=\-]?\s*(?:option\s+|choice\s+)?)?",
    re.IGNORECASE,
)
_MARKER = re.compile(
    r"\b(?:answers?|options?|choices?)\b(?:\s+is|\s+would\s+be)?\s*[:=\-]?\s*(?:option\s+|choice\s+)?"
    r"|\b(?:choose|select|pick)\s+(?:option\s+|choice\s+)?",
    re.IGNORECASE,
)
_LETTER_AT = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]|([A-Za-z])(?![A-Za-z0-9'\-])")
# "(A) or (B)", "A/B": two letters offered, none chosen.
_LETTER_DISJUNCTION = re.compile(r"\s*(?:or|/)\s*[(\[]?\s*[A-Za-z]\s*[)\]]?(?![A-Za-z])", re.IGNORECASE)
# "A, B, C or D", "B, C and E", "D, E.": letters listed, none chosen (upper case: "A, a 45-year-old ..." is a choice).
_LETTER_LIST = re.compile(r"\s*,\s*[(\[]?\s*[A-Z]\s*[)\]]?\s*(?:,|or\b|and\b|/|[.;]?\s*$)")
# A line that opens with a letter as a list item: "A. Gentamicin", "(B) x", or the letter alone ("A\nB\nC").
_LIST_LINE = re.compile(r"^\s*[(\[]?\s*([A-Za-z])\s*(?:[)\].:]|$)", re.MULTILINE)
# What may follow a letter for it to count: the end of its line, or ")", ".", ":", "," or ";".
_LETTER_END = re.compile(r"[ \t]*(?:$|\r?\n|[).:,;])")
# A capital letter closing the text after "is", "it's", "with" or a comma: "It's C", "I'd go with C.", "So, B."
# (a capital only: "... with a" is a word).
_TRAILING_LETTER = re.compile(r"(?:(?i:\bis|\bit['\u2019]s|\bwith)|,)\s+([A-Z])\s*[.!]?\s*$")
_CAPITAL_LETTER = re.compile(r"\b([A-Z])\b")
_PARENTHESISED = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]")


def _letter_at(text: str, pos: int, allowed: tuple[str, ...], texts: Mapping[str, str]) -> str | None:
    """The option letter written at ``text[pos:]``, if it is marked as one.

    A letter offered together with another ("(A) or (B)", "A/B", "A, B, C or D") never counts.
    Otherwise it counts when it is in parentheses "(B)"/"[b]", or followed by the end of its
    line, ")", ".", ":", "," or ";", or followed by its own option text ("A Medication" when A is
    "Medication"). An upper-case letter also counts before "is"/"was"/"because"/a dash
    ("B is correct", "Option C is right"). Anything else is a word: the article in
    "A 45-year-old man", "The answer is a beta blocker". A letter followed by another option's text
    and not its own ("A. Folate" when Folate is option C) is two choices: ``_CONFLICT``, read as none.
    """
    match = _LETTER_AT.match(text, pos)
    if match is None:
        return None
    rest = text[match.end():]
    if _LETTER_DISJUNCTION.match(rest) or _LETTER_LIST.match(rest):
        return None
    if match.group(1) is not None:
        letter = match.group(1).upper()
        if letter not in allowed:
            return None
        return _CONFLICT if _names_another_option(rest, letter, texts) else letter
    raw = match.group(2)
    letter = raw.upper()
    if letter not in allowed:
        return None
    end = _LETTER_END.match(rest)
    if end is not None:
        return _CONFLICT if _names_another_option(rest[end.end():], letter, texts) else letter
    if letter in texts and f"{_normalize_text(rest)} ".startswith(f"{texts[letter]} "):
        return letter
    if raw.isupper() and _LETTER_VERBS.match(rest):
        return letter
    return None


# _letter_at's answer for a letter written with another option's text ("A. Folate", Folate being C): no choice.
_CONFLICT = "conflict"


def _names_another_option(after: str, letter: str, texts: Mapping[str, str]) -> bool:
    """Whether the line after a written letter opens with another option's text and not with the letter's own:
    "A. Folate" when Folate is option C names two choices, which is none (8.6% of SmolLM2's real MedQA answers)."""
    line = _normalize_text(after.split("\n", 1)[0])
    if not line:
        return False
    def opens_with(text: str) -> bool:
        return f"{line} ".startswith(f"{text} ")
    if letter in texts and opens_with(texts[letter]):
        return False
    return any(opens_with(text) for other, text in texts.items() if other != letter)


def _match_option_text(answer: str, texts: Mapping[str, str]) -> str | None:
    """Letter whose option text the answer names, or ``None``.

    Exact match of normalised texts first; then the options contained in the answer (whole
    words) or containing it (answers of 3+ characters): a unique one wins, and of several the
    one whose text contains all the others ("iron deficiency anemia" over "iron").
    """
    normalized = _normalize_text(answer)
    if not normalized:
        return None
    exact = [letter for letter, text in texts.items() if text == normalized]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        return None
    inside = [letter for letter, text in texts.items() if _contains_phrase(normalized, text)
              or (len(normalized) >= 3 and _contains_phrase(text, normalized))]
    if len(inside) == 1:
        return inside[0]
    widest = [
        letter for letter in inside if all(_contains_phrase(texts[letter], texts[o]) for o in inside)
    ]
    return widest[0] if len(widest) == 1 else None


def parse_option_letter(text: str, options: Mapping[str, str] | None = None) -> str | None:
    """Read the chosen option letter (upper case) from a free-text answer; ``None`` if none.

    ``options`` maps letters to option texts (MedQA's ``{"A": "Gentamicin", ...}``); the letter
    must be one of its keys (A-E when ``options`` is None). Tried in order, first hit wins:

    1. a letter at the start, after an optional "Answer:"/"The answer is"/"Option":
       "C", "(B)", "B)", "A: Medication", "A. Medication", "Answer: (c)", "B" alone on the first
       line (an explanation below); ``None`` for a letter written with another option's text
       ("A. Folate" when Folate is C); skipped when the
       text restates the option list (two or more lines opening with different letters in
       ascending order, "A. x" then "B. y" on the next line), which is no choice (nor are steps 4
       and 5 tried then); "B. y" then "A. x is wrong because" is choice B and an explanation;
    2. a letter after an answer marker anywhere: "... so the answer is D", "I choose (b)";
    3. exactly one distinct allowed letter in parentheses anywhere: "... which is (C).";
    4. a capital letter closing the text after "is", "it's", "with" or a comma: "It's C", "So, B.";
    5. with ``options``: the option text alone ("Ceftriaxone", "It is ceftriaxone.").

    What counts as a written letter is spelled out in :func:`_letter_at`; the point of the rule
    is that a bare letter followed by ordinary words is a word, so "A 45-year-old man ..." is
    not option A (unless the text then names option A's text).

    >>> parse_option_letter("The answer is D")
    'D'
    >>> parse_option_letter("Ceftriaxone", {"A": "Gentamicin", "B": "Ceftriaxone"})
    'B'
    >>> parse_option_letter("A 45-year-old man", {"A": "Gentamicin", "B": "Ceftriaxone"}) is None
    True
    """
    cleaned = _clean(text)
    if not cleaned:
        return None
    allowed = _allowed_letters(options)
    texts = _option_texts(options)

    # "A. Gentamicin\nB. Ciprofloxacin": the model restates the option list; its first line
    # is no choice (measured: SmolLM2-135M does this in 4 of the first 40 real MedQA rows). Lines
    # out of order ("B. Ceftriaxone\n\nA. Gentamicin is incorrect because ...") are a choice and
    # the other options' explanations.
    order = [m.group(1).upper() for m in _LIST_LINE.finditer(cleaned)]
    order = [letter for letter in order if letter in allowed]
    restated = len(set(order)) >= 2 and all(a < b for a, b in zip(order, order[1:]))
    if not restated:
        prefix = _LEADING_PREFIX.match(cleaned)
        letter = _letter_at(cleaned, prefix.end() if prefix else 0, allowed, texts)
        if letter is not None:
            return None if letter == _CONFLICT else letter

    for marker in _MARKER.finditer(cleaned):
        letter = _letter_at(cleaned, marker.end(), allowed, texts)
        if letter is not None:
            return None if letter == _CONFLICT else letter

    in_parentheses = {m.group(1).upper() for m in _PARENTHESISED.finditer(cleaned)}
    in_parentheses &= set(allowed)
    if len(in_parentheses) == 1:
        return in_parentheses.pop()

    trailing = _TRAILING_LETTER.search(cleaned)  # "It's C", "I'd go with C.", "So, B."
    if trailing is not None and trailing.group(1) in allowed and not restated and \
            set(_CAPITAL_LETTER.findall(cleaned)) & set(allowed) == {trailing.group(1)}:  # "A, B": no choice
        return trailing.group(1)

    if texts and not restated:
        return _match_option_text(cleaned, texts)
    return None


_TRUE_LABELS = {"true", "yes", "1"}
_FALSE_LABELS = {"false", "no", "0"}


def normalize_yes_no_label(value: Any) -> str:
    """Ground-truth yes/no label -> "yes" or "no".

    Accepts bool (also numpy's), the ints 1/0, and the strings "true"/"false"/"yes"/"no"/
    "1"/"0" in any case with surrounding spaces. Anything else raises ``ValueError`` naming
    the value: a wrong label must stop the run, not be scored.

    >>> normalize_yes_no_label(True), normalize_yes_no_label("FALSE"), normalize_yes_no_label(1)
    ('yes', 'no', 'yes')
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        if value in (0, 1):
            return "yes" if value == 1 else "no"
    elif isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE_LABELS:
            return "yes"
        if key in _FALSE_LABELS:
            return "no"
    elif type(value).__name__ in ("bool_", "bool") and hasattr(value, "item"):
        return normalize_yes_no_label(value.item())  # numpy.bool_ is not a bool subclass
    raise ValueError(
        f"yes/no label {value!r} ({type(value).__name__}) is not one of: true/false booleans, "
        "1/0, or the strings 'true', 'false', 'yes', 'no', '1', '0'"
    )


_LABEL_LETTER = re.compile(r"^\s*(?:\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*[.)]?)\s*$")


def normalize_option_label(value: Any, options: Mapping[str, str] | None = None) -> str:
    """Ground-truth option letter -> upper-case letter: "c" -> "C", "(C)" -> "C", "C." -> "C".

    The letter must be one of ``options``' keys (A-E when ``options`` is None); anything else
    (option text, several letters, numbers) raises ``ValueError`` naming the value and the
    allowed letters.
    """
    allowed = _allowed_letters(options)
    match = _LABEL_LETTER.match(value) if isinstance(value, str) else None
    if match is not None:
        letter = (match.group(1) or match.group(2)).upper()
        if letter in allowed:
            return letter
    raise ValueError(
        f"option label {value!r} is not an option letter; expected one of {', '.join(allowed)} "
        "(any case, optionally as '(C)', 'C.' or 'C)')"
    )


# A number, optionally signed, with optional thousands separators and decimals ("1,234", "-3", "2.5").
_NUMBER = r"(?<![\w.])[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?(?!\w)"
_NUMBER_RE = re.compile(_NUMBER)
# A stated result: "= 12", "answer is 12", "answer: \"12\"", "equals 12", "3 - 1 is 2".
_EXPLICIT_NUMBER = re.compile(r"(?:=|\banswer\s*(?:is|:)|\bequals|\bis)\s*[\"'(]*\s*(" + _NUMBER + ")", re.IGNORECASE)


def _canonical_int(text: str) -> str | None:
    """"1,234" -> "1234", "12.0" -> "12", "2.5" -> None; exact at any size (no float on the way)."""
    whole, _, fraction = text.replace(",", "").replace("\u2212", "-").partition(".")
    return str(int(whole)) if not fraction.strip("0") else None


def parse_number(text: str) -> str | None:
    """The integer a free-text answer gives, as a canonical string ("012" -> "12"), or None.

    An explicit result wins: the number after the last "=" ("7 + 5 = 12" -> "12"), "is"
    ("3 - 1 is 2" -> "2"), "equals" or "answer:", quoted or not; otherwise the first integer in
    the text. Decimals are not integers and are not
    read ("2.5" -> None).

    >>> parse_number("12"), parse_number("7 + 5 = 12."), parse_number("The sum is 1,234"), parse_number("no idea")
    ('12', '12', '1234', None)
    """
    text = _MARKDOWN.sub("", _clean(text))
    explicit = _EXPLICIT_NUMBER.findall(text)
    if explicit:
        return _canonical_int(explicit[-1])
    match = _NUMBER_RE.search(text)
    return _canonical_int(match.group(0)) if match else None


def normalize_number_label(value: Any) -> str:
    """Ground-truth integer -> canonical string: 12, "12", " 012 " -> "12".

    Anything that is not an integer (a float with a fraction, a bool, free text) raises
    ``ValueError`` naming the value.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return str(int(value))
    raise ValueError(f"number label {value!r} ({type(value).__name__}) is not an integer; "
                     "expected an int or a string of digits such as 12 or '12'")
