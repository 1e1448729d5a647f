"""What the benchmark scripts share: real rows, tagged training rows, the seed's per-row validation,
output comparison, timing and machine facts.

The rows are the real BoolQ and MedQA dev rows (``../shared/data`` by default), read at run time and
never copied into the project. Imports only the standard library at module level, so a script can
parse its arguments before torch and transformers load; needs nothing beyond torch, transformers
and PEFT (no datasets, Ray or optuna), so it runs on a bare GPU box.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DATA_FILES = {"boolq": Path("boolq") / "dev.jsonl", "medqa": Path("medqa") / "dev.jsonl"}


def read_raw_rows(data_dir: str | os.PathLike, limit_per_dataset: int | None = None,
                  offset: int = 0) -> dict[str, list[dict]]:
    """``{"boolq": rows, "medqa": rows}`` from ``DATA_DIR/{boolq,medqa}/dev.jsonl``, rows
    ``offset .. offset + limit`` of each file (all from ``offset`` when ``limit`` is None)."""
    data_dir = Path(data_dir)
    missing = [str(data_dir / rel) for rel in DATA_FILES.values() if not (data_dir / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"real rows not found: {missing} (give --data DIR holding boolq/dev.jsonl and "
                                "medqa/dev.jsonl; ../shared/data beside the checkout, or .device/data on a GPU box)")
    out = {}
    for dataset, rel in DATA_FILES.items():
        with (data_dir / rel).open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        end = None if limit_per_dataset is None else offset + limit_per_dataset
        out[dataset] = rows[offset:end]
    return out


def answer_text(domain, row: Mapping[str, Any]) -> str:
    """The gold answer as a model would write it: ``Yes``/``No``, or ``C. <option text>``."""
    gold = domain.gold_answer(row)
    options = row.get("options")
    if isinstance(options, Mapping) and gold in options:
        return f"{gold}. {options[gold]}"
    return gold.capitalize()


def write_tagged_rows(rows_by_dataset: Mapping[str, Sequence[Mapping]], domains, out: Path, seed: int = 0) -> int:
    """Tagged training rows (``question``, ``tagged_response``, ``dataset``): the domain's question, the
    gold answer and a C or U token drawn at random (a speed benchmark needs realistic lengths only)."""
    rng = random.Random(seed)
    n = 0
    with Path(out).open("w", encoding="utf-8") as f:
        for dataset, rows in rows_by_dataset.items():
            domain = domains.for_dataset(dataset)
            for row in rows:
                token = rng.choice(domain.tokens)
                f.write(json.dumps({"question": domain.build_question(row), "dataset": dataset,
                                    "tagged_response": f"{answer_text(domain, row)} {token}"}) + "\n")
                n += 1
    return n


def evaluate_per_row(model, tokenizer, rows_by_dataset: Mapping[str, Sequence[Mapping]], *, domains,
                     max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """Validation in the seed's manner: one ``generate`` per row (no padding), then a separate forward
    over prompt + answer for the token's distribution. Returns records with the keys of
    :func:`conftok.evaluate.evaluate`'s that matter here (``response``, ``token``, ``p_confident``,
    ``answer``, ``correct``), rows in the order given. Generation settings are the batched path's
    (:data:`conftok.evaluate.GREEDY`, stop at any confidence token or end of turn, no confidence token at the
    first step, ``max_new_tokens`` for the answer and one step more for the token)."""
    import torch

    from conftok.evaluate import GREEDY
    from conftok.loss import confidence_logits, p_confident
    from conftok.prompts import encode_prompt
    from conftok.tokens import end_of_turn_token_id

    device = next(model.parameters()).device
    vocab = tokenizer.get_vocab()
    token_of = {vocab[t]: t for t in domains.tokens}
    stop = sorted({i for i in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer), *token_of) if i is not None})
    was_training = model.training
    model.eval()
    records = []
    try:
        with torch.no_grad():
            for dataset, rows in rows_by_dataset.items():
                domain = domains.for_dataset(dataset)
                c_id, u_id = (vocab[t] for t in domain.tokens)
                for row in rows:
                    prompt = encode_prompt(tokenizer, domain.build_question(row))
                    ids = torch.tensor([prompt], device=device)
                    # The answer's budget, then the token's step: what conftok.evaluate gives a row.
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY,
                                         max_new_tokens=max_new_tokens + 1, eos_token_id=stop,
                                         pad_token_id=tokenizer.pad_token_id, begin_suppress_tokens=list(token_of))
                    seq = out[0, len(prompt):].tolist()
                    cut = next((k for k, t in enumerate(seq) if t in stop), len(seq))
                    answer_ids = seq[:min(cut, max_new_tokens)]  # a row that has not stopped: cut to the budget
                    text = tokenizer.decode(answer_ids, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False).strip()
                    # The seed's second pass: the token's distribution after prompt + answer.
                    context = torch.tensor([prompt + answer_ids], device=device)
                    logits = confidence_logits(model, context, torch.ones_like(context))  # (1, V)
                    answer = domain.parse_answer(text, row)
                    records.append({"dataset": dataset, "id": row.get("id"), "response": text, "answer": answer,
                                    "correct": answer is not None and answer == domain.gold_answer(row),
                                    "token": token_of.get(seq[cut]) if cut < len(seq) else None,
                                    "p_confident": float(p_confident(logits[0], c_id, u_id))})
    finally:
        model.train(was_training)
    return records


def compare_records(batched: Sequence[Mapping], per_row: Sequence[Mapping], p_tolerance: float) -> dict[str, Any]:
    """Row-by-row agreement of two validation runs over the same rows (same order).

    ``equal`` is True when every response and every emitted token agree and p_confident differs by at most
    ``p_tolerance`` on every row (rounding: padding and batch shape change the summation order)."""
    if len(batched) != len(per_row):
        raise ValueError(f"compare_records: {len(batched)} batched records against {len(per_row)} per-row ones")
    same_response = sum(a["response"] == b["response"] for a, b in zip(batched, per_row))
    same_token = sum(a["token"] == b["token"] for a, b in zip(batched, per_row))
    diffs = [abs(a["p_confident"] - b["p_confident"]) for a, b in zip(batched, per_row)
             if a["response"] == b["response"]]
    max_dp = max(diffs, default=0.0)
    n = len(batched)
    # Positions, not the data sets' own ids: results are committed, rows of ../shared/data never are.
    differing = [k for k, (a, b) in enumerate(zip(batched, per_row))
                 if a["response"] != b["response"] or a["token"] != b["token"]]
    return {"rows": n, "same_response": same_response, "same_token": same_token,
            "max_abs_p_confident_diff": max_dp, "p_tolerance": p_tolerance, "differing_rows": differing,
            "equal": same_response == n and same_token == n and max_dp <= p_tolerance}


def interleave(variants: Mapping[str, Callable[[int], Any]], rounds: int, warmup: int = 1,
               sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Run each variant once per round, in turn (A, B, A, B, ...), so that load from other work on the
    machine hits all of them alike. ``variants[name](k)`` runs round ``k``; the first ``warmup`` rounds
    are not timed. Returns the timed seconds per variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for k in range(warmup + rounds):
        for name, run in variants.items():
            sync()
            start = time.perf_counter()
            run(k)
            sync()
            if k >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def validation_plan(lengths_by_set: Mapping[str, Sequence[int]], batch_size: int, batching: str,
                    decode_steps: int) -> dict[str, Any]:
    """``conftok.evaluate.plan_batches`` per data set, as ``evaluate`` batches them: the batches, the most rows
    in one, the positions the prefills compute and their padding share."""
    from conftok.evaluate import plan_batches

    batches = most = positions = real = 0
    for lengths in lengths_by_set.values():
        plan = plan_batches(lengths, batch_size, batching, decode_steps=decode_steps)
        batches += len(plan)
        most = max([most] + [len(b) for b in plan])
        positions += sum(len(b) * max(lengths[i] for i in b) for b in plan)
        real += sum(lengths)
    return {"batches": batches, "most_rows": most, "positions": positions, "padding_share": 1 - real / positions}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def git_commit() -> str | None:
    """``$CONFTOK_COMMIT`` when set (the device command sets it from .device/commit, which
    bench/device_prep.sh writes: the copy of the tree on a GPU box may carry a stale .git or none);
    else the checkout's short commit, ``+dirty`` with uncommitted changes to tracked files."""
    if os.environ.get("CONFTOK_COMMIT"):
        return os.environ["CONFTOK_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if not out.returncode:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        load = os.getloadavg()
        info["load_average"] = [round(x, 2) for x in load]
    except OSError:
        pass
    return info


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
