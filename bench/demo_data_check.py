"""Does the demo data give SmolLM2-135M both right and wrong answers?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/demo_data_check.py [--n 40] [--split train]

Generates greedily (chat template, short answers) on the first ``--n`` demo rows of each
domain, parses the answers with ``conftok.answers`` and prints, per domain, the parse rate
(answers the parser could read) and the accuracy (right answers over all rows; an unparseable
answer counts as wrong, as in tagging). The confidence token needs both outcomes, so the target
is an accuracy well inside (0, 1) -- ideally 30-80 % -- with a parse rate above 80 %.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftok.answers import (  # noqa: E402
    normalize_option_label,
    normalize_yes_no_label,
    parse_option_letter,
    parse_yes_no,
)
from conftok.demo_data import make_boolq_rows, make_medqa_rows  # noqa: E402
from conftok.smollm import ensure_smollm2  # noqa: E402


def boolq_prompt(row: dict) -> str:
    return f"{row['passage']}\n\nQuestion: {row['question']}?\nAnswer yes or no."


def medqa_prompt(row: dict) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in row["options"].items())
    return f"{row['question']}\n\n{options}\n\nAnswer with the letter of the correct option."


@torch.inference_mode()
def generate_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends at the last position."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # (B, new)
        answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def score(name: str, rows: list[dict], answers: list[str], show: int) -> dict:
    parsed = right = 0
    predicted = collections.Counter()
    for row, answer in zip(rows, answers):
        if name == "boolq":
            guess, truth = parse_yes_no(answer), normalize_yes_no_label(row["answer"])
        else:
            guess = parse_option_letter(answer, row["options"])
            truth = normalize_option_label(row["answer"], row["options"])
        predicted[guess] += 1
        parsed += guess is not None
        right += guess == truth
    n = len(rows)
    print(f"\n{name}: n={n}  parse rate {parsed / n:.1%}  accuracy {right / n:.1%}  "
          f"(accuracy among parsed {right / max(parsed, 1):.1%})  predictions {dict(predicted)}")
    for row, answer in list(zip(rows, answers))[:show]:
        print(f"  truth={row['answer']!s:5}  answer={answer!r}")
    return {"parse_rate": parsed / n, "accuracy": right / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="rows per domain")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--show", type=int, default=8, help="answers to print per domain")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    model_dir = ensure_smollm2(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"model {model_dir} ready in {time.perf_counter() - started:.1f} s")

    domains = {
        "boolq": (make_boolq_rows(args.n, args.seed, split=args.split), boolq_prompt),
        "medqa": (make_medqa_rows(args.n, args.seed, split=args.split), medqa_prompt),
    }
    for name, (rows, build_prompt) in domains.items():
        started = time.perf_counter()
        answers = generate_answers(
            model, tokenizer, [build_prompt(r) for r in rows], args.max_new_tokens, args.batch_size
        )
        score(name, rows, answers, args.show)
        print(f"  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
