"""What do the placement and KL terms cost a training step? Token-only vs +placement vs +placement+KL.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_terms.py [--steps 6] [--batch_size 8] [--data FILE]

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

VARIANTS = {"token only": (0.0, 0.0), "+ placement": (1.0, 0.0), "+ placement + KL": (1.0, 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=768)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data", default=str(ROOT / "bench" / "results" / "real_data_work" / "tagged.jsonl"),
                        help="tagged JSONL (question, tagged_response, dataset)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"error: {args.data} not found; run bench/real_data.py first or pass --data", file=sys.stderr)
        return 2

    import torch

    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import training_loss
    from conftok.modeling import build_model
    from conftok.smollm import ensure_smollm2
    from conftok.tokens import token_ids

    torch.manual_seed(0)
    domains = resolve_domains(None)
    model, tokenizer = build_model(str(ensure_smollm2()), domains=domains, backend="hf", bf16=True,
                                   gradient_checkpointing=args.gradient_checkpointing, seed=0)
    model.train()
    conf_ids = sorted(token_ids(tokenizer, domains.tokens).values())
    ds = ConfidenceDataset(args.data, tokenizer, args.max_seq_length, domains=domains)
    collate = ConfidenceCollator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=gen).tolist()
    batches = [collate([ds[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]])
               for k in range(args.steps + 1)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    answer_tokens = [int(b["answer_mask"].sum(1).max()) for b in batches]
    print(f"{len(ds)} examples; batch {args.batch_size}; longest answer per batch {answer_tokens}; "
          f"sequence lengths {[b['input_ids'].shape[1] for b in batches]}")
    for k, batch in enumerate(batches):
        for name, (placement, kl) in VARIANTS.items():
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                terms = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=placement,
                                      kl_weight=kl)
            terms.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if k:  # the first batch warms up every variant
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["token only"])
    print(f"\n{'variant':<20} {'median step s':>14} {'ratio':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20} {median:>14.2f} {median / base:>7.2f}")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.1f} GiB "
          f"(gradient checkpointing {'on' if args.gradient_checkpointing else 'off'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
