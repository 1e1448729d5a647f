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

Problems are reported all at once, with their place: ``domains.yaml:12: domains[2].confident_token:
token <C_READ> is used by domains 'read' and 'law'; ...`` (:func:`load_domains_file`).
``python -m conftok.domains FILE [--model_name M]`` checks a domain file, and with a model also that
no token is already an entry of its tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
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
from conftok.inputs import (InputError, KeyPath, duplicate_keys, format_key, format_problems, line_of, load_yaml,
                            problems_message)

__all__ = [
    "DEFAULT_DOMAINS",
    "TASKS",
    "Domain",
    "DomainError",
    "DomainSet",
    "resolve_domains",
    "load_domains_file",
]

# A confidence token looks like <C_NAME> or <U_NAME>; used to spot tokens the registry lacks.
TOKEN_PATTERN = re.compile(r"<[CU]_[A-Za-z0-9_]+>")
# The yes/no labels a raw row may hold besides true/false (the strings "true"/"false" are refused:
# a boolean written as a string is a sign of a broken export, and bool("false") is True).
YES_NO_STRINGS = ("yes", "no")


class DomainError(InputError):
    """A domain, a domain file or a domain set is invalid; the message lists every problem."""


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
        problems = _domain_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise DomainError(f"domain {self.name!r}: " + "; ".join(f"{key} {p}" if key else p for key, p in problems))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "fields", dict(self.fields))

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

    def row_problems(self, row: Any) -> list[str]:
        """What is wrong with one raw row for this domain's task (empty when nothing): each
        ``field 'NAME': problem; what is allowed``, the field named by its column in the source.

        A row holds ``question`` (a non-empty string) and by task: ``yes_no`` an ``answer`` that is
        true/false, 1/0 or "yes"/"no" (a ``passage`` string is optional); ``multiple_choice``
        ``options`` {letter: text} and an ``answer`` among the letters; ``number`` an integer ``answer``.
        """
        required = TASKS[self.task].required_fields
        shape = f"a {self.task} row holds {', '.join(repr(self.fields.get(f, f)) for f in required)}"
        if not isinstance(row, Mapping):
            return [f"expected a JSON object, got {type(row).__name__}; {shape}"]
        values = self._canonical(row)

        def field_name(name: str) -> str:
            column = self.fields.get(name, name)
            return f"field {column!r}" + (f" ({name})" if column != name else "")

        problems = [f"{field_name(name)}: missing; {shape}" for name in required if values.get(name) is None]
        question = values.get("question")
        if question is not None and not (isinstance(question, str) and question.strip()):
            problems.append(f"{field_name('question')}: expected a non-empty string, got "
                            f"{type(question).__name__} {question!r}")
        passage = values.get("passage")
        if self.task == "yes_no" and passage is not None and not isinstance(passage, str):
            problems.append(f"{field_name('passage')}: expected a string, got {type(passage).__name__} {passage!r}")
        options = values.get("options")
        options_ok = True
        if self.task == "multiple_choice" and options is not None:
            options_ok = (isinstance(options, Mapping) and bool(options)
                          and all(isinstance(k, str) and re.fullmatch(r"[A-Z]", k) for k in options)
                          and all(isinstance(v, str) and v.strip() for v in options.values()))
            if not options_ok:
                problems.append(f"{field_name('options')}: expected an object of option letters to texts, "
                                f'{{"A": "...", "B": "..."}} (upper-case letters, non-empty texts), got {options!r}')
        answer = values.get("answer")
        if answer is not None and options_ok:
            problem = _answer_problem(self.task, answer, options)
            if problem:
                problems.append(f"{field_name('answer')}: {problem}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["datasets"] = list(self.datasets)
        return out


def _answer_problem(task: str, answer: Any, options: Mapping[str, str] | None) -> str | None:
    """Why a raw row's gold answer is not one the task allows (None when it is)."""
    if task == "yes_no":
        if isinstance(answer, bool) or (type(answer) is int and answer in (0, 1)):
            return None
        if isinstance(answer, str) and answer.strip().lower() in YES_NO_STRINGS:
            return None
        if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
            return (f"{answer!r} is a boolean written as a string; write true or false without quotes "
                    "(allowed: true, false, 1, 0, \"yes\", \"no\")")
        return f"expected true, false, 1, 0, \"yes\" or \"no\", got {type(answer).__name__} {answer!r}"
    if task == "multiple_choice":
        if options is None:
            return None  # the missing options are reported on their own
        try:
            normalize_option_label(answer, options)
        except ValueError:
            return f"{answer!r} is not among the options; allowed: one of the letters {', '.join(options)}"
        return None
    try:
        TASKS[task].gold_answer({"answer": answer})
    except ValueError as e:
        return str(e)
    return None


def _domain_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, problem)`` for each problem of one domain's values (a mapping of Domain's fields)."""
    fields = dataclasses.fields(Domain)
    allowed = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems = [(key, f"unknown key; allowed: {allowed}") for key in values if key not in allowed]
    missing = [key for key in required if key not in values]
    if missing:
        problems.append(("", f"missing key(s) {missing}; a domain needs {required}"))
    name = values.get("name")
    if "name" in values and not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):
        problems.append(("name", f"must be lower-case letters, digits or '_', starting with a letter, got {name!r}"))
    datasets = values.get("datasets")
    if "datasets" in values and not (isinstance(datasets, (list, tuple)) and datasets
                                     and all(isinstance(d, str) and d for d in datasets)):
        problems.append(("datasets", f"must be a non-empty list of data set names, got {datasets!r}"))
    for key in ("confident_token", "unconfident_token"):
        token = values.get(key)
        if key in values and not (isinstance(token, str) and re.fullmatch(r"<[^<>\s]+>", token)):
            problems.append((key, f"must look like <NAME> with no spaces, got {token!r}"))
    if "confident_token" in values and values.get("confident_token") == values.get("unconfident_token"):
        problems.append(("unconfident_token", f"must differ from confident_token, both are "
                                              f"{values['confident_token']!r}"))
    if "task" in values and values["task"] not in TASKS:
        problems.append(("task", f"must be one of {sorted(TASKS)}, got {values['task']!r}"))
    if values.get("validation") is not None and not (isinstance(values["validation"], str) and values["validation"]):
        problems.append(("validation", f"must be a file or Hub data set name, got {values['validation']!r}"))
    if "split" in values and not (isinstance(values["split"], str) and values["split"]):
        problems.append(("split", f"must be a split name such as 'validation', got {values['split']!r}"))
    fields_map = values.get("fields", {})
    if not (isinstance(fields_map, Mapping) and all(isinstance(k, str) and isinstance(v, str) and v
                                                    for k, v in fields_map.items())):
        problems.append(("fields", f"must map canonical names to column names ({{question: query}}), got {fields_map!r}"))
    return problems


def _set_problems(domains: Sequence[Domain]) -> list[tuple[int, str, str]]:
    """``(index, key, problem)`` for names, data sets and tokens that more than one domain claims."""
    problems = []
    if not domains:
        problems.append((0, "", "no domains given; expected at least one"))
    seen: dict[tuple[str, Any], Domain] = {}
    for i, d in enumerate(domains):
        claims = [("name", d.name)] + [("datasets", ds) for ds in d.datasets] + [
            ("confident_token", d.confident_token), ("unconfident_token", d.unconfident_token)]
        for key, value in claims:
            what = {"name": "domain name", "datasets": "data set"}.get(key, "token")  # C and U tokens: one kind
            other = seen.setdefault((what, value), d)
            if other is d and key == "datasets" and d.datasets.count(value) > 1:
                problems.append((i, key, f"data set {value!r} is listed twice"))
            elif other is not d:
                problems.append((i, key, f"{what} {value} is used by domains {other.name!r} and {d.name!r}; "
                                         f"each {what} belongs to one domain"))
    return problems


def vocabulary_clash(tokenizer, token: str, owner: str = "the tokenizer") -> str | None:
    """Why ``token`` cannot be a confidence token of ``tokenizer`` (None when it can): it is
    already an entry of the vocabulary that is not a confidence token added earlier (those are
    special tokens that absorb the space before them, ``conftok.tokens.add_confidence_tokens``).
    Training would otherwise supervise the id of an existing token such as ``<|im_end|>``."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(vocab[token])
    if added is not None and added.special and added.lstrip:
        return None
    return (f"token {token} is already an entry of the vocabulary of {owner} (id {vocab[token]}); a confidence "
            "token must be new to it: pick another name, such as <C_MYDOMAIN>")


DEFAULT_DOMAINS: tuple[Domain, ...] = (
    Domain("read", ("boolq",), "<C_READ>", "<U_READ>", "yes_no", validation="huyxdang/boolq-split"),
    Domain("med", ("medqa",), "<C_MED>", "<U_MED>", "multiple_choice", validation="huyxdang/medqa-split"),
)


class DomainSet:
    """An ordered, checked collection of domains with lookups by name, data set and token."""

    def __init__(self, domains: Iterable[Domain], source: "tuple[Path, dict[KeyPath, int], KeyPath] | None" = None):
        self.domains: tuple[Domain, ...] = tuple(domains)
        # Where the domains were read from, for messages: (file, lines of its keys, key path of the list).
        self.source = source
        problems = _set_problems(self.domains)
        if problems:
            raise DomainError("invalid domains: " + "; ".join(f"{self.where(i, key)}: {p}" for i, key, p in problems))
        self._by_name = {d.name: d for d in self.domains}
        self._by_dataset = {ds: d for d in self.domains for ds in d.datasets}
        self._by_token = {t: d for d in self.domains for t in d.tokens}

    def where(self, index: int, key: str = "") -> str:
        """``FILE:LINE: domains[1].confident_token`` where the domains came from a file, else ``domain #1.key``."""
        if self.source is None:
            return f"domain #{index}" + (f".{key}" if key else "")
        path, lines, prefix = self.source
        keys = (*prefix, index, key) if key else (*prefix, index)
        line = line_of(lines, keys)
        return f"{path}{f':{line}' if line else ''}: {format_key(keys)}"

    def check_vocabulary(self, tokenizer, model_name: str = "the model") -> None:
        """Raise :class:`DomainError` naming every token that is already an entry of ``tokenizer``'s
        vocabulary (:func:`vocabulary_clash`), with its place in the domain file."""
        problems = []
        for i, d in enumerate(self.domains):
            for key in ("confident_token", "unconfident_token"):
                clash = vocabulary_clash(tokenizer, getattr(d, key), f"the tokenizer of {model_name}")
                if clash:
                    problems.append(f"{self.where(i, key)}: {clash}")
        if problems:
            raise DomainError(f"{len(problems)} confidence token(s) clash with the vocabulary of {model_name}:\n  "
                              + "\n  ".join(problems))

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
    domains, problems = _build_domains(spec)
    if problems:
        raise DomainError("invalid domains: " + "; ".join(
            f"domain #{i}" + (f".{key}" if key else "") + f": {p}" for i, key, p in problems))
    return DomainSet(domains)


def _build_domains(items: Sequence[Any]) -> tuple[list[Domain], list[tuple[int, str, str]]]:
    """Domains from Domain objects or mappings, and ``(index, key, problem)`` for every bad item."""
    domains, problems = [], []
    for i, item in enumerate(items):
        if isinstance(item, Domain):
            domains.append(item)
        elif not isinstance(item, Mapping):
            problems.append((i, "", f"expected a mapping of domain fields, got {type(item).__name__} {item!r}"))
        elif item_problems := _domain_problems(item):
            problems += [(i, key, p) for key, p in item_problems]
        else:
            domains.append(Domain(**item))
    return domains, problems


def load_domains_file(path: str | Path) -> DomainSet:
    """Read domains from a JSON or YAML file holding a list of domain mappings (or ``{"domains":
    [...]}``); raise :class:`DomainError` listing every problem at its line.

    An adapter's or an export's ``conftok.json`` (domains beside ``token_ids`` and other run facts), or
    the directory holding one, gives its domains too.
    """
    path = Path(path)
    if path.is_dir() and (path / "conftok.json").is_file():  # an adapter or export directory
        path = path / "conftok.json"
    data, lines = load_yaml(path, "domain file")
    prefix: KeyPath = ()
    if isinstance(data, Mapping):
        metadata = "domains" in data and "token_ids" in data  # conftok.json: the other keys are the run's
        unknown = [] if metadata else [(key,) for key in data if key != "domains"]
        if unknown:
            raise DomainError(problems_message(path, format_problems(
                path, [(key, "unknown key; a domain file is a list of domains, or a mapping with the one key "
                             "'domains' holding that list") for key in unknown], lines)))
        data, prefix = data.get("domains"), ("domains",)
    if not isinstance(data, list) or not data:
        raise DomainError(f"{path}: expected a non-empty list of domains (or a 'domains' key holding one), "
                          f"got {type(data).__name__}")
    domains, problems = _build_domains(data)
    if not problems:
        problems = _set_problems(domains)
    duplicates = duplicate_keys(path)
    if problems or duplicates:
        raise DomainError(problems_message(path, duplicates + format_problems(
            path, [((*prefix, i, key) if key else (*prefix, i), p) for i, key, p in problems], lines)))
    return DomainSet(domains, source=(path, lines, prefix))


def main(argv: list[str] | None = None) -> int:
    """``python -m conftok.domains FILE [--model_name M]``: check a domain file (and its tokens against
    a model's tokenizer); print its domains, or every problem and exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m conftok.domains",
        description="Check a domain file: every domain's fields, unique names, data sets and tokens, and with "
                    "--model_name tokens new to its tokenizer.")
    parser.add_argument("file", help="domain file (YAML or JSON)")
    parser.add_argument("--model_name", default=None, help="check the tokens against this model's tokenizer")
    args = parser.parse_args(argv)
    try:
        domains = load_domains_file(args.file)
        if args.model_name:
            from transformers import AutoTokenizer

            # Only the tokenizer's files are read: no repo code runs for a vocabulary check.
            tokenizer = AutoTokenizer.from_pretrained(args.model_name, trust_remote_code=False)
            domains.check_vocabulary(tokenizer, args.model_name)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in domains:
        print(f"{d.name}: {' / '.join(d.tokens)} for {', '.join(d.datasets)} ({d.task})")
    return 0

