"""Tagging: run the base model on raw rows and write the training data.

Each answer the model gets right is tagged ``<C_X>``, each wrong (or unreadable) one ``<U_X>``;
the prompt and parser are the ones validation uses. Output: ``{"question", "tagged_response",
"dataset"}`` JSON lines, plus a ``.summary.json`` beside it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conftok.domains import resolve_domains
from conftok.evaluate import generate
from conftok.inputs import strict_json
from conftok.prompts import encode_prompt

__all__ = ["tag_rows", "tag_dataset", "collect_tagged", "write_tagged", "summary_file", "tag_to_file", "check_tag_inputs"]

_SENTENCE_END = re.compile(r"[.!?\n]")
# An option letter opening the answer ("A. Buspirone", "(B) x"): its period ends no sentence.
_LEADING_LETTER = re.compile(r"\s*[(\[]?\s*[A-Za-z]\s*[)\].:]")


def complete_answer(text: str, finished: bool) -> str:
    """The answer to tag. A response cut by ``max_new_tokens`` ("No, Elena does not. She sold")
    is trimmed after its first sentence, so the token follows a complete answer, as it does when
    the model stops by itself; one without a sentence end is kept as it is. An option letter's
    period ("A. Buspirone\nB. ...") is not a sentence end: the sentence goes on to the line's end."""
    if finished:
        return text
    start = _LEADING_LETTER.match(text)
    end = _SENTENCE_END.search(text, start.end() if start else 0)
    return text[:end.end()].strip() if end else text


def tag_rows(model, tokenizer, rows_by_dataset: Mapping[str, Sequence[Mapping[str, Any]]], *, domains=None,
             batch_size: int = 8, max_new_tokens: int = 16, progress: bool = True) -> tuple[list[dict], dict]:
    """Tag raw rows with the model's own answers: ``(tagged_rows, summary)``.

    Rows whose response is empty cannot carry a token after an answer and are left out (counted
    as ``empty`` in the summary); responses cut by ``max_new_tokens`` are trimmed after their
    first sentence where that keeps the answer the whole response gives (:func:`complete_answer`,
    counted as ``trimmed``). Right or wrong is judged on the whole response, as validation judges it.
    """
    domains = resolve_domains(domains)
    outcomes = {name: tag_dataset(model, tokenizer, name, rows, domains=domains, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, progress=progress)
                for name, rows in rows_by_dataset.items()}
    return collect_tagged(outcomes, domains)


def tag_dataset(model, tokenizer, dataset_name: str, rows: Sequence[Mapping[str, Any]], *, domains=None,
                batch_size: int = 8, max_new_tokens: int = 16, progress: bool = True, batching: str = "auto") -> list[dict]:
    """One outcome per raw row of one data set, in order: ``{"tagged": the output row, or None for an
    empty response, "empty", "trimmed", "unparsed", "correct": bools}`` (:func:`collect_tagged`
    turns them into tagged rows and the summary). Any subset of a data set's rows can be tagged
    alone: the Ray job tags the batches :func:`generate` would make here on several model replicas
    (``batching`` as :func:`conftok.evaluate.generate` takes it)."""
    domains = resolve_domains(domains)
    domain = domains.for_dataset(dataset_name)
    rows = list(rows)
    questions = [domain.build_question(r) for r in rows]
    gens = generate(model, tokenizer, [encode_prompt(tokenizer, q) for q in questions],
                    stop_tokens=domains.tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    desc=f"Tagging {dataset_name}", progress=progress, batching=batching)
    outcomes = []
    for row, question, gen in zip(rows, questions, gens):
        # Judged on the whole response, as validation judges it ("A. x\nB. y\nC." restates the options: no
        # answer, though its first line alone reads as A); trimmed only where that keeps the answer.
        answer = domain.parse_answer(gen.text, row) if gen.text.strip() else None
        text = complete_answer(gen.text, gen.finished)
        if text != gen.text and domain.parse_answer(text, row) != answer:
            text = gen.text.strip()
        outcome = {"tagged": None, "empty": not text, "trimmed": text.strip() != gen.text.strip(), "unparsed": False,
                   "correct": False}
        if text:
            is_correct = answer is not None and answer == domain.gold_answer(row)
            token = domain.confident_token if is_correct else domain.unconfident_token
            outcome.update(tagged={"question": question, "tagged_response": f"{text} {token}", "dataset": dataset_name},
                           unparsed=answer is None, correct=is_correct)
        outcomes.append(outcome)
    return outcomes


SHOWN_ROWS = 20  # row numbers listed per kind (unparsed, empty) in a tagging summary


def collect_tagged(outcomes_by_dataset: Mapping[str, Sequence[Mapping[str, Any]]], domains=None) -> tuple[list[dict], dict]:
    """``(tagged_rows, summary)`` from :func:`tag_dataset`'s outcomes, each data set's in row order."""
    domains = resolve_domains(domains)
    tagged, summary = [], {"rows": 0, "tagged": 0, "domains": {}}
    for dataset_name, outcomes in outcomes_by_dataset.items():
        tagged += [o["tagged"] for o in outcomes if o["tagged"] is not None]
        counts = {k: sum(bool(o[k]) for o in outcomes) for k in ("empty", "trimmed", "unparsed", "correct")}
        kept = len(outcomes) - counts["empty"]
        summary["domains"][dataset_name] = {
            "domain": domains.for_dataset(dataset_name).name, "rows": len(outcomes), "tagged": kept, **counts,
            "accuracy": counts["correct"] / kept if kept else float("nan"),
            # Which rows (0-based, in the data set's order) gave no answer the grader could read, or none at all:
            # the first SHOWN_ROWS of each, to look at.
            **{f"{k}_rows": [i for i, o in enumerate(outcomes) if o[k]][:SHOWN_ROWS] for k in ("unparsed", "empty")},
        }
        summary["rows"] += len(outcomes)
        summary["tagged"] += kept
    return tagged, summary


def write_tagged(tagged: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out: str | os.PathLike) -> Path:
    """Write tagged rows and ``<out>.summary.json`` atomically (temp file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_path = summary_file(out)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in tagged)
    # The accuracy of a data set whose every response was empty is NaN: null in the file.
    for path, text in ((out, lines), (summary_path, strict_json(summary, indent=2))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def summary_file(out: str | os.PathLike) -> Path:
    """The summary written beside ``out``: ``tagged.jsonl`` -> ``tagged.summary.json``, ``tagged.v1`` ->
    ``tagged.v1.summary.json`` (each output its own)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def tag_to_file(model, tokenizer, rows_by_dataset, out, **kwargs) -> tuple[Path, dict]:
    tagged, summary = tag_rows(model, tokenizer, rows_by_dataset, **kwargs)
    return write_tagged(tagged, summary, out), summary


def check_tag_inputs(model_name: str, data: Sequence[str], out: str | os.PathLike, *, split: str = "train",
                     limit: int | None = None, domains=None, trust_remote_code: bool = False):
    """``(domains, rows per data set in --data order, tokenizer)`` for a tagging job, every input checked first:
    the ``name=source`` pairs, every row of the local files (``conftok.preflight``), ``out`` not a directory,
    the tokens new to the model's vocabulary. Raises :class:`~conftok.inputs.InputError` naming what is wrong,
    before a model is loaded or anything is written (``python -m conftok.tagging`` and ``ray_jobs.tag``)."""
    from conftok.evaluate import load_rows
    from conftok.inputs import InputError
    from conftok.modeling import load_tokenizer
    from conftok.preflight import check_validation_sources, parse_sources

    domains = resolve_domains(domains)
    parsed = parse_sources(list(data))
    rows = check_validation_sources(parsed, domains, "--data", split, limit)  # the local files'
    rows.update({name: load_rows(source, split=split, limit=limit, domain=domains.for_dataset(name))
                 for name, source in parsed.items() if name not in rows})  # Hub sources
    if Path(out).is_dir():
        raise InputError(f"--out {out}: is a directory; expected the path of the tagged .jsonl file")
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    domains.check_vocabulary(tokenizer, model_name)
    return domains, {name: rows[name] for name in parsed}, tokenizer


def add_tagging_flags(parser, model_help: str = "Hub id or local directory") -> None:
    """The flags ``python -m conftok.tagging`` and ``ray_jobs.tag`` share (the same rows, model and output)."""
    from conftok.inputs import positive_int

    parser.add_argument("--model_name", required=True, help=model_help)
    parser.add_argument("--data", nargs="+", required=True, metavar="DATASET=SOURCE",
                        help="raw rows per data set: local .jsonl/.parquet or a Hub name (split --split)")
    parser.add_argument("--out", required=True, help="tagged JSONL to write (a .summary.json goes beside it)")
    parser.add_argument("--split", default="train", help="split for Hub sources")
    parser.add_argument("--limit", type=positive_int, default=None, help="rows per data set")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="rows per generate() call")
    parser.add_argument("--max_new_tokens", type=positive_int, default=16)
    parser.add_argument("--domains", default=None, help="domains JSON/YAML file (default: read/med)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 weights")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the model's repo (off: transformers' own classes only)")


def main(argv: list[str] | None = None) -> int:
    """``python -m conftok.tagging --model_name M --data boolq=train.jsonl medqa=train.jsonl --out tagged/m/m_all_tagged.jsonl``"""
    import argparse

    import torch

    from conftok.inputs import InputError

    parser = argparse.ArgumentParser(
        prog="python -m conftok.tagging",
        description="Tag raw rows with a base model's own answers (<C_X> right, <U_X> wrong).")
    add_tagging_flags(parser)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    try:  # every row and the tokens checked before the model is loaded or --out written
        domains, sources, tokenizer = check_tag_inputs(args.model_name, args.data, args.out, split=args.split,
                                                       limit=args.limit, domains=args.domains,
                                                       trust_remote_code=args.trust_remote_code)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name, dtype=torch.bfloat16 if args.bf16 else torch.float32, use_safetensors=True,
        trust_remote_code=args.trust_remote_code).to(device).eval()
    path, summary = tag_to_file(model, tokenizer, sources, args.out, domains=domains, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens)
    for name, d in summary["domains"].items():
        print(f"{name}: {d['tagged']} tagged, accuracy {100 * d['accuracy']:.1f}% ({d['unparsed']} unparsed)")
    print(f"Wrote {path}")
    return 0

