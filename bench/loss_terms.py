"""What does each guard cost a training step, as a ratio to the token-only loss?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_terms.py [--steps 6] [--batch_size 8] [--data FILE] \
        [--domains FILE] [--out results/loss_terms_NAME.json]

Variants: token only; + placement; + placement + live KL (a second forward); + placement + answer
cross-entropy (all rows; right answers only); + placement + stored top-k KL (its one-time base pass is
timed apart); + placement + answer CE with class-balanced token weights.

One SmolLM2-135M-Instruct LoRA model (r=16 on all projections, bf16 weights, gradient
checkpointing as in TrainConfig's default), the same batches for every variant, interleaved
(variant A step, variant B step, ...) so that machine noise hits all of them alike. A step is
forward + backward + AdamW. Prints the median step time of each variant and its ratio to the
token-only loss, and the peak resident memory of the process (ru_maxrss) at the end.

Data: the real-data bench's tagged file (bench/results/real_data_work/tagged.jsonl, written by
bench/real_data.py), or any tagged file given with --data.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "token only": {},
    "+ placement": dict(placement_weight=1.0),
    "+ placement + live KL": dict(placement_weight=1.0, kl_weight=1.0),
    "+ placement + answer CE (all)": dict(placement_weight=1.0, answer_ce_weight=1.0),
    "+ placement + answer CE (right only)": dict(placement_weight=1.0, answer_ce_weight=1.0, answer_ce_rows="correct"),
    "+ placement + stored KL": dict(placement_weight=1.0, stored_kl_weight=1.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=768)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data", default=str(ROOT / "bench" / "results" / "real_data_work" / "tagged.jsonl"),
                        help="tagged JSONL (question, tagged_response, dataset)")
    parser.add_argument("--domains", default=None, help="domains file (default: read/med)")
    parser.add_argument("--top_k", type=int, default=32, help="stored KL: base log-probabilities kept per position")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found; run bench/real_data.py first or pass --data", file=sys.stderr)
        return 2

    import torch

    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import attach_base_topk, training_loss
    from conftok.modeling import build_model
    from conftok.smollm import ensure_smollm2
    from conftok.tokens import token_ids

    torch.manual_seed(0)
    domains = resolve_domains(args.domains)
    model, tokenizer = build_model(str(ensure_smollm2()), domains=domains, backend="hf", bf16=True,
                                   gradient_checkpointing=args.gradient_checkpointing, seed=0)
    model.train()
    ids = token_ids(tokenizer, domains.tokens)
    conf_ids = sorted(ids.values())
    confident_ids = sorted(ids[d.confident_token] for d in domains)
    ds = ConfidenceDataset(args.data, tokenizer, args.max_seq_length, domains=domains)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()[:(args.steps + 1) * args.batch_size]
    ds.examples = [ds.examples[i] for i in order]  # only the rows timed below need the base pass
    t = time.perf_counter()
    attach_base_topk(ds, model, args.top_k, batch_size=16, progress=False)
    base_pass_s = time.perf_counter() - t
    model.train()
    collate = ConfidenceCollator(tokenizer.pad_token_id)
    batches = [collate([ds[i] for i in range(k * args.batch_size, (k + 1) * args.batch_size)])
               for k in range(args.steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    answer_tokens = [int(b["answer_mask"].sum(1).max()) for b in batches]
    print(f"{len(ds)} examples; batch {args.batch_size}; longest answer per batch {answer_tokens}; "
          f"sequence lengths {[b['input_ids'].shape[1] for b in batches]}")
    for k, batch in enumerate(batches):
        for name, kwargs in VARIANTS.items():
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                terms = training_loss(model, batch, confidence_ids=conf_ids, confident_ids=confident_ids, **kwargs)
            terms.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if k:  # the first batch warms up every variant
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["token only"])
    print(f"\n{'variant':<38} {'median step s':>14} {'ratio':>7}")
    figures = {}
    for name, values in times.items():
        median = statistics.median(values)
        figures[name] = {"median_step_s": median, "ratio_to_token_only": median / base, "steps": values}
        print(f"{name:<38} {median:>14.3f} {median / base:>7.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    per_row = base_pass_s / len(ds)
    print(f"\nstored KL's one-time base pass: {base_pass_s:.1f} s for {len(ds)} rows ({per_row:.3f} s a row, "
          f"about {per_row * args.batch_size / base:.2f} token-only steps per batch of rows, once per run)")
    print(f"peak RSS {rss:.1f} GiB (gradient checkpointing {'on' if args.gradient_checkpointing else 'off'})")
    if args.out:
        import json

        Path(args.out).write_text(json.dumps({"data": args.data, "batch_size": args.batch_size, "steps": args.steps,
                                              "gradient_checkpointing": args.gradient_checkpointing,
                                              "variants": figures, "stored_kl_base_pass_s": base_pass_s,
                                              "stored_kl_rows": len(ds), "peak_rss_gib": rss}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
