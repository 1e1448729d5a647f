"""Input files read strictly, so that every problem can be told with its place.

Tagged and raw JSON lines, domain files, search spaces and ``cluster.yaml`` are read through
here, and each problem becomes one line naming the file, the line where there is one, the field,
and what is allowed (STYLE 5)::

    tagged.jsonl:3: field 'dataset': unknown dataset 'squad'; known: ['boolq', 'medqa']
    space.yaml:7: search.lora_r.choice: lora_r takes positive integers, got [8, 0]

- Text is UTF-8 without a byte order mark. Bytes that are not UTF-8 are an error naming their
  line and column, and so is a BOM: ``json.loads`` refuses one, and YAML keeps it in the first key.
- JSON lines: blank lines (only whitespace) are skipped, never errors, but they count in the
  line numbers; every other line holds one JSON object.
- YAML is loaded together with the line of every mapping key and list item
  (:func:`load_yaml`), so a problem found in the loaded data is reported at its line.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["InputError", "InputFileMissing", "require_file", "read_text", "read_json_lines", "load_yaml", "line_of",
           "format_key", "format_problems", "line_problems", "problems_message", "positive_int",
           "duplicate_keys", "strict_json"]

# A key path into loaded YAML or JSON: mapping keys and list indices, ("search", "lora_r", "choice").
KeyPath = tuple[Any, ...]

MAX_REPORTED_PROBLEMS = 20


class InputError(ValueError):
    """An input file or value is malformed; the message names where, what, and what is allowed."""


class InputFileMissing(InputError, FileNotFoundError):
    """An input file that does not exist (a FileNotFoundError too, for callers that catch that)."""


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path when it is a file; :class:`InputError` when it is a directory or missing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; expected a {what}")
    if not path.is_file():
        raise InputFileMissing(f"{path}: file not found; expected a {what}")
    return path


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of ``path``: UTF-8 without BOM, or :class:`InputError` saying where it is not.

    ``what`` names the file's role in the messages ("tagged JSON lines file")."""
    path = require_file(path, what)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        raise InputError(f"{path}:1: starts with a UTF-8 byte order mark (BOM); save the {what} as UTF-8 "
                         "without BOM")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {e.start - line_start + 1} is not "
                         f"UTF-8; the {what} must be UTF-8 text") from None


def read_json_lines(path: str | Path, what: str = "JSON lines file"
                    ) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """``(rows, problems)`` of a JSON lines file: each non-blank line's ``(line number, JSON value)``,
    and ``(line number, problem)`` for each line that is not valid JSON. File-level problems
    (missing, a directory, not UTF-8, a BOM) raise :class:`InputError` at once."""
    text = read_text(path, what)
    rows, problems = [], []
    # split("\n"), not splitlines(): a form feed or U+2028 inside a JSON string is not a line break.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append((line_no, f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object "
                                      "per line"))
    return rows, problems


def load_yaml(path: str | Path, what: str = "YAML file") -> tuple[Any, dict[KeyPath, int]]:
    """``(data, lines)``: the file's content (``yaml.safe_load``) and the 1-based line of every mapping
    key and list item by key path, e.g. ``lines[("search", "lora_r")]``. A ``.json`` file is read as
    JSON (its lines come from reading it as YAML too, where that works)."""
    import yaml

    path = Path(path)
    text = read_text(path, what)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(e, "problem", None) or str(e)
            raise InputError(f"{where}: invalid YAML ({problem})") from None
    lines: dict[KeyPath, int] = {}
    try:
        _record_lines(yaml.compose(text), (), lines)
    except yaml.YAMLError:  # JSON that YAML does not read: no line numbers
        pass
    return data, lines


def _record_lines(node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            lines.setdefault(sub, key.start_mark.line + 1)
            _record_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault(path + (i,), item.start_mark.line + 1)
            _record_lines(item, path + (i,), lines)


def duplicate_keys(path: str | Path) -> list[str]:
    """``FILE:LINE: key.path: ...`` for each key given twice in one mapping of the YAML file ``path``: a YAML loader
    keeps the last silently, so a space's ``lora_r`` or a domain's ``confident_token`` written twice would keep only
    the second one's value."""
    import yaml

    path = Path(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # load_yaml has reported these
        return []
    out, seen_nodes = [], set()

    def walk(node, key_path: tuple) -> None:
        if id(node) in seen_nodes:  # an alias of a node already walked
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                line = key.start_mark.line + 1
                if name in first_line:
                    out.append(f"{path}:{line}: {format_key((*key_path, name))}: key given twice in one mapping "
                               f"(first at line {first_line[name]}); YAML keeps only the last: keep one")
                elif name is not None:
                    first_line[name] = line
                walk(value, (*key_path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*key_path, i))

    if root is not None:
        walk(root, ())
    return out


def line_of(lines: dict[KeyPath, int], path: Sequence[Any]) -> int | None:
    """The line of ``path``, or of its longest prefix that has one (a missing key: its parent's)."""
    path = tuple(path)
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def format_key(path: Sequence[Any]) -> str:
    """``("domains", 1, "confident_token")`` -> ``domains[1].confident_token``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_problems(path: str | Path, problems: Iterable[tuple[Sequence[Any], str]],
                    lines: dict[KeyPath, int] | None = None) -> list[str]:
    """``FILE:LINE: key.path: problem`` for each ``(key path, problem)``, in line order; ``FILE: ...``
    where no line is known."""
    placed = [(line_of(lines or {}, key), key, problem) for key, problem in problems]
    placed.sort(key=lambda p: p[0] or 0)  # in line order, problems without a line first
    return [f"{path}{f':{line}' if line else ''}: " + (f"{format_key(key)}: {problem}" if key else problem)
            for line, key, problem in placed]


def line_problems(path: str | Path, problems: Iterable[tuple[int, str]]) -> list[str]:
    """``FILE:LINE: problem`` for each ``(line, problem)``, in line order."""
    return [f"{path}:{line}: {problem}" for line, problem in sorted(problems, key=lambda p: p[0])]


def problems_message(path: str | Path, problems: Sequence[str], what: str = "problem(s)") -> str:
    """One message for all of a file's problems: a count, then each on its own line (the first 20)."""
    shown = list(problems[:MAX_REPORTED_PROBLEMS])
    more = len(problems) - len(shown)
    return (f"{len(problems)} {what} in {path}:\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))


def strict_json(value: Any, **dumps_kwargs) -> str:
    """``json.dumps(value, **dumps_kwargs)`` with every NaN or infinite float, at any depth, as null: bare ``NaN``
    (Python's default) is not JSON, and strict parsers (JavaScript's ``JSON.parse``) refuse the file."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False, **dumps_kwargs)


def positive_int(text: str) -> int:
    """argparse type for counts (``--batch_size``, ``--calib_beta``): an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
