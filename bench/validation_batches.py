"""Validation's batching (``conftok.evaluate.plan_batches``) timed side by side on SmolLM2 and real rows.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/validation_batches.py [--rows 128] [--batch_size 64] \
        [--batchings rows padding tokens] [--rounds 2] [--no-bf16]

``conftok.evaluate.evaluate`` on the same rows (the first ``--rows`` / 2 BoolQ and MedQA dev rows of
``--data``), once per batching in each round, the order rotated from round to round, after one untimed
warm-up on two rows. Model: SmolLM2-135M-Instruct through ``conftok.build_model`` (LoRA r=16, merged
for generation as validation does), the token rows moved by seeded noise as in ``bench/validation.py``,
bf16 autocast as ``conftok.train`` validates (``--no-bf16``: fp32). Reports each batching's plan (batches,
the most rows in one, the positions the prefills compute and their padding share), its median samples/s,
its ratio to ``rows`` within each round, and whether its records are ``rows``' (answers, tokens,
p_confident within the dtype's tolerance: in bf16 a row's rounding depends on its batch's padding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from benchlib import (compare_records, machine_info, markdown_table, median, read_raw_rows,  # noqa: E402
                      validation_plan, write_json)
from validation import P_TOLERANCE, add_model_arguments, smollm2_for_validation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="rows in all, half BoolQ, half MedQA")
    parser.add_argument("--batch_size", type=int, default=64, help="evaluate's batch (TrainConfig's eval_batch_size)")
    parser.add_argument("--batchings", nargs="+", default=["rows", "padding", "tokens"],
                        choices=["rows", "padding", "tokens"])
    parser.add_argument("--rounds", type=int, default=2)
    add_model_arguments(parser, "validation_batches.json")
    args = parser.parse_args(argv)
    if "rows" not in args.batchings:
        parser.error("--batchings needs rows: the others are compared with it")

    import torch

    from conftok.evaluate import evaluate
    from conftok.prompts import encode_prompt

    model, tokenizer, domains, amp = smollm2_for_validation(args)

    raw = read_raw_rows(args.data, args.rows // 2)
    n = sum(map(len, raw.values()))
    lengths = {name: [len(encode_prompt(tokenizer, domains.for_dataset(name).build_question(r))) for r in rows]
               for name, rows in raw.items()}
    # As generate plans them: per data set, the answer budget + the token's step.
    plans = {b: validation_plan(lengths, args.batch_size, b, args.max_new_tokens + 1) for b in args.batchings}

    def run(batching):
        return evaluate(model, tokenizer, raw, domains=domains, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, progress=False, batching=batching)["records"]

    times = {b: [] for b in args.batchings}
    records = {}
    with amp():
        for batching in args.batchings:
            evaluate(model, tokenizer, {k: v[:1] for k, v in raw.items()}, domains=domains, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, progress=False, batching=batching)
        for k in range(args.rounds):
            order = args.batchings[k % len(args.batchings):] + args.batchings[:k % len(args.batchings)]
            for batching in order:
                start = time.perf_counter()
                records[batching] = run(batching)
                times[batching].append(n / (time.perf_counter() - start))
                print(f"round {k + 1}: {batching}: {times[batching][-1]:.3f} samples/s", flush=True)
    tolerance = P_TOLERANCE["bf16" if args.bf16 else "fp32"]
    result = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct (LoRA r=16, token rows perturbed)",
              "dtype": "bf16" if args.bf16 else "fp32", "rows": n, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "batchings": {}}
    for batching in args.batchings:
        ratios = [t / r for t, r in zip(times[batching], times["rows"])]
        result["batchings"][batching] = {
            **plans[batching], "samples_per_s": {"per_round": times[batching], "median": median(times[batching])},
            "over_rows": median(ratios), "over_rows_per_round": ratios,
            "agreement_with_rows": compare_records(records["rows"], records[batching], tolerance)}
    write_json(args.out, result)
    print(f"\n{n} rows ({n // 2} BoolQ + {n // 2} MedQA), batch {args.batch_size}, {result['dtype']}, threads "
          f"{torch.get_num_threads()}, {args.max_new_tokens} new tokens, {args.rounds} rounds\n")
    rows = []
    for batching, r in result["batchings"].items():
        agree = r["agreement_with_rows"]
        rows.append([batching, r["batches"], r["most_rows"], f"{r['positions']:,}", f"{r['padding_share']:.1%}",
                     r["samples_per_s"]["median"], f"{r['over_rows']:.2f}x",
                     " ".join(f"{x:.2f}" for x in r["over_rows_per_round"]),
                     f"{agree['same_response']}/{agree['rows']}, max |dp| {agree['max_abs_p_confident_diff']:.2g}"])
    print(markdown_table(["batching", "batches", "most rows", "positions", "padding", "samples/s", "x rows",
                          "per round", "records as rows'"], rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
