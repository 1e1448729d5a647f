"""conftok's training step against TRL's SFTTrainer with completion-only loss, on SmolLM2 and real rows.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py [--steps 3] [--batch_size 8] [--threads 1]

One LoRA model (SmolLM2-135M-Instruct, ``conftok.build_model``: r=16 on all seven projections, the
four confidence tokens' rows trained, bf16 weights) and one set of rows (BoolQ and MedQA dev rows
from ``--data``, answers the gold answer's text then a C or U token at random), cut into the same
batches of the same rows for every variant. The variants run interleaved, step by step (A, B, C, A,
B, C, ...), so that load from other work on the machine hits each alike. Reported: each variant's
median step time, and its speed-up over TRL as the median over rounds of TRL's step time over its
own on the same batch (and the ratio of total times).

What is timed, for each variant: one optimizer step on one batch, from the batch on the host to the
optimizer's ``zero_grad``, under bf16 autocast; nothing else (no data loading, no TRL set-up).

- ``conftok``: ``conftok.loss.training_loss`` with ``TrainConfig().loss_kwargs()`` (the default
  guard terms), then backward, gradient clipping and AdamW, as ``conftok.train`` takes a step.
- ``conftok token only``: the same with ``placement_weight=0, kl_weight=0``.
- ``TRL``: ``SFTTrainer.training_step`` (``compute_loss``, then the backward through its
  accelerator) on a batch from the trainer's own data collator, then clipping and the trainer's own
  AdamW (``create_optimizer``). The rows are prompt/completion conversations (the question; the
  answer and the token), prepared by the trainer with ``completion_only_loss=True``: the loss covers
  the answer, the token and the end of turn.

TRL 1.15's own loss (a fused LM head: per-token log-probabilities of the supervised positions only)
runs Triton kernels, which need a GPU: where they cannot load, the trainer's loss here is
``transformers.Trainer.compute_loss`` on the same completion-only labels (full-vocabulary logits,
which is what SFTTrainer computed before the fused head). Which one ran is printed and recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from benchlib import (DEFAULT_DATA, interleave, machine_info, markdown_table, median, read_raw_rows,  # noqa: E402
                      write_json, write_tagged_rows)


def trl_trainer_class():
    """``(SFTTrainer or a subclass, description of its loss)``; see the module docstring."""
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None:
        return SFTTrainer, "TRL's fused LM head (log-probabilities of the supervised positions only; Triton)"

    class SFTTrainerWithoutTriton(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return SFTTrainerWithoutTriton, ("transformers.Trainer.compute_loss: full-vocabulary logits, cross-entropy on "
                                     "TRL's completion-only labels (TRL's fused head needs Triton, absent here)")


def build_trl_trainer(model, tokenizer, rows, args, cfg, workdir):
    """An SFTTrainer over ``rows`` (prompt/completion conversations) for the already-wrapped model."""
    import datasets
    from trl import SFTConfig

    trainer_cls, loss_note = trl_trainer_class()
    conversations = [{"prompt": [{"role": "user", "content": r.question}],
                      "completion": [{"role": "assistant", "content": f"{r.answer} {r.token}"}]} for r in rows]
    sft_args = SFTConfig(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size, completion_only_loss=True, bf16=True,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_seq_length, gradient_checkpointing=args.gradient_checkpointing, shuffle_dataset=False,
        report_to="none", save_strategy="no", seed=args.seed, use_cpu=args.device == "cpu",
    )
    trainer = trainer_cls(model=model, args=sft_args, train_dataset=datasets.Dataset.from_list(conversations),
                          processing_class=tokenizer)
    lm_head = trainer.model.get_output_embeddings()
    if not hasattr(lm_head, "bias"):
        # TRL's fused head reads lm_head.bias; PEFT's TrainableTokensWrapper (trainable_token_indices) forwards
        # only .weight. SmolLM2's head has no bias: say so on the wrapper (TRL 1.15 raises AttributeError).
        lm_head.bias = None
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    return trainer, loss_note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with boolq/ and medqa/ dev.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BENCH / "results" / "train_step.json"))
    args = parser.parse_args(argv)

    import torch

    from conftok.config import TrainConfig
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import training_loss
    from conftok.modeling import build_model
    from conftok.smollm import ensure_smollm2
    from conftok.tokens import token_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig()
    domains = resolve_domains(cfg.domains)
    model, tokenizer = build_model(str(ensure_smollm2()), domains=domains, backend="hf", bf16=True,
                                   gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                                   lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    model.train()
    device = next(model.parameters()).device
    n_batches = args.warmup + args.steps
    n_rows = n_batches * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tagged.jsonl"
        write_tagged_rows(read_raw_rows(args.data, -(-n_rows // 2)), domains, path, seed=args.seed)
        dataset = ConfidenceDataset(path, tokenizer, cfg.max_seq_length, domains=domains)
        # Same rows, same order for both: BoolQ and MedQA mixed by a seeded permutation.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()[:n_rows]
        batches_idx = [order[k * args.batch_size:(k + 1) * args.batch_size] for k in range(n_batches)]
        trainer, trl_loss = build_trl_trainer(model, tokenizer, dataset.kept_rows, args, cfg, Path(tmp) / "trl")
        if len(trainer.train_dataset) != len(dataset):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(dataset)} rows: batches would differ")
        collate = ConfidenceCollator(tokenizer.pad_token_id)
        ours = [collate([dataset[i] for i in idx]) for idx in batches_idx]
        theirs = [trainer.data_collator([trainer.train_dataset[i] for i in idx]) for idx in batches_idx]

        confidence_ids = sorted(token_ids(tokenizer, domains.tokens).values())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
        amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

        def conftok_step(loss_kwargs):
            def run(k):
                batch = {key: v.to(device) for key, v in ours[k].items()}
                with amp():
                    loss = training_loss(model, batch, confidence_ids=confidence_ids, **loss_kwargs).loss
                loss.item()  # conftok.train reads it each step (NaN check, logs)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return run

        def trl_step(k):
            with amp():
                trainer.training_step(trainer.model, theirs[k])  # forward, loss, backward; returns loss.detach()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        variants = {"conftok": conftok_step(cfg.loss_kwargs()),
                    "conftok token only": conftok_step({"placement_weight": 0.0, "kl_weight": 0.0}),
                    "TRL SFTTrainer": trl_step}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        print(f"{len(dataset)} rows, {n_batches} batches of {args.batch_size}; sequence lengths conftok "
              f"{[b['input_ids'].shape[1] for b in ours]}, TRL {[b['input_ids'].shape[1] for b in theirs]}; "
              f"threads {torch.get_num_threads()}", flush=True)
        times = interleave({name: run for name, run in variants.items()}, rounds=args.steps, warmup=args.warmup,
                           sync=sync)

    supervised = {"conftok": 1.0, "conftok token only": 1.0,
                  "TRL SFTTrainer": sum(int((b["labels"] != -100).sum()) for b in theirs) / n_rows}
    trl_times = times["TRL SFTTrainer"]
    result = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct (bf16 weights, LoRA r=16 fp32)",
              "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
              "gradient_checkpointing": args.gradient_checkpointing, "defaults_loss_kwargs": cfg.loss_kwargs(),
              "trl_loss": trl_loss, "rows": len(dataset), "variants": {}}
    for name, values in times.items():
        # Each round ran every variant on the same batch: the ratio within a round compares like with like,
        # whatever that batch's length and whatever the machine's load at that moment.
        ratios = [t / v for t, v in zip(trl_times, values)]
        result["variants"][name] = {"step_s": values, "median_step_s": median(values),
                                    "samples_per_s": args.batch_size / median(values),
                                    "speedup_over_trl_per_round": ratios, "speedup_over_trl": median(ratios),
                                    "speedup_over_trl_total": sum(trl_times) / sum(values),
                                    "supervised_positions_per_row": supervised[name]}
    write_json(args.out, result)
    print(f"\nTRL's loss here: {trl_loss}\ndefaults: {cfg.loss_kwargs()}\n")
    print(markdown_table(["variant", "median step s", "samples/s", "speed-up over TRL (median of rounds)",
                          "(total time)", "per round", "supervised positions/row", "steps (s)"],
                         [[name, v["median_step_s"], v["samples_per_s"], v["speedup_over_trl"],
                           v["speedup_over_trl_total"], " ".join(f"{x:.2f}" for x in v["speedup_over_trl_per_round"]),
                           v["supervised_positions_per_row"], " ".join(f"{x:.2f}" for x in v["step_s"])]
                          for name, v in result["variants"].items()]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
