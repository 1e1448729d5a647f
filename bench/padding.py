"""How much of a training batch is padding? Shuffled batches against length-grouped ones.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/padding.py [--batch_sizes 4 8 16 32] [--epochs 3]

The rows are the real BoolQ and MedQA dev rows in ../shared/data (read here, never copied into
the project), written as tagged rows (question built by each domain's ``build_question``, the gold
answer, then the confidence token) to a temporary file and tokenized by ``ConfidenceDataset`` with
the SmolLM2 tokenizer, exactly as training tokenizes them. For each batch size it prints the
padding share (padded positions / all positions, each batch padded to its longest row) of

- random batches, as ``train`` drew them before the sampler (``DataLoader(shuffle=True)`` with a
  generator seeded by seed + epoch), and
- ``LengthGroupedBatchSampler`` batches (``group_by_length=True``, the default),

each the mean over ``--epochs`` epochs. No model is run; a few seconds once the tokenizer is cached.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/padding.py --validation [--val_rows 128 0] [--val_batch_sizes 16 64 256]

``--validation`` does the same for validation's prompts (``conftok.evaluate.plan_batches``, per data
set, as ``evaluate`` batches them): for the first ``--val_rows`` rows of each data set (0: all), batches
of ``batch_size`` rows (``"rows"``, a GPU's default) against ``"tokens"`` and ``"padding"`` (a CPU's
default) batches: the batches, the most rows in one, the positions the prefill computes and their
padding share. It also prints an estimate, not a measurement: seconds = batches x ``--steps`` x a
decode step + prefill positions x a position's cost, for each ``--decode_step_ms`` (a decode step
bound by launching kernels costs the same at any batch size) at ``--prefill_position_us``. The defaults are what the second H200 run gives for the 7B-shaped model
(bench/README.md, "Validation batches"): 120 ms a step eager on that host, 47 on the first H200's, 6 for a
step replayed as a CUDA graph (the weights read once), 25 us a prefill position.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
SOURCES = {"boolq": DATA / "boolq" / "dev.jsonl", "medqa": DATA / "medqa" / "dev.jsonl"}


def write_tagged_rows(sources: dict[str, Path], domains, out: Path) -> int:
    """Raw rows -> ``{"question", "tagged_response", "dataset"}`` lines with the gold answer and the C token."""
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for dataset, path in sources.items():
            domain = domains.for_dataset(dataset)
            for line in path.open(encoding="utf-8"):
                if line.strip():
                    row = json.loads(line)
                    tagged = f"{domain.gold_answer(row)} {domain.confident_token}"
                    f.write(json.dumps({"question": domain.build_question(row), "tagged_response": tagged,
                                        "dataset": dataset}) + "\n")
                    n += 1
    return n


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The batches of ``DataLoader(range(n), batch_size, shuffle=True, generator=manual_seed(seed))``."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged per figure")
    parser.add_argument("--seed", type=int, default=42, help="TrainConfig's default seed")
    parser.add_argument("--max_seq_length", type=int, default=2048, help="TrainConfig's default")
    parser.add_argument("--group_factor", type=int, default=None, help="sampler's (default: its own)")
    parser.add_argument("--validation", action="store_true", help="validation's batches instead (see above)")
    parser.add_argument("--val_rows", type=int, nargs="+", default=[128, 0], help="rows per data set; 0: all")
    parser.add_argument("--val_batch_sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=17, help="decode steps a batch (16 new tokens + the token's)")
    parser.add_argument("--decode_step_ms", type=float, nargs="+", default=[120.0, 47.0, 6.0])
    parser.add_argument("--prefill_position_us", type=float, default=25.0)
    args = parser.parse_args(argv)
    missing = [str(p) for p in SOURCES.values() if not p.is_file()]
    if missing:
        print(f"error: real rows not found: {missing}", file=sys.stderr)
        return 2
    if args.validation:
        return validation_batches(args)

    from conftok.data import ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.modeling import load_tokenizer
    from conftok.sampler import DEFAULT_GROUP_FACTOR, LengthGroupedBatchSampler, padding_share
    from conftok.smollm import ensure_smollm2
    from conftok.tokens import add_confidence_tokens

    domains = resolve_domains(None)
    tokenizer = load_tokenizer(ensure_smollm2())
    add_confidence_tokens(tokenizer, None, domains.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tagged.jsonl"
        n_rows = write_tagged_rows(SOURCES, domains, path)
        dataset = ConfidenceDataset(path, tokenizer, args.max_seq_length, domains=domains)
    lengths = dataset.lengths()
    group_factor = args.group_factor or DEFAULT_GROUP_FACTOR
    print(f"{len(lengths)} of {n_rows} rows (BoolQ + MedQA dev, SmolLM2 tokenizer, max_seq_length "
          f"{args.max_seq_length}): mean {sum(lengths) / len(lengths):.0f} tokens, min {min(lengths)}, "
          f"max {max(lengths)}; mean of {args.epochs} epochs, seed {args.seed}, group_factor {group_factor}")
    print(f"{'batch':>5}  {'random':>7}  {'grouped':>7}  {'positions/epoch random -> grouped':>34}")
    for batch_size in args.batch_sizes:
        shares, positions = {"random": [], "grouped": []}, {"random": 0, "grouped": 0}
        for epoch in range(args.epochs):
            drawn = {
                "random": random_batches(len(lengths), batch_size, args.seed + epoch),
                "grouped": list(LengthGroupedBatchSampler(lengths, batch_size, seed=args.seed, epoch=epoch,
                                                          group_factor=group_factor)),
            }
            for kind, batches in drawn.items():
                shares[kind].append(padding_share(batches, lengths))
                positions[kind] += sum(len(b) * max(lengths[i] for i in b) for b in batches)
        mean = {k: sum(v) / len(v) for k, v in shares.items()}
        positions = {k: v // args.epochs for k, v in positions.items()}
        print(f"{batch_size:>5}  {mean['random']:>7.1%}  {mean['grouped']:>7.1%}  "
              f"{positions['random']:>15,} -> {positions['grouped']:>,} ({positions['grouped'] / positions['random']:.2f}x)")
    return 0


def validation_batches(args) -> int:
    from benchlib import validation_plan
    from conftok.domains import resolve_domains
    from conftok.evaluate import BATCHINGS
    from conftok.modeling import load_tokenizer
    from conftok.prompts import encode_prompt
    from conftok.smollm import ensure_smollm2

    domains = resolve_domains(None)
    tokenizer = load_tokenizer(ensure_smollm2())
    prompt_lengths = {}
    for dataset, path in SOURCES.items():
        domain = domains.for_dataset(dataset)
        rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
        prompt_lengths[dataset] = [len(encode_prompt(tokenizer, domain.build_question(row))) for row in rows]
    steps = ", ".join(f"{ms:g} ms" for ms in args.decode_step_ms)
    print(f"validation prompts (SmolLM2 tokenizer), per data set as evaluate batches them; estimated samples/s "
          f"at a decode step of {steps}, {args.steps} steps a batch, {args.prefill_position_us:g} us a prefill position")
    print(f"{'rows':>5} {'batch':>5} {'batching':>8} {'batches':>7} {'most rows':>9} {'positions':>10} {'padding':>7}  "
          f"estimated samples/s")
    for n in args.val_rows:
        lengths = {d: (ls[:n] if n else ls) for d, ls in prompt_lengths.items()}
        rows = sum(map(len, lengths.values()))
        for batch_size in args.val_batch_sizes:
            for batching in BATCHINGS:
                plan = validation_plan(lengths, batch_size, batching, args.steps)  # as generate plans them
                estimate = [rows / (plan["batches"] * args.steps * ms / 1e3
                                    + plan["positions"] * args.prefill_position_us / 1e6)
                            for ms in args.decode_step_ms]
                print(f"{rows:>5} {batch_size:>5} {batching:>8} {plan['batches']:>7} {plan['most_rows']:>9} "
                      f"{plan['positions']:>10,} {plan['padding_share']:>7.1%}  "
                      + "  ".join(f"{e:6.1f}" for e in estimate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
