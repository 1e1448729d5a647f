"""Domains: which data sets belong to a domain, its confidence-token pair, and how its
questions are asked and its answers read.

A domain is data, not code: a new one (``<C_LAW>``/``<U_LAW>`` for a law data set) is added
by configuration, naming one of the built-in task kinds::

    domains = resolve_domains([
        *DEFAULT_DOMAINS,
        {"name": "law", "datasets": ["lawqa"], "confident_token": "<C_LAW>",
         "unconfident_token": "<U_LAW>", "task": "multiple_choice"},
    ])

Task kinds (``TASKS``):

- ``yes_no``: raw rows ``{question, passage?, answer: bool|"yes"|"no"}``; the answer is read
  with :func:`conftok.answers.parse_yes_no`.
- ``multiple_choice``: raw rows ``{question, options: {letter: text}, answer: letter}``; the
  answer is read with :func:`conftok.answers.parse_option_letter`.
- ``number``: raw rows ``{question, answer: int}`` (arithmetic, counting); the question is asked
  as it is, followed by "Answer with the number only.", and the answer is read with
  :func:`conftok.answers.parse_number`. ``domains/read_med_math.yaml`` adds the generated
  arithmetic domain ``math`` (``conftok.arithmetic``) this way.

``fields`` maps these names to another layout's column names, e.g.
``{"question": "query", "answer": "label"}``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from conftok.answers import (
    normalize_number_label,
    normalize_option_label,
    normalize_yes_no_label,
    parse_number,
    parse_option_letter,
    parse_yes_no,
)

__all__ = [
    "DEFAULT_DOMAINS",
    "TASKS",
    "Domain",
    "DomainSet",
    "resolve_domains",
    "load_domains_file",
]

# A confidence token looks like <C_NAME> or <U_NAME>; used to spot tokens the registry lacks.
TOKEN_PATTERN = re.compile(r"<[CU]_[A-Za-z0-9_]+>")


def _yes_no_question(row: Mapping[str, Any]) -> str:
    question = str(row["question"]).strip()
    if not question.endswith("?"):
        question += "?"
    passage = str(row.get("passage") or "").strip()
    body = f"{passage}\n\nQuestion: {question}" if passage else f"Question: {question}"
    return f"{body}\nAnswer yes or no."


def _multiple_choice_question(row: Mapping[str, Any]) -> str:
    options = row["options"]
    if not isinstance(options, Mapping) or not options:
        raise ValueError(f"'options' must be a non-empty mapping of letter -> text, got {options!r}")
    lines = "\n".join(f"{letter}. {text}" for letter, text in sorted(options.items()))
    return f"{str(row['question']).strip()}\n\n{lines}\n\nAnswer with the letter of the correct option."


def _number_question(row: Mapping[str, Any]) -> str:
    return f"{str(row['question']).strip()}\nAnswer with the number only."


def _yes_no_parse(text: str, row: Mapping[str, Any]) -> str | None:
    return parse_yes_no(text)


def _multiple_choice_parse(text: str, row: Mapping[str, Any]) -> str | None:
    return parse_option_letter(text, row.get("options"))


def _number_parse(text: str, row: Mapping[str, Any]) -> str | None:
    return parse_number(text)


def _number_label(row: Mapping[str, Any]) -> str:
    return normalize_number_label(row["answer"])


def _yes_no_label(row: Mapping[str, Any]) -> str:
    return normalize_yes_no_label(row["answer"])


def _multiple_choice_label(row: Mapping[str, Any]) -> str:
    return normalize_option_label(row["answer"], row.get("options"))


@dataclass(frozen=True)
class Task:
    """How one kind of question is asked, answered and checked."""

    build_question: Callable[[Mapping[str, Any]], str]
    parse_answer: Callable[[str, Mapping[str, Any]], "str | None"]
    gold_answer: Callable[[Mapping[str, Any]], str]
    required_fields: tuple[str, ...]


TASKS: dict[str, Task] = {
    "yes_no": Task(_yes_no_question, _yes_no_parse, _yes_no_label, ("question", "answer")),
    "multiple_choice": Task(
        _multiple_choice_question, _multiple_choice_parse, _multiple_choice_label,
        ("question", "options", "answer"),
    ),
    "number": Task(_number_question, _number_parse, _number_label, ("question", "answer")),
}


@dataclass(frozen=True)
class Domain:
    """One domain: its data sets, its token pair and its task kind.

    Args:
        name: short id used in metric names (``read``, ``med``).
        datasets: values of the ``dataset`` field of tagged rows that belong here (``boolq``).
        confident_token: token emitted after an answer the model is sure of (``<C_READ>``).
        unconfident_token: token emitted otherwise (``<U_READ>``).
        task: a key of :data:`TASKS`.
        validation: default validation source: a Hub data set name or a local file.
        split: split to read from a Hub source.
        fields: raw-row field mapping, canonical name -> column name in the source.
    """

    name: str
    datasets: tuple[str, ...]
    confident_token: str
    unconfident_token: str
    task: str
    validation: str | None = None
    split: str = "validation"
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "fields", dict(self.fields))
        problems = []
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name or ""):
            problems.append(f"name must be lower-case letters, digits or '_', got {self.name!r}")
        if not self.datasets or not all(isinstance(d, str) and d for d in self.datasets):
            problems.append(f"datasets must be a non-empty list of names, got {list(self.datasets)!r}")
        for attr in ("confident_token", "unconfident_token"):
            token = getattr(self, attr)
            if not isinstance(token, str) or not re.fullmatch(r"<[^<>\s]+>", token):
                problems.append(f"{attr} must look like <NAME> with no spaces, got {token!r}")
        if self.confident_token == self.unconfident_token:
            problems.append(f"confident and unconfident tokens must differ, both are {self.confident_token!r}")
        if self.task not in TASKS:
            problems.append(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if problems:
            raise ValueError(f"domain {self.name!r}: " + "; ".join(problems))

    @property
    def tokens(self) -> tuple[str, str]:
        return (self.confident_token, self.unconfident_token)

    def _canonical(self, row: Mapping[str, Any], need: tuple[str, ...] = ()) -> dict[str, Any]:
        """Rename a raw row's columns to the canonical names through ``fields``; check ``need``."""
        out = dict(row)
        for canonical, column in self.fields.items():
            if column in row:
                out[canonical] = row[column]
        missing = [f for f in need if out.get(f) in (None, "")]
        if missing:
            mapped = {f: self.fields.get(f, f) for f in missing}
            raise ValueError(
                f"domain {self.name!r}: raw row lacks field(s) {mapped} (canonical -> column); "
                f"row has {sorted(row)}. Set the domain's 'fields' mapping for another layout."
            )
        return out

    def build_question(self, row: Mapping[str, Any]) -> str:
        """The user-turn text for a raw row (the same text tagging and training use)."""
        need = tuple(f for f in TASKS[self.task].required_fields if f != "answer")
        return TASKS[self.task].build_question(self._canonical(row, need))

    def parse_answer(self, text: str, row: Mapping[str, Any]) -> str | None:
        """The normalised answer in free text, or None when it cannot be read."""
        return TASKS[self.task].parse_answer(text, self._canonical(row))  # options help, not needed

    def gold_answer(self, row: Mapping[str, Any]) -> str:
        return TASKS[self.task].gold_answer(self._canonical(row, ("answer",)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["datasets"] = list(self.datasets)
        return out


DEFAULT_DOMAINS: tuple[Domain, ...] = (
    Domain("read", ("boolq",), "<C_READ>", "<U_READ>", "yes_no", validation="huyxdang/boolq-split"),
    Domain("med", ("medqa",), "<C_MED>", "<U_MED>", "multiple_choice", validation="huyxdang/medqa-split"),
)


class DomainSet:
    """An ordered, checked collection of domains with lookups by name, data set and token."""

    def __init__(self, domains: Iterable[Domain]):
        self.domains: tuple[Domain, ...] = tuple(domains)
        problems = []
        if not self.domains:
            problems.append("no domains given")
        self._by_name: dict[str, Domain] = {}
        self._by_dataset: dict[str, Domain] = {}
        self._by_token: dict[str, Domain] = {}
        for d in self.domains:
            if d.name in self._by_name:
                problems.append(f"domain name {d.name!r} used twice")
            self._by_name[d.name] = d
            for ds in d.datasets:
                if ds in self._by_dataset:
                    problems.append(f"data set {ds!r} is in domains {self._by_dataset[ds].name!r} and {d.name!r}")
                self._by_dataset[ds] = d
            for t in d.tokens:
                if t in self._by_token:
                    problems.append(f"token {t} is used by domains {self._by_token[t].name!r} and {d.name!r}")
                self._by_token[t] = d
        if problems:
            raise ValueError("invalid domains: " + "; ".join(problems))

    def __iter__(self):
        return iter(self.domains)

    def __len__(self) -> int:
        return len(self.domains)

    @property
    def tokens(self) -> list[str]:
        """All confidence tokens, C then U per domain, in domain order."""
        return [t for d in self.domains for t in d.tokens]

    @property
    def dataset_names(self) -> list[str]:
        return list(self._by_dataset)

    def by_name(self, name: str) -> Domain:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown domain {name!r}; known: {sorted(self._by_name)}") from None

    def for_dataset(self, dataset: str) -> Domain:
        try:
            return self._by_dataset[dataset]
        except KeyError:
            raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(self._by_dataset)}") from None

    def for_token(self, token: str) -> Domain | None:
        return self._by_token.get(token)

    def to_list(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.domains]


def resolve_domains(spec: "DomainSet | Sequence[Domain | Mapping[str, Any]] | str | Path | None" = None) -> DomainSet:
    """Build a :class:`DomainSet` from domains, dicts, a JSON/YAML file path, or None (defaults)."""
    if spec is None:
        return DomainSet(DEFAULT_DOMAINS)
    if isinstance(spec, DomainSet):
        return spec
    if isinstance(spec, (str, Path)):
        return load_domains_file(spec)
    domains = []
    for i, item in enumerate(spec):
        if isinstance(item, Domain):
            domains.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"domain #{i} must be a Domain or a mapping, got {type(item).__name__}")
        allowed = {f.name for f in dataclasses.fields(Domain)}
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ValueError(f"domain #{i}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        try:
            domains.append(Domain(**item))
        except TypeError as e:  # missing required keys
            raise ValueError(f"domain #{i}: {e}") from None
    return DomainSet(domains)


def load_domains_file(path: str | Path) -> DomainSet:
    """Read domains from a JSON or YAML file holding a list of domain mappings
    (or ``{"domains": [...]}``)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, Mapping):
        data = data.get("domains")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of domains (or a 'domains' key holding one)")
    try:
        return resolve_domains(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
