"""Batched validation (``conftok.evaluate``) against the seed's per-row loop, on SmolLM2 and real rows.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/validation.py [--rows 48] [--rounds 3] [--batch_size 16] [--threads 1]

The per-row loop is the seed's: one ``generate`` per row (no padding), then a separate forward over
prompt + answer for the token's distribution (``benchlib.evaluate_per_row``). The batched path is
``conftok.evaluate.evaluate``: rows sorted by length, left-padded batches, p_confident read from the
generation step where the row stopped (for a row cut by max_new_tokens, one decode step more).

Model: SmolLM2-135M-Instruct through ``conftok.build_model`` (LoRA r=16, bf16 weights, bf16 autocast
as ``conftok.train`` validates). A fresh adapter leaves the C and U rows equal to the end-of-turn
row, so p_confident would be exactly 0.5 everywhere and no token ever emitted; the token rows are
moved by seeded noise (the spread of the embedding's rows) so that both paths have something to
disagree on. Rows: BoolQ and MedQA dev rows from ``--data``, half each, cut into ``--rounds``
chunks; each round times the batched path then the per-row loop on the same chunk (A, B, A, B,
...), after one untimed warm-up of each. Reports each path's median rate, the median over rounds of
the ratio of the two rates, and the outputs' agreement (in bf16, rounding differs between a padded
batch and a lone row and can flip a near-tie in greedy decoding; ``--no-bf16`` checks in fp32).
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

from benchlib import (DEFAULT_DATA, compare_records, evaluate_per_row, machine_info, markdown_table, median,  # noqa: E402
                      read_raw_rows, write_json)

P_TOLERANCE = {"bf16": 0.02, "fp32": 1e-4}  # p_confident across padded batch vs lone row: rounding only


def perturb_token_rows(model, seed: int) -> int:
    """Move the trainable token rows (PEFT ``trainable_token_indices`` deltas) by seeded noise with the
    embedding rows' own spread; returns how many tensors were changed."""
    import torch

    scale = model.get_input_embeddings().weight.float().std().item()
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise.to(param.dtype))
                changed += 1
    if not changed:
        raise RuntimeError("no trainable_tokens_delta parameters: is the model built with conftok.build_model?")
    return changed


def add_model_arguments(parser: argparse.ArgumentParser, out_name: str) -> None:
    """The arguments :func:`smollm2_for_validation` and the rows need, and ``--out`` (``results/out_name``)."""
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with boolq/ and medqa/ dev.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BENCH / "results" / out_name))


def smollm2_for_validation(args):
    """SmolLM2-135M-Instruct through ``conftok.build_model``, its token rows perturbed, in eval mode; returns
    ``(model, tokenizer, domains, amp)``, ``amp()`` the autocast validation runs under (bf16 or none)."""
    import contextlib

    import torch

    from conftok.domains import resolve_domains
    from conftok.modeling import build_model
    from conftok.smollm import ensure_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    domains = resolve_domains(None)
    model, tokenizer = build_model(str(ensure_smollm2()), domains=domains, backend="hf", bf16=args.bf16,
                                   gradient_checkpointing=False, seed=args.seed)
    perturb_token_rows(model, args.seed)
    model.eval()
    device = next(model.parameters()).device
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    return model, tokenizer, domains, amp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=48, help="rows in all, half BoolQ, half MedQA")
    parser.add_argument("--rounds", type=int, default=3, help="chunks of rows, each timed on both paths")
    parser.add_argument("--batch_size", type=int, default=16, help="evaluate's batch (TrainConfig's eval_batch_size)")
    add_model_arguments(parser, "validation.json")
    args = parser.parse_args(argv)

    import torch

    from conftok.evaluate import evaluate

    model, tokenizer, domains, amp = smollm2_for_validation(args)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    half = args.rows // 2
    raw = read_raw_rows(args.data, half + 1)  # the extra row per set is the warm-up's
    warm = {name: rows[half:] for name, rows in raw.items()}
    rounds = []
    for k in range(args.rounds):
        lo, hi = k * half // args.rounds, (k + 1) * half // args.rounds
        rounds.append({name: rows[lo:hi] for name, rows in raw.items()})

    def batched(rows):
        return evaluate(model, tokenizer, rows, domains=domains, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, progress=False)["records"]

    def per_row(rows):
        return evaluate_per_row(model, tokenizer, rows, domains=domains, max_new_tokens=args.max_new_tokens)

    paths = {"batched": batched, "per_row": per_row}
    times = {name: [] for name in paths}
    records = {name: [] for name in paths}
    with amp():
        for fn in paths.values():
            fn(warm)
        for chunk in rounds:
            n = sum(map(len, chunk.values()))
            for name, fn in paths.items():
                sync()
                start = time.perf_counter()
                records[name] += fn(chunk)
                sync()
                times[name].append(n / (time.perf_counter() - start))  # samples/s of this round
    agreement = compare_records(records["batched"], records["per_row"], P_TOLERANCE["bf16" if args.bf16 else "fp32"])
    rates = {name: median(values) for name, values in times.items()}
    # Both paths ran on the same rows in each round: the ratio within a round compares like with like.
    ratios = [b / r for b, r in zip(times["batched"], times["per_row"])]
    result = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct (LoRA r=16, token rows perturbed)",
              "dtype": "bf16" if args.bf16 else "fp32", "rows": len(records["batched"]), "rounds": args.rounds,
              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "samples_per_s": {name: {"per_round": values, "median": rates[name]} for name, values in times.items()},
              "batched_over_per_row": median(ratios), "batched_over_per_row_per_round": ratios,
              "agreement": agreement,
              "token_rate": sum(r["token"] is not None for r in records["batched"]) / len(records["batched"])}
    write_json(args.out, result)
    print(f"\n{result['rows']} rows ({half} BoolQ + {half} MedQA) in {args.rounds} rounds, {result['dtype']}, "
          f"threads {torch.get_num_threads()}, {args.max_new_tokens} new tokens\n")
    print(markdown_table(["path", "median samples/s", "per round"],
                         [[f"evaluate, batch {args.batch_size}", rates["batched"],
                           " ".join(f"{x:.2f}" for x in times["batched"])],
                          ["per row (generate, then a forward)", rates["per_row"],
                           " ".join(f"{x:.2f}" for x in times["per_row"])]]))
    print(f"\nbatched / per row: {result['batched_over_per_row']:.2f}x (median of rounds: "
          f"{' '.join(f'{x:.2f}' for x in ratios)}); outputs: {agreement['same_response']}/"
          f"{agreement['rows']} responses, {agreement['same_token']}/{agreement['rows']} tokens equal, max "
          f"|p_confident difference| {agreement['max_abs_p_confident_diff']:.2g} -> "
          f"{'equal' if agreement['equal'] else 'NOT equal'} (tolerance {agreement['p_tolerance']:g}); "
          f"token emitted on {result['token_rate']:.0%} of rows\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
