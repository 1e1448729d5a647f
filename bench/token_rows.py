"""The new tokens' rows computed alone (``conftok.token_rows.TokenRowsOnly``) against PEFT's rebuilt matrices.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/token_rows.py [--steps 6] [--threads 2]     # CPU or GPU

PEFT's ``TrainableTokensLayer`` builds the embedding matrix (and an untied head's) anew at every
forward and gives the copy a gradient; ``TokenRowsOnly`` computes the same function from the frozen
matrix and the four new rows. Each model below takes training steps as ``conftok.train`` takes them
(``conftok.train.TrainStep``, bf16 autocast, the default loss: placement and stored KL, AdamW), once with
PEFT's forward and once with the rows alone, interleaved step by step after a warm-up, on the same
batches:

- ``smollm2``: SmolLM2-135M-Instruct (vocabulary 49,152, hidden 576, tied head) on real BoolQ/MedQA rows
  from ``--data``, batch 8, length-grouped as ``conftok.train`` batches them;
- ``qwen7b_rows``: the matrices of Qwen2.5-7B (vocabulary 152,064, hidden 3,584, untied head, bf16, random)
  around one narrow decoder layer (MLP 128), so that what is timed is mostly the embedding and the head:
  batch 8 of ``--short`` random tokens with the new tokens among them.

Reported per model: the median step time of each, their ratio, and the bytes the step's operations
allocated (``torch.profiler`` with ``profile_memory``: every allocation counted once, what is freed
included), which is the traffic PEFT's copies add, on any device.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from benchlib import (DEFAULT_DATA, interleave, machine_info, markdown_table, median, read_raw_rows,  # noqa: E402
                      write_json, write_tagged_rows)


def allocated_bytes(fn) -> int:
    """Bytes allocated by the operations of one call of ``fn``: each operation's own allocations (not its
    children's), freed ones included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(getattr(e, "self_cpu_memory_usage", 0) or 0, 0) + max(getattr(e, "self_device_memory_usage", 0) or 0, 0)
               for e in prof.events())


def compare(name: str, model, batches, steps: int, warmup: int, cfg, confidence_ids, confident_ids, sync) -> dict:
    import torch

    from conftok.train import TrainStep

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step = TrainStep(model, optimizer, loss_kwargs=cfg.loss_kwargs(), confidence_ids=confidence_ids,
                     confident_ids=confident_ids, bf16=True, max_grad_norm=cfg.max_grad_norm)
    rows = step.rows

    def run(use_rows: bool):
        def one(k: int) -> None:
            step.rows = rows if use_rows else nullcontext()
            step.add(batches[k % len(batches)])
            reading = step.read()
            if not all(math.isfinite(v) for v in [*reading.losses, reading.grad_norm]):
                raise FloatingPointError(f"{name}: losses {reading.losses}, gradient norm {reading.grad_norm}")
            step.apply()
        return one

    variants = {"PEFT's rebuilt matrices": run(False), "the rows alone (TokenRowsOnly)": run(True)}
    times = interleave(variants, rounds=steps, warmup=warmup, sync=sync)
    peft, ours = (median(times[v]) for v in variants)
    memory = {v: allocated_bytes(lambda v=v: variants[v](0)) for v in variants}
    step.rows = rows
    return {"model": name, "steps": steps, "step_s": {v: median(times[v]) for v in variants},
            "step_times_s": times, "ratio_peft_over_rows": peft / ours,
            "allocated_gib": {v: memory[v] / 2**30 for v in variants}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--short", type=int, default=32, help="tokens a row for the 7B-shaped matrices")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=["smollm2", "qwen7b_rows"], choices=["smollm2", "qwen7b_rows"])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=str(BENCH / "results" / "token_rows.json"))
    args = parser.parse_args(argv)

    import torch

    from conftok.config import TrainConfig
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import attach_base_topk
    from conftok.modeling import build_model
    from conftok.sampler import LengthGroupedBatchSampler
    from conftok.tokens import token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = TrainConfig()
    domains = resolve_domains(cfg.domains)
    n_batches = args.warmup + args.steps
    results = []

    def ids_of(tokenizer):
        ids = token_ids(tokenizer, domains.tokens)
        return sorted(ids.values()), sorted(ids[d.confident_token] for d in domains)

    if "smollm2" in args.only:
        from conftok.smollm import ensure_smollm2

        model, tokenizer = build_model(str(ensure_smollm2()), domains=domains, backend="hf", bf16=True,
                                       gradient_checkpointing=False, seed=0, device=device)
        model.train()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tagged.jsonl"
            n_rows = n_batches * args.batch_size
            write_tagged_rows(read_raw_rows(args.data, -(-n_rows // 2)), domains, path, seed=0)
            dataset = ConfidenceDataset(path, tokenizer, cfg.max_seq_length, domains=domains)
        attach_base_topk(dataset, model, cfg.stored_kl_top_k, progress=False)
        collate = ConfidenceCollator(tokenizer.pad_token_id)
        groups = LengthGroupedBatchSampler(dataset.lengths(), args.batch_size, seed=0, epoch=0).batches()
        batches = [collate([dataset[i] for i in b]) for b in groups]
        results.append(compare("smollm2", model, batches, args.steps, args.warmup, cfg, *ids_of(tokenizer), sync))
        print(results[-1], flush=True)
        del model

    if "qwen7b_rows" in args.only:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        from conftok.smollm import ensure_smollm2

        tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
        config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_theta=1e6)
        torch.manual_seed(0)
        with torch.device(device):
            base = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model, tokenizer = build_model(base, tokenizer=tokenizer, domains=domains, backend="hf", bf16=True,
                                       gradient_checkpointing=False, seed=0, device=device)
        model.train()
        confidence_ids, confident_ids = ids_of(tokenizer)
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(n_batches):
            ids = torch.randint(0, 40000, (args.batch_size, args.short), generator=gen)
            ids[:, 3] = confidence_ids[0]  # a new token inside the input: the embedding's rows are used
            ids[:, -1] = torch.tensor(confidence_ids)[torch.randint(0, 4, (args.batch_size,), generator=gen)]
            labels = torch.full_like(ids, -100)
            labels[:, -1] = ids[:, -1]
            answer = torch.zeros_like(ids)
            answer[:, -4:-1] = 1
            k = cfg.stored_kl_top_k
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                            "answer_mask": answer,
                            "base_topk_ids": torch.randint(0, 40000, (args.batch_size, 3, k), generator=gen),
                            "base_topk_logp": torch.full((args.batch_size, 3, k), -8.0).half()})
        results.append(compare("qwen7b_rows", model, batches, args.steps, args.warmup, cfg, confidence_ids,
                               confident_ids, sync))
        print(results[-1], flush=True)

    table = markdown_table(
        ["model", "PEFT step s", "rows alone step s", "PEFT / rows", "allocated GiB a step, PEFT", "rows alone"],
        [[r["model"], *r["step_s"].values(), r["ratio_peft_over_rows"], *r["allocated_gib"].values()]
         for r in results])
    print(table)
    write_json(args.out, {"machine": machine_info(), "device": str(device), "args": vars(args), "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
