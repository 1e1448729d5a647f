"""conftok's training step against TRL's SFTTrainer with completion-only loss, on SmolLM2 and real rows.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py [--batches 8] [--batch_size 8] [--threads 2]

One set of rows (BoolQ and MedQA dev rows from ``--data``, answers the gold answer's text then a C
or U token at random, ``--batches`` x ``--batch_size`` of them: one epoch), and SmolLM2-135M-Instruct
with LoRA from ``conftok.build_model`` (r=16 on all seven projections, the four confidence tokens'
rows trained, bf16 weights), twice with the same seed: once with gradient checkpointing on (TRL's
default), once as ``conftok.train``'s ``gradient_checkpointing="auto"`` decides for this epoch's
longest batch (on a CPU with memory to spare: off). Every variant trains one epoch of the same rows,
one step at a time, interleaved (A, B, C, ..., A, B, C, ...) so that load from other work on the
machine hits each alike, after ``--warmup`` untimed steps each. Timed: one optimizer step, from the
collated batch on the host to the optimizer's ``zero_grad``, under bf16 autocast.

Two comparisons, both printed:

- **Like for like**: TRL's own batches (its default random sampler), checkpointing on for all:
  ``TRL`` (``SFTTrainer.training_step`` on a batch from its collator, then clipping and its AdamW;
  the rows are prompt/completion conversations, ``completion_only_loss=True``: answer, token and end
  of turn supervised), ``conftok`` on the same rows (``conftok.train.TrainStep``, the step
  ``conftok.train`` takes, with ``TrainConfig().loss_kwargs()``, the default guards: loss, backward,
  one read, clipping, AdamW) and ``conftok token only``. Only the loss differs; the speed-up is the
  median over steps of TRL's time over conftok's on the same batch.
- **As shipped**: each tool with its own defaults for what it controls, on the same rows: TRL's
  random batches with checkpointing on, against ``conftok.train``'s length-grouped batches
  (``LengthGroupedBatchSampler``, seed 0, epoch 0) with ``auto`` checkpointing and, when the default
  guard is the stored KL, its one-time base pass over the rows added to conftok's time. Also TRL
  tuned by hand the same way (``train_sampling_strategy="group_by_length"``, checkpointing off), to
  show how much of the gap two TRL flags close. Ratios of total epoch times.

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


def build_trl_trainer(model, tokenizer, rows, args, cfg, workdir, *, gradient_checkpointing: bool,
                      sampling: str = "random"):
    """An SFTTrainer over ``rows`` (prompt/completion conversations) for the already-wrapped model."""
    import datasets
    from trl import SFTConfig

    trainer_cls, loss_note = trl_trainer_class()
    conversations = [{"prompt": [{"role": "user", "content": r.question}],
                      "completion": [{"role": "assistant", "content": f"{r.answer} {r.token}"}]} for r in rows]
    sft_args = SFTConfig(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size, completion_only_loss=True, bf16=True,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_seq_length, gradient_checkpointing=gradient_checkpointing, shuffle_dataset=False,
        train_sampling_strategy=sampling, report_to="none", save_strategy="no", seed=args.seed,
        use_cpu=args.device == "cpu",
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


def trainer_epoch(trainer, batch_size: int, seed: int) -> list[list[int]]:
    """The row indices of one epoch's batches as the trainer's own sampler draws them (seeded)."""
    import torch

    torch.manual_seed(seed)
    order = list(trainer._get_train_sampler(trainer.train_dataset))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_share(batches) -> float:
    """Padded positions over all positions of collated batches (``attention_mask`` zeros)."""
    total = sum(b["attention_mask"].numel() for b in batches)
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="batches in the epoch, every one timed")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with boolq/ and medqa/ dev.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BENCH / "results" / "train_step.json"))
    args = parser.parse_args(argv)

    import time

    import torch

    from conftok.config import TrainConfig
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import attach_base_topk
    from conftok.memory import auto_gradient_checkpointing
    from conftok.modeling import build_model, enable_gradient_checkpointing
    from conftok.sampler import LengthGroupedBatchSampler
    from conftok.smollm import ensure_smollm2
    from conftok.tokens import token_ids
    from conftok.train import TrainStep

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig()
    domains = resolve_domains(cfg.domains)
    path_model = str(ensure_smollm2())

    def lora_model(checkpointing: bool):
        model, tokenizer = build_model(path_model, domains=domains, backend="hf", bf16=True,
                                       gradient_checkpointing=checkpointing, seed=args.seed, lora_r=cfg.lora_r,
                                       lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
        model.train()
        return model, tokenizer

    model_on, tokenizer = lora_model(True)
    model_auto, _ = lora_model(False)
    device = next(model_on.parameters()).device
    n_rows = args.batches * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tagged.jsonl"
        write_tagged_rows(read_raw_rows(args.data, -(-n_rows // 2)), domains, path, seed=args.seed)
        dataset = ConfidenceDataset(path, tokenizer, cfg.max_seq_length, domains=domains)
        if len(dataset) != n_rows:
            raise RuntimeError(f"{len(dataset)} rows kept of {n_rows}: the data has too few rows")
        lengths = dataset.lengths()
        # conftok.train's decision for this epoch (its longest row sets the batch's shape).
        auto_on = auto_gradient_checkpointing(model_auto, batch_size=args.batch_size, seq_len=max(lengths))
        if auto_on:
            enable_gradient_checkpointing(model_auto)
        base_pass_s = 0.0
        if cfg.stored_kl_weight:
            start = time.perf_counter()
            attach_base_topk(dataset, model_auto, cfg.stored_kl_top_k, batch_size=cfg.eval_batch_size, progress=False)
            base_pass_s = time.perf_counter() - start

        trl, trl_loss = build_trl_trainer(model_on, tokenizer, dataset.kept_rows, args, cfg, Path(tmp) / "trl",
                                          gradient_checkpointing=True)
        trl_tuned, _ = build_trl_trainer(model_auto, tokenizer, dataset.kept_rows, args, cfg, Path(tmp) / "trl2",
                                         gradient_checkpointing=auto_on, sampling="group_by_length")
        for t in (trl, trl_tuned):
            if len(t.train_dataset) != len(dataset):
                raise RuntimeError(f"TRL kept {len(t.train_dataset)} of {len(dataset)} rows: batches would differ")
        collate = ConfidenceCollator(tokenizer.pad_token_id)
        trl_idx = trainer_epoch(trl, args.batch_size, args.seed)
        tuned_idx = trainer_epoch(trl_tuned, args.batch_size, args.seed)
        grouped_idx = LengthGroupedBatchSampler(lengths, args.batch_size, seed=cfg.seed, epoch=0).batches()
        for name, epoch in (("TRL", trl_idx), ("TRL grouped", tuned_idx), ("conftok", grouped_idx)):
            if sorted(i for b in epoch for i in b) != list(range(n_rows)):
                raise RuntimeError(f"{name}'s epoch does not hold every row once")
        epochs = {
            "trl": [trl.data_collator([trl.train_dataset[i] for i in idx]) for idx in trl_idx],
            "trl_tuned": [trl_tuned.data_collator([trl_tuned.train_dataset[i] for i in idx]) for idx in tuned_idx],
            "ours_same": [collate([dataset[i] for i in idx]) for idx in trl_idx],
            "ours_grouped": [collate([dataset[i] for i in idx]) for idx in grouped_idx],
        }

        ids = token_ids(tokenizer, domains.tokens)
        confidence_ids, confident_ids = sorted(ids.values()), sorted(ids[d.confident_token] for d in domains)
        amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

        def conftok_step(model, batches, loss_kwargs):
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            step = TrainStep(model, optimizer, loss_kwargs=loss_kwargs, confidence_ids=confidence_ids,
                             confident_ids=confident_ids, bf16=True, max_grad_norm=cfg.max_grad_norm)

            def run(k):  # as conftok.train steps: forward and backward, one read (losses, norm), AdamW
                step.add(batches[k])
                step.read()
                step.apply()
            return run

        def trl_step(trainer, batches):
            params = [p for p in trainer.model.parameters() if p.requires_grad]

            def run(k):
                with amp():
                    trainer.training_step(trainer.model, batches[k])  # forward, loss, backward
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
            return run

        token_only = {"placement_weight": 0.0, "kl_weight": 0.0, "stored_kl_weight": 0.0, "answer_ce_weight": 0.0}
        variants = {
            "TRL SFTTrainer (its defaults: random batches, checkpointing on)": trl_step(trl, epochs["trl"]),
            "conftok defaults, TRL's batches, checkpointing on": conftok_step(model_on, epochs["ours_same"],
                                                                              cfg.loss_kwargs()),
            "conftok token only, TRL's batches, checkpointing on": conftok_step(model_on, epochs["ours_same"],
                                                                                token_only),
            f"conftok as shipped (length-grouped, checkpointing auto: {'on' if auto_on else 'off'})":
                conftok_step(model_auto, epochs["ours_grouped"], cfg.loss_kwargs()),
            f"TRL tuned (group_by_length, checkpointing {'on' if auto_on else 'off'})":
                trl_step(trl_tuned, epochs["trl_tuned"]),
        }
        names = list(variants)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        shapes = {key: [b["input_ids"].shape[1] for b in batches] for key, batches in epochs.items()}
        print(f"{n_rows} rows, {args.batches} batches of {args.batch_size}; padded lengths {shapes}; "
              f"threads {torch.get_num_threads()}; stored KL base pass {base_pass_s:.1f} s", flush=True)
        # Warm-up steps take the epoch's first batches; then every batch once, in the epoch's order.
        def in_epoch_order(run):
            return lambda k: run(k - args.warmup if k >= args.warmup else k)

        times = interleave({name: in_epoch_order(run) for name, run in variants.items()}, rounds=args.batches,
                           warmup=args.warmup, sync=sync)

    trl_name, same_name, token_name, shipped_name, tuned_name = names
    trl_total = sum(times[trl_name])
    supervised = sum(int((b["labels"] != -100).sum()) for b in epochs["trl"]) / n_rows
    padding = {"trl": padded_share(epochs["trl"]), "trl_tuned": padded_share(epochs["trl_tuned"]),
               "ours_same": padded_share(epochs["ours_same"]), "ours_grouped": padded_share(epochs["ours_grouped"])}
    padding_of = {trl_name: padding["trl"], same_name: padding["ours_same"], token_name: padding["ours_same"],
                  shipped_name: padding["ours_grouped"], tuned_name: padding["trl_tuned"]}
    result = {"machine": machine_info(), "model": "SmolLM2-135M-Instruct (bf16 weights, LoRA r=16 fp32)",
              "batch_size": args.batch_size, "batches": args.batches, "rows": n_rows, "warmup": args.warmup,
              "auto_gradient_checkpointing": auto_on, "defaults_loss_kwargs": cfg.loss_kwargs(),
              "stored_kl_base_pass_s": base_pass_s, "trl_loss": trl_loss,
              "trl_supervised_positions_per_row": supervised, "padding_share": padding, "variants": {}}
    for name in names:
        values = times[name]
        extra = base_pass_s if name == shipped_name else 0.0
        total = sum(values) + extra
        v = {"step_s": values, "median_step_s": median(values), "epoch_s": total, "one_time_s": extra,
             "samples_per_s": n_rows / total, "padding_share": padding_of[name],
             "speedup_over_trl_epoch": trl_total / total}
        if name in (same_name, token_name):
            # Same batch in each round: the ratio within a round compares like with like, whatever that
            # batch's length and whatever the machine's load at that moment.
            v["speedup_over_trl_per_step"] = [t / x for t, x in zip(times[trl_name], values)]
            v["speedup_over_trl_median_step"] = median(v["speedup_over_trl_per_step"])
        result["variants"][name] = v
    shipped = result["variants"][shipped_name]
    result["as_shipped_speedup_without_base_pass"] = trl_total / sum(times[shipped_name])
    # A default run trains num_epochs epochs and pays the base pass once: later epochs cost what this one did.
    epochs_run = cfg.num_epochs
    result["as_shipped_speedup_default_epochs"] = {
        "num_epochs": epochs_run,
        "speedup": epochs_run * trl_total / (epochs_run * sum(times[shipped_name]) + base_pass_s)}
    result["defaults_over_token_only_median_step"] = median(
        [a / b for a, b in zip(times[same_name], times[token_name])])
    write_json(args.out, result)
    print(f"\nTRL's loss here: {trl_loss}\ndefaults: {cfg.loss_kwargs()}\n")
    print(markdown_table(
        ["variant", "epoch s", "samples/s", "padding", "speed-up over TRL (epoch)", "median of per-step ratios",
         "steps (s)"],
        [[name, v["epoch_s"], v["samples_per_s"], f"{v['padding_share']:.1%}", v["speedup_over_trl_epoch"],
          v.get("speedup_over_trl_median_step", ""), " ".join(f"{x:.2f}" for x in v["step_s"])]
         for name, v in result["variants"].items()]))
    many = result["as_shipped_speedup_default_epochs"]
    print(f"\nconftok as shipped: {shipped['speedup_over_trl_epoch']:.2f}x TRL's epoch "
          f"({result['as_shipped_speedup_without_base_pass']:.2f}x without the {base_pass_s:.1f} s base pass, as when "
          f"the reference is reused; {many['speedup']:.2f}x over a default run of {many['num_epochs']} epochs, the "
          "base pass once); "
          f"the default guards cost {result['defaults_over_token_only_median_step']:.2f}x a token-only step "
          f"(median of per-step ratios)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
