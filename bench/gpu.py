"""The GPU checks in one run: training-step speed of a Qwen2.5-7B-shaped model, batched validation
against the seed's per-row loop, and the unsloth backend where it is installed.

    python3 bench/gpu.py --tokenizer .device/tokenizer --data .device/data --out $OUT/gpu.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu.py --smoke     # the same code paths, tiny, on the CPU

Needs torch, transformers and PEFT only (no network, Ray, datasets or optuna); bench/README.md
gives the one-line command for a lent GPU box and bench/device_prep.sh what travels with it.

- The model: Qwen2.5-7B's shape (hidden 3584, 28 layers, 28/4 heads, MLP 18944, vocab 152,064,
  untied, rope theta 1e6) with random weights, built on the GPU in bf16; LoRA r=16 on all seven
  projections and the four confidence tokens through ``conftok.build_model``. The tokenizer is
  SmolLM2's (``--tokenizer DIR``; by default ``conftok.smollm.ensure_smollm2()``'s directory): its
  ids fit Qwen's embedding matrix, and the new tokens land in its spare rows as they do for Qwen.
- The rows: BoolQ and MedQA dev rows (``--data DIR``), questions from each domain's
  ``build_question``, answers the gold answer's text then a C or U token at random.
- ``train``: a step as ``conftok.train`` takes it (bf16 autocast, loss, backward, clipping, AdamW)
  for three losses, token only (``placement_weight=0, kl_weight=0``), the defaults
  (``TrainConfig().loss_kwargs()``) and full-vocabulary logits with labels masked to the token
  (``masked_lm_loss``, what a stock causal-LM trainer computes), each with gradient checkpointing on
  and off, on length-grouped batches (``LengthGroupedBatchSampler``) and on random ones. The
  configurations of one checkpointing setting are timed in ``--rounds`` rounds, interleaved, their
  order rotated each round; each figure is the median of a configuration's round means (``--steps``
  steps each, after ``--warmup`` untimed ones in the first round: a process's first steps run about
  2x slower), and the spread between its rounds is reported beside it. Model FLOPs per step follow
  the formula printed with the table; the first warm-up step of each configuration is also counted
  by ``torch.utils.flop_counter`` as a check. ``--losses ... defaults_before`` adds the default loss
  with the device reads of the step before ``conftok.train.TrainStep`` and PEFT's token rows, and
  prints its step time over the defaults'.
- ``validate``: ``conftok.evaluate.evaluate`` at batch 16, 64 and 256 against one ``generate`` per row
  then a separate forward for the token's distribution (the seed's way), outputs compared.
- ``profile``: where validation and a training step spend their time. Validation at
  ``TrainConfig().eval_batch_size`` under variants timed back to back (as ``conftok.train`` runs it,
  with the LoRA merged for generation; unmerged; without autocast; the adapter disabled; 2x and 4x
  the batch); a
  prefill and each decode step of one batch timed by hand (unmerged, merged, the base model); and
  ``torch.profiler`` tables (the ops with the most GPU and the most CPU time) for one ``generate`` (merged,
  as evaluate runs it) and one training step per loss.
- ``unsloth``: the defaults and token-only steps through ``backend='unsloth'`` in a child process
  (unsloth must be imported before transformers); skipped with the reason when not importable, reported
  as failed (and the script exits 1, the other phases' figures written) when the child fails.

Writes JSON (``--out``) and prints markdown tables, with each target and whether it is met.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from benchlib import (DEFAULT_DATA, compare_records, evaluate_per_row, machine_info, markdown_table,  # noqa: E402
                      read_raw_rows, write_json, write_tagged_rows)

PHASES = ("matmul", "train", "validate", "profile", "unsloth")
DEFAULT_LOSSES = ("token_only", "defaults", "full_logits")
# defaults_before: the default loss with the device reads conftok.train's step made before TrainStep (make_step),
# timed beside "defaults" to measure what one read a step and the new tokens' rows alone are worth on a GPU.
LOSSES = DEFAULT_LOSSES + ("defaults_before",)
# Further guards to time beside the defaults (--guards), as TrainConfig overrides: the candidates of
# bench/run_studies.py, so the step cost of whichever becomes the default is measured here too.
GUARD_VARIANTS = {
    "live_kl": dict(placement_weight=1.0, kl_weight=1.0, answer_ce_weight=0.0, stored_kl_weight=0.0),
    "answer_ce_all": dict(placement_weight=1.0, kl_weight=0.0, answer_ce_weight=1.0, answer_ce_rows="all",
                          stored_kl_weight=0.0),
    "answer_ce_correct": dict(placement_weight=1.0, kl_weight=0.0, answer_ce_weight=1.0, answer_ce_rows="correct",
                              stored_kl_weight=0.0),
    "stored_kl": dict(placement_weight=1.0, kl_weight=0.0, answer_ce_weight=0.0, stored_kl_weight=1.0),
    "placement": dict(placement_weight=1.0, kl_weight=0.0, answer_ce_weight=0.0, stored_kl_weight=0.0),
}
# Qwen2.5-7B-Instruct's config.json, less the token ids (the SmolLM2 tokenizer's are used).
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                 tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072, max_window_layers=28,
                 attention_dropout=0.0, initializer_range=0.02)
SMOKE_SHAPE = dict(QWEN25_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
TARGETS = {"defaults_samples_per_s": 32.0, "defaults_matmul_share": 0.35, "validation_samples_per_s": 100.0,
           "batched_over_per_row": 5.0, "grouped_padding_share": 0.05}
# p_confident may differ by rounding between a padded batch and a lone row (bf16 autocast).
P_TOLERANCE_BF16 = 0.02


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: every code path in well under a minute")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: conftok.smollm.ensure_smollm2())")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="directory holding boolq/dev.jsonl and medqa/dev.jsonl")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/gpu.json, gpu_smoke.json with --smoke)")
    p.add_argument("--only", nargs="+", choices=PHASES, default=None, help="run these phases only")
    p.add_argument("--skip", nargs="+", choices=PHASES, default=[], help="leave these phases out")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(DEFAULT_LOSSES))
    p.add_argument("--guards", nargs="*", choices=list(GUARD_VARIANTS), default=[],
                   help="also time these guards (rows named guard:NAME), each as a ratio to token-only")
    p.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument("--batching", nargs="+", choices=("grouped", "random"), default=["grouped", "random"])
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default 8; 4 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 3; 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration and round (default 8; 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of timed steps, the configurations interleaved, order rotated; the median round counts "
                        "and the spread between rounds is reported (default 3; 2)")
    p.add_argument("--rows", type=int, default=None, help="training rows per data set (default all; 24)")
    p.add_argument("--val_rows", type=int, default=None, help="rows for batched validation, half per domain (256; 8)")
    p.add_argument("--per_row_rows", type=int, default=None, help="rows for the per-row loop, half per domain (16; 4)")
    p.add_argument("--val_batch_sizes", type=int, nargs="+", default=None, help="(16 64 256; 4 8)")
    p.add_argument("--val_batching", nargs="+", choices=["rows", "tokens", "padding", "auto"], default=["rows"],
                   help="validate: evaluate's batching, each timed at every --val_batch_sizes (conftok.evaluate."
                        "plan_batches: batch_size rows a batch; batch_size rows of the longest prompt's positions; "
                        "the fewest positions and decode steps; auto: padding on a CPU, rows on a GPU)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="(16; 4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--static_cache", action="store_true",
                   help="validate and profile: also validate with a static KV cache (evaluate(static_cache=True); on "
                        "CUDA the decode step compiled and replayed as a CUDA graph), after an untimed run that compiles")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer first (TrainConfig.torch_compile); rows say compiled")
    p.add_argument("--unsloth_child", default=None, help=argparse.SUPPRESS)  # internal: child process output file
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(batch_size=(4, 8), warmup=(1, 3), steps=(2, 8), rounds=(2, 3), rows=(24, None), val_rows=(8, 256),
                    per_row_rows=(4, 16), val_batch_sizes=([4, 8], [16, 64, 256]), max_new_tokens=(4, 16))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    if args.out is None:
        args.out = str(BENCH / "results" / ("gpu_smoke.json" if smoke else "gpu.json"))
    args.phases = [ph for ph in (args.only or PHASES) if ph not in args.skip]
    problems = [f"--{n} must be >= 1, got {getattr(args, n)}"
                for n in ("batch_size", "steps", "rounds", "val_rows", "per_row_rows", "max_new_tokens")
                if getattr(args, n) < 1]
    if args.warmup < 1:
        problems.append(f"--warmup must be >= 1 (a first pass over a batch is not a timing), got {args.warmup}")
    if problems:
        p.error("; ".join(problems))
    return args


# ---------------------------------------------------------------- model, data, FLOPs

def build_random_model(shape: dict, tokenizer, device, dtype):
    """A randomly initialised Qwen2 causal LM of ``shape``, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} < tokenizer size {len(tokenizer)}")
    with torch.device(device):  # no fp32 copy on the host: 7.6 B weights straight to the GPU in bf16
        return Qwen2ForCausalLM._from_config(config, dtype=dtype)


def projection_weights(shape: dict) -> int:
    """Weights of the seven projections over all layers: what every token passes through (frozen)."""
    d, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * inter)


FLOP_FORMULA = (
    "model FLOPs/step = (2 forward + 2 backward input-grads [+ 2 recompute with checkpointing]) x N x T "
    "+ (2 + 2) x d x V x P [+ 2 x N x T + 2 x d x V x P for the KL term's no-grad forward]; N = weights of the "
    "7 projections x layers (frozen, so the backward has no weight-gradient GEMMs for them), T = real (non-padding) "
    "tokens of the batch, d x V = lm_head, P = positions whose logits are computed (B for token only, "
    "B x (1 + longest answer) with guard terms, T for full logits; only the live KL term adds a forward). LoRA (r=16, <1%) and attention "
    "scores (~1% at 200 tokens) are left out.")


def loss_positions(loss: str, batch, guard_kwargs: dict) -> tuple[int, bool]:
    """(P, whether a KL forward runs) of the formula, for one batch."""
    rows = batch["input_ids"].shape[0]
    if loss == "full_logits":
        return int(batch["attention_mask"].sum()), False
    kwargs = guard_kwargs if loss.startswith("defaults") else GUARD_VARIANTS.get(loss.removeprefix("guard:"), {})
    if any(v for k, v in kwargs.items() if k.endswith("_weight")):
        longest = int(batch["answer_mask"][:, 1:].sum(-1).max())
        return rows * (1 + longest), bool(kwargs.get("kl_weight"))
    return rows, False


def model_flops(shape: dict, batch, loss: str, checkpointing: bool, guard_kwargs: dict) -> float:
    n, head = projection_weights(shape), shape["hidden_size"] * shape["vocab_size"]
    tokens = int(batch["attention_mask"].sum())
    positions, kl_forward = loss_positions(loss, batch, guard_kwargs)
    flops = (4 + 2 * checkpointing) * n * tokens + 4 * head * positions
    if kl_forward:
        flops += 2 * n * tokens + 2 * head * positions
    return float(flops)


def build_training_batches(tokenizer, data_dir, rows_per_dataset, batch_size, seed, max_seq_length, domains, need):
    """Tokenize the rows; cut an epoch into length-grouped and into random batches.

    Returns ``(lengths, epoch, measured, chosen)``: tokens per row; ``{"grouped": batches, "random":
    batches}`` of the whole epoch (row indices, for its padding share); a ConfidenceDataset of the rows
    the timed configurations use, and ``{"grouped": ..., "random": ...}``, the first ``need`` full
    batches of each epoch as indices into it. Keeping the measured rows apart keeps per-row set-up
    (the stored KL guard's base top-k, when the defaults turn it on) to those rows."""
    import torch

    from conftok.data import ConfidenceDataset
    from conftok.sampler import LengthGroupedBatchSampler

    raw = read_raw_rows(data_dir, rows_per_dataset)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tagged.jsonl"
        write_tagged_rows(raw, domains, path, seed=seed)
        dataset = ConfidenceDataset(path, tokenizer, max_seq_length, domains=domains)
        lengths = dataset.lengths()
        grouped = LengthGroupedBatchSampler(lengths, batch_size, seed=seed, epoch=0).batches()
        # What train drew before the sampler: DataLoader(shuffle=True) with a generator seeded by seed + epoch.
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffled = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        epoch = {"grouped": grouped, "random": shuffled}
        chosen = {}
        for kind, batches in epoch.items():
            chosen[kind] = [b for b in batches if len(b) == batch_size][:need]
            if len(chosen[kind]) < need:
                raise ValueError(f"{len(chosen[kind])} full {kind} batches of {batch_size}, need {need}: give more --rows")
        used = sorted({i for batches in chosen.values() for b in batches for i in b})
        position = {i: k for k, i in enumerate(used)}
        subset = Path(tmp) / "measured.jsonl"
        with subset.open("w", encoding="utf-8") as f:
            for i in used:
                row = dataset.kept_rows[i]
                f.write(json.dumps({"question": row.question, "tagged_response": f"{row.answer} {row.token}",
                                    "dataset": row.dataset}) + "\n")
        measured = ConfidenceDataset(subset, tokenizer, max_seq_length, domains=domains)
    if measured.lengths() != [lengths[i] for i in used]:
        raise RuntimeError("re-tokenized measured rows differ from the epoch's")
    return lengths, epoch, measured, {k: [[position[i] for i in b] for b in v] for k, v in chosen.items()}


def prepare_guards(dataset, model, cfg, log) -> None:
    """What the default guard terms need before the first step (as conftok.train does it)."""
    if getattr(cfg, "stored_kl_weight", 0):
        from conftok import loss

        start = time.perf_counter()
        if hasattr(loss, "attach_base_topk"):
            import inspect

            import torch

            # Under the training's bf16 autocast, as conftok.train computes it (where this conftok takes it).
            amp = ({"autocast_dtype": torch.bfloat16}
                   if "autocast_dtype" in inspect.signature(loss.attach_base_topk).parameters else {})
            loss.attach_base_topk(dataset, model, cfg.stored_kl_top_k, batch_size=cfg.eval_batch_size, progress=False,
                                  **amp)
        else:  # where it lived first
            dataset.attach_base_topk(model, cfg.stored_kl_top_k, batch_size=cfg.eval_batch_size, progress=False)
        log(f"stored KL: base top-{cfg.stored_kl_top_k} of {len(dataset)} rows in {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------- phases

def measure_matmul(device, n: int, reps: int = 20) -> dict:
    """bf16 GEMM rate of an n x n x n product, mean over ``reps`` after 3 warm-ups, on random data."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return {"n": n, "tflops": 2 * n ** 3 / seconds / 1e12, "seconds_per_product": seconds}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()  # a CPU-GPU sync point: timers read only after the queued work ran


def make_loss_fn(loss: str, guard_kwargs: dict):
    """``(compute_loss, loss_kwargs)`` of a measured loss, for :class:`conftok.train.TrainStep`."""
    from conftok.loss import LossTerms, masked_lm_loss, position_ids_from_mask, training_loss

    if loss == "token_only":
        return training_loss, {"placement_weight": 0.0, "kl_weight": 0.0}
    if loss == "defaults":
        return training_loss, guard_kwargs
    if loss == "defaults_before":
        def before(model, batch, facts=None, confidence_ids=(), **kwargs):
            # facts dropped: the loss reads the padding, the labels and the answers' length on the device; the ids
            # come as a list (a copy to the device); the loss is read after the forward.
            terms = training_loss(model, batch, confidence_ids=confidence_ids.tolist(), **kwargs)
            bool(batch["attention_mask"].all())  # train's own padding check before the forward
            terms.loss.item()
            return terms
        return before, guard_kwargs
    if loss.startswith("guard:"):
        return training_loss, GUARD_VARIANTS[loss.removeprefix("guard:")]

    def full_logits(model, batch, **_):  # what TRL's completion-only loss computes: every position's logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits  # (B, T, V)
        loss = masked_lm_loss(logits, batch["labels"])
        zero = loss.new_zeros(())
        return LossTerms(loss, loss, zero, zero, logits[:, -1], zero)
    return full_logits, {}


def make_step(model, optimizer, loss: str, token_ids_, guard_kwargs: dict):
    """The :class:`conftok.train.TrainStep` conftok.train would take for ``loss``: bf16 autocast, one sync a step,
    SDPA's math kernel for every batch once the layers are compiled. ``token_ids_`` = (all confidence token ids,
    the C tokens' ids)."""
    from conftok.compiling import layers_compiled
    from conftok.train import TrainStep

    compute_loss, loss_kwargs = make_loss_fn(loss, guard_kwargs)
    step = TrainStep(model, optimizer, compute_loss=compute_loss, loss_kwargs=loss_kwargs,
                     confidence_ids=token_ids_[0], confident_ids=token_ids_[1], bf16=True,
                     compiled=layers_compiled(model), max_grad_norm=1.0)
    if loss == "defaults_before":  # PEFT's token rows: the whole matrices rebuilt, their indices copied each forward
        step.rows = contextlib.nullcontext()
        step.reads_as_before = True
    return step


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        from conftok.loss import CHECKPOINTING_KWARGS

        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    else:
        base.gradient_checkpointing_disable()


def train_step(step, batch) -> None:
    """One step as conftok.train takes it (:class:`conftok.train.TrainStep`): forward and backward, one read
    (losses, gradient norm), the NaN check, AdamW."""
    step.add(batch)
    if getattr(step, "reads_as_before", False):
        sync(step.device)  # defaults_before: the loss terms were read after the backward
    reading = step.read()
    if not all(math.isfinite(v) for v in [*reading.losses, reading.grad_norm]):
        raise FloatingPointError(f"loss {reading.losses}, gradient norm {reading.grad_norm}")
    step.apply()


def time_steps(step, batches, warmup, device, count_flops: bool = True) -> tuple[list[float], float | None]:
    """Seconds of each timed step (after ``warmup`` untimed ones) and, with ``count_flops``, the FLOPs
    counted on the first step (which is then one of the untimed ones).

    The FLOP count runs the decoder layers uncompiled: torch.compile'd code called under FlopCounterMode (a
    TorchDispatchMode) is skipped by dynamo, and the skip is kept on the code object, so the layers would run
    eagerly for the rest of the process, without a word (pytorch/pytorch#190286; seen on torch 2.13 here: no
    compiled region ran in any later step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from conftok.compiling import uncompiled_layers

    times, counted = [], None
    for k, batch in enumerate(batches):
        if k == 0 and count_flops:
            with uncompiled_layers(step.model), FlopCounterMode(display=False) as counter:
                train_step(step, batch)
            counted = float(counter.get_total_flops())
            continue
        sync(device)
        start = time.perf_counter()
        train_step(step, batch)
        sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return times, counted


def round_figures(rounds: list[list[float]]) -> dict:
    """A configuration's step time from its rounds (each the timed steps over the same batches): the median
    of the rounds' mean step times, and their spread ((max - min) / median), which says how far apart two
    timings of one version fell on this machine: differences between configurations smaller than it are noise."""
    means = sorted(sum(r) / len(r) for r in rounds)
    mid = len(means) // 2
    median = means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2
    steps = [t for r in rounds for t in r]
    return {"step_s": median, "round_step_s": [sum(r) / len(r) for r in rounds],
            "round_spread": (means[-1] - means[0]) / median, "step_s_min": min(steps), "step_s_max": max(steps)}


def warm_up_shapes(model, optimizer, ids_, guard_kwargs, batch_sets, device, losses) -> None:
    """One untimed step on every measured batch with token only (the defaults' forward takes the same inputs),
    and with full logits (one token longer) where that loss is measured.

    A process's first pass over a new shape is slow (kernels loaded lazily, the allocator growing): on the
    H100 the first configuration timed, with only its own 3 warm-up steps, ran token-only steps in 0.78 s
    where the placement guard, timed later, took 0.38 s. Compiled layers also build a graph per variant
    here (a padded batch or not, the first length static, then dynamic), not in a timed step."""
    kinds = ["token_only"] + (["full_logits"] if "full_logits" in losses else [])
    for kind in kinds:
        step = make_step(model, optimizer, kind, ids_, guard_kwargs)
        for batches in batch_sets:
            for batch in batches:
                train_step(step, batch)
    sync(device)


def run_train(model, tokenizer, args, shape, device, measured, chosen, matmul_tflops, log,
              toggle_checkpointing: bool = True, on_row=None) -> list:
    """Time each (checkpointing, batching, loss) configuration; ``on_row(rows)`` after each (the JSON is
    rewritten then, so a run cut short by a time limit keeps the rows it measured)."""
    import torch

    from conftok.config import TrainConfig
    from conftok.data import ConfidenceCollator
    from conftok.sampler import padding_share
    from conftok.tokens import token_ids

    cfg = TrainConfig()
    guard_kwargs = cfg.loss_kwargs()
    domains = cfg_domains()
    ids = token_ids(tokenizer, domains.tokens)
    ids_ = (sorted(ids.values()), sorted(ids[d.confident_token] for d in domains))
    if any(loss.startswith("defaults") for loss in args.losses) or "stored_kl" in args.guards:
        wants_stored = cfg if cfg.stored_kl_weight else TrainConfig(kl_weight=0.0, stored_kl_weight=1.0)
        prepare_guards(measured, model, wants_stored if "stored_kl" in args.guards else cfg, log)
    collate = ConfidenceCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    measured_lengths = measured.lengths()
    results = []
    model.train()
    collated = {batching: [collate([measured[i] for i in b]) for b in chosen[batching]] for batching in args.batching}
    if toggle_checkpointing:
        set_checkpointing(model, args.checkpointing[0] == "on")
    compile_check = None
    if getattr(args, "compile", False):
        compile_check = compile_and_check(model, optimizer, ids_, guard_kwargs, collated[args.batching[0]][0], log)
    start = time.perf_counter()
    warm_up_shapes(model, optimizer, ids_, guard_kwargs, list(collated.values()), device, args.losses)
    steps = {loss: make_step(model, optimizer, loss, ids_, guard_kwargs)
             for loss in list(args.losses) + [f"guard:{g}" for g in args.guards]}
    log(f"train: warm-up over every measured batch in {time.perf_counter() - start:.1f} s"
        + (" (compiles each new shape)" if compile_check else ""))
    for ckpt in args.checkpointing:
        if toggle_checkpointing:
            set_checkpointing(model, ckpt == "on")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the other checkpointing setting's blocks; within one setting the pool stays warm
        for batching in args.batching:
            batches = collated[batching]
            timed = batches[args.warmup:]
            tokens = sum(int(b["attention_mask"].sum()) for b in timed)
            losses = list(args.losses) + [f"guard:{g}" for g in args.guards]
            rows, rounds, graphs = {}, {loss: [] for loss in losses}, {loss: 0 for loss in losses}
            for loss in losses:
                rows[loss] = {"loss": loss, "checkpointing": ckpt, "batching": batching, "batch_size": args.batch_size,
                              "compiled": compile_check is not None, "steps": args.steps, "rounds": args.rounds,
                              "loss_kwargs": guard_kwargs if loss.startswith("defaults") else
                              GUARD_VARIANTS[loss.removeprefix("guard:")] if loss.startswith("guard:") else
                              ({} if loss == "full_logits" else {"placement_weight": 0.0, "kl_weight": 0.0}),
                              "padding_share": padding_share(chosen[batching][args.warmup:], measured_lengths),
                              "tokens_per_row": tokens / (args.steps * args.batch_size)}
            # Rounds: every configuration is timed once a round over the same batches, the order rotated each round,
            # so drift of the machine and what one configuration leaves behind (allocator, caches) fall on all of them.
            for rnd in range(args.rounds):
                for loss in losses[rnd % len(losses):] + losses[:rnd % len(losses)]:
                    row = rows[loss]
                    if "error" in row:
                        continue
                    log(f"train: {loss}, checkpointing {ckpt}, {batching} batches, round {rnd + 1}/{args.rounds} ...")
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    step, counted = steps[loss], None
                    # The first round counts FLOPs on one step (the layers uncompiled for it, so not one of the
                    # warm-up steps: time_steps), then takes the warm-up steps; later rounds the timed batches only.
                    try:
                        if rnd == 0:
                            counted = time_steps(step, batches[:1], 1, device)[1]
                            if device.type == "cuda":  # that step ran the layers uncompiled: not this row's peak
                                torch.cuda.reset_peak_memory_stats()
                        graphs_before = dynamo_graphs() if compile_check else None
                        times = time_steps(step, batches if rnd == 0 else timed, args.warmup if rnd == 0 else 0, device,
                                           count_flops=False)[0]
                    except Exception as e:  # one failed configuration must not cost the others (one GPU call a session)
                        optimizer.zero_grad(set_to_none=True)
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
                        row["error"] = f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"
                        traceback.print_exc()
                        log(f"  {row['error']}")
                        continue
                    rounds[loss].append(times)
                    if compile_check and rnd == 0:  # one more untimed step: did this configuration run compiled?
                        row["compiled_regions_per_step"] = compiled_regions(
                            lambda: train_step(step, timed[0]))
                    if counted is not None:
                        row["counted_over_formula"] = counted / model_flops(shape, batches[0], loss, ckpt == "on",
                                                                            guard_kwargs)
                    if device.type == "cuda":
                        row["peak_memory_gib"] = max(row.get("peak_memory_gib") or 0.0,
                                                     torch.cuda.max_memory_allocated() / 2**30)
                    if compile_check:
                        # Graphs compiled during this configuration's steps (warm-up included): more than 0 after the
                        # shared warm-up means a recompile, and past torch._dynamo's recompile limit a layer runs eager.
                        graphs[loss] += dynamo_graphs() - graphs_before
                        row.update(compile_check=compile_check, graphs_compiled=graphs[loss],
                                   dynamo_unique_graphs=dynamo_graphs())
                    step_s = sum(times) / len(times)
                    log(f"  {args.batch_size / step_s:.2f} samples/s this round, step {step_s:.3f} s"
                        + (f", peak {row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") else "")
                        + (f", {graphs[loss]} graphs compiled so far" if compile_check else ""))
                    figures = round_figures(rounds[loss])  # the rounds so far: a cut run keeps a figure
                    flops = sum(model_flops(shape, b, loss, ckpt == "on", guard_kwargs) for b in timed) / len(timed)
                    row.update(figures, rounds_done=len(rounds[loss]),
                               samples_per_s=args.batch_size / figures["step_s"],
                               tokens_per_s=tokens / (args.steps * figures["step_s"]),
                               model_tflop_per_step=flops / 1e12, model_tflops=flops / figures["step_s"] / 1e12,
                               matmul_share=flops / figures["step_s"] / 1e12 / matmul_tflops if matmul_tflops else None)
                    row.setdefault("peak_memory_gib", None)
                    if on_row:
                        on_row(results + list(rows.values()))
            for loss in losses:
                row = rows[loss]
                if "error" not in row:
                    log(f"train: {loss}, checkpointing {ckpt}, {batching}: {row['samples_per_s']:.2f} samples/s "
                        f"(median of {row['rounds_done']} rounds, spread {row['round_spread']:.1%})")
            results += list(rows.values())
            if on_row:
                on_row(results)
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    return results


def region_count(prof) -> int:
    """torch.compile'd regions a profiled run entered (a compiled decoder layer's forward or its recomputation;
    the backward graphs are not counted; 0 where every layer ran eagerly)."""
    return sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))


def compiled_regions(fn) -> int:
    """:func:`region_count` of ``fn()``, read from a CPU-only profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return region_count(prof)


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process so far (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_and_check(model, optimizer, ids_, guard_kwargs, batch, log) -> dict:
    """Compile the decoder layers (conftok.compiling) and compare the defaults' loss of one batch before and after.

    Before the first optimizer step every LoRA B is zero, so dropout cannot move the loss: eager and
    compiled must agree to bf16 rounding. Returns the two losses, their difference and the seconds the
    first compiled forward and backward took (the compile)."""
    import torch

    from conftok.compiling import compile_layers

    def loss_now():  # as train_step runs it, the update left out: the graphs traced here are the ones training uses
        step = make_step(model, optimizer, "defaults", ids_, guard_kwargs)
        step.add(batch)
        loss = step.read().losses[0]
        optimizer.zero_grad(set_to_none=True)
        return loss

    eager = loss_now()
    layers = compile_layers(model)
    start = time.perf_counter()
    compiled = loss_now()
    seconds = time.perf_counter() - start
    out = {"layers": layers, "eager_loss": eager, "compiled_loss": compiled, "abs_diff": abs(eager - compiled),
           "first_forward_s": seconds, "torch": torch.__version__}
    log(f"compile: {layers} layers; first compiled forward {seconds:.1f} s; loss eager {eager:.5f}, "
        f"compiled {compiled:.5f}")
    return out


def cfg_domains():
    from conftok.config import TrainConfig
    from conftok.domains import resolve_domains

    return resolve_domains(TrainConfig().domains)


def compile_counts() -> dict:
    """Dynamo's and inductor's running counts: graphs compiled, graph breaks, CUDA graphs inductor skipped. The
    difference across a static-cache run says whether its decode step was one graph replayed as a CUDA graph, or
    silently split, or run without one (transformers compiles with ``fullgraph=False``; inductor reports a skip
    to a logger that is off by default)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def counts_since(before: dict) -> dict:
    return {key: value - before[key] for key, value in compile_counts().items()}


def longest_rows(raw: dict, tokenizer, domains, n: int) -> dict:
    """Each data set's ``n`` rows with the longest prompts: evaluate sizes its static cache for the longest prompt
    (rounded up), so these rows compile the decode step the whole set runs."""
    from conftok.prompts import encode_prompt

    return {name: sorted(rows, key=lambda r, d=domains.for_dataset(name): len(encode_prompt(tokenizer, d.build_question(r))))[-n:]
            for name, rows in raw.items()}


def run_validate(model, tokenizer, args, device, amp, log, out: dict | None = None, on_update=None) -> dict:
    """Batched validation (each batching, each batch size) against the per-row loop, then the static KV cache.
    ``out`` is filled as figures come and ``on_update(out)`` called after each, so a run that fails or is cut
    keeps what it measured; the static cache's first compile on CUDA comes last, each batch size on its own."""
    from conftok.evaluate import evaluate

    out = {} if out is None else out
    save = on_update or (lambda _: None)
    domains = cfg_domains()
    half, sub = max(1, args.val_rows // 2), max(1, args.per_row_rows // 2)
    raw = read_raw_rows(args.data, half)
    subset = {name: rows[:sub] for name, rows in raw.items()}
    out.update({"rows": sum(map(len, raw.values())), "per_row_rows": sum(map(len, subset.values())),
                "max_new_tokens": args.max_new_tokens, "batched": []})
    dynamic = {}  # batch size -> the records of its first batched run, for the static cache's agreement
    with amp():
        log("validate: warm-up ...")
        evaluate(model, tokenizer, {n: r[:2] for n, r in raw.items()}, domains=domains, batch_size=max(args.val_batch_sizes),
                 max_new_tokens=args.max_new_tokens, progress=False)
        evaluate_per_row(model, tokenizer, {n: r[:1] for n, r in raw.items()}, domains=domains,
                         max_new_tokens=args.max_new_tokens)
        first_records = None
        for batch_size in args.val_batch_sizes:
            # Each batching twice, in alternating order (rows, tokens, tokens, rows): the first pass at a batch size
            # pays for its new shapes (allocator, GEMM heuristics), which timed once would fall on one batching.
            runs: dict[str, list[float]] = {b: [] for b in args.val_batching}
            for batching in list(args.val_batching) + list(reversed(args.val_batching)):
                seconds, result = timed(device, lambda b=batching: evaluate(
                    model, tokenizer, raw, domains=domains, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                    progress=False, batching=b))
                runs[batching].append(seconds)
                dynamic.setdefault(batch_size, result["records"])
                if first_records is None:  # records come per data set, rows in the order given
                    first_records = [r for name in raw
                                     for r in [x for x in result["records"] if x["dataset"] == name][:sub]]
            for batching, times in runs.items():
                seconds = sum(times) / len(times)
                out["batched"].append({"batch_size": batch_size, "batching": batching, "seconds": seconds,
                                       "runs_s": times, "samples_per_s": out["rows"] / seconds})
                log(f"  batch {batch_size}, {batching} batching: {out['rows'] / seconds:.1f} samples/s (mean of "
                    f"{len(times)} runs: {', '.join(f'{t:.2f}' for t in times)} s)")
            save(out)
        sync(device)
        start = time.perf_counter()
        per_row = evaluate_per_row(model, tokenizer, subset, domains=domains, max_new_tokens=args.max_new_tokens)
        sync(device)
        seconds = time.perf_counter() - start
        # Batching alone against the per-row loop: the same (unmerged) weights both ways. The merged copies
        # are rounded to bf16 once (W + scale * B @ A), which moves a random model's near-tied greedy picks:
        # on the H200 its merged answers matched the per-row ones on 0 of 16 rows, the unmerged on 15 of 16.
        unmerged = evaluate(model, tokenizer, subset, domains=domains, batch_size=args.val_batch_sizes[0],
                            max_new_tokens=args.max_new_tokens, progress=False, merge=False)["records"]
        unmerged = [r for name in subset for r in unmerged if r["dataset"] == name]
        out["per_row"] = {"seconds": seconds, "samples_per_s": out["per_row_rows"] / seconds}
        log(f"  one row at a time: {out['per_row']['samples_per_s']:.2f} samples/s")
        out["agreement"] = compare_records(unmerged, per_row, P_TOLERANCE_BF16)
        out["agreement"]["batched_batch_size"] = args.val_batch_sizes[0]
        out["agreement_merged"] = compare_records(first_records, per_row, P_TOLERANCE_BF16)
        log(f"  agreement with the per-row loop: unmerged {out['agreement']['same_response']}/"
            f"{out['agreement']['rows']} responses, merged {out['agreement_merged']['same_response']}/"
            f"{out['agreement_merged']['rows']}")
        best_of(out)
        save(out)
        for batch_size in args.val_batch_sizes if args.static_cache else ():
            # evaluate(static_cache=True): a compile run on each data set's longest rows (the cache's shape is the
            # whole set's), then the timed run, which should compile nothing more.
            row = {"batch_size": batch_size, "static_cache": True}
            try:
                before = compile_counts()
                row["compile_run_s"], _ = timed(device, lambda b=batch_size: evaluate(
                    model, tokenizer, longest_rows(raw, tokenizer, domains, b), domains=domains, batch_size=b,
                    max_new_tokens=args.max_new_tokens, progress=False, static_cache=True))
                row["compile_run_counts"] = counts_since(before)
                before = compile_counts()
                seconds, static = timed(device, lambda b=batch_size: evaluate(
                    model, tokenizer, raw, domains=domains, batch_size=b, max_new_tokens=args.max_new_tokens,
                    progress=False, static_cache=True))
                row.update(seconds=seconds, samples_per_s=out["rows"] / seconds, timed_run_counts=counts_since(before),
                           agreement_with_dynamic_cache=compare_records(dynamic[batch_size], static["records"],
                                                                        P_TOLERANCE_BF16))
                same, counts = row["agreement_with_dynamic_cache"], row["compile_run_counts"]
                log(f"  batch {batch_size}, static KV cache: {row['samples_per_s']:.1f} samples/s (compile run "
                    f"{row['compile_run_s']:.1f} s: {counts['graphs']} graph(s), {counts['graph_breaks']} graph "
                    f"break(s), {counts['cudagraph_skips']} CUDA graph skip(s); timed run: "
                    f"{row['timed_run_counts']['graphs']} new graph(s)); {same['same_response']}/{same['rows']} "
                    "responses as the dynamic cache's")
            except Exception as e:  # keep the other figures; the error is the finding
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  batch {batch_size}, static KV cache: failed: {row['error']}")
            out["batched"].append(row)
            best_of(out)
            save(out)
    return out


def best_of(out: dict) -> None:
    """The fastest batched validation that ran, and its ratio to the per-row loop."""
    done = [r for r in out["batched"] if "samples_per_s" in r]
    if done and "per_row" in out:
        out["best_batched"] = max(done, key=lambda r: r["samples_per_s"])
        out["batched_over_per_row"] = out["best_batched"]["samples_per_s"] / out["per_row"]["samples_per_s"]


def val_path(row: dict) -> str:
    """A batched validation row in words: its batch size, batching and cache."""
    batching = row.get("batching", "rows")
    return (f"batch {row['batch_size']}" + (f", {batching} batching" if batching != "rows" else "")
            + (", static KV cache" if row.get("static_cache") else ""))


def timed(device, fn) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def profile_table(prof, sort_by: str, rows: int) -> list[dict]:
    """The ``rows`` ops with the most ``sort_by`` time: name, calls, self CPU ms, self device ms."""
    events = sorted((e for e in prof.key_averages() if not e.is_user_annotation), key=lambda e: getattr(e, sort_by),
                    reverse=True)[:rows]
    return [{"op": e.key[:70], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3} for e in events]


def profiled(device, fn, rows: int = 18) -> dict:
    """Wall time of ``fn`` under torch.profiler, the device's busy time (sum of kernels' self time) and
    the top ops by device and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, _ = timed(device, fn)
    from torch.autograd import DeviceType

    # The kernels' own rows only: an op's row repeats its kernels' time (the first H200 run summed both), and so
    # does a user-annotated range's device copy (record_function; inductor wraps every compiled graph's call in
    # one), which torch's own table leaves out too.
    busy = sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    return {"wall_s": wall, "device_busy_s": busy, "device_busy_share": busy / wall if wall else None,
            "compiled_regions": region_count(prof),
            "top_device": profile_table(prof, "self_device_time_total", rows) if device.type == "cuda" else [],
            "top_cpu": profile_table(prof, "self_cpu_time_total", rows)}


def manual_decode(model, tokenizer, prompts, new_tokens: int, device) -> dict:
    """One batch by hand: the prefill (logits of the last position only), then ``new_tokens`` greedy
    decode steps on the KV cache, each timed. What generate's own loop adds is the difference."""
    import torch

    from conftok.evaluate import _left_pad
    from conftok.loss import position_ids_from_mask

    ids, mask = _left_pad(prompts, tokenizer.pad_token_id, device)
    with torch.no_grad():
        prefill_s, out = timed(device, lambda: model(input_ids=ids, attention_mask=mask, use_cache=True,
                                                     position_ids=position_ids_from_mask(mask), logits_to_keep=1))
        cache, steps = out.past_key_values, []
        positions = position_ids_from_mask(mask)[:, -1:]
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            positions = positions + 1
            step_s, out = timed(device, lambda nxt=nxt, mask=mask, positions=positions: model(
                input_ids=nxt, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True))
            steps.append(step_s)
    steps.sort()
    return {"batch": len(prompts), "prompt_tokens": int(ids.shape[1]), "prefill_s": prefill_s,
            "decode_step_s_median": steps[len(steps) // 2], "decode_step_s_max": steps[-1], "steps": len(steps)}


def run_profile(model, tokenizer, args, device, amp, log, train_batches=None, stored_kl_ready=False,
                on_update=None, static_measured=False) -> dict:
    """Where validation and a training step spend their time (module docstring, ``profile``). ``on_update(out)``
    after each part: a run cut by its time limit keeps the parts it finished. ``static_measured``: validate timed
    the static KV cache at the default batch already, so it is not timed again here."""
    save = on_update or (lambda _: None)

    import torch

    from conftok.compiling import uncompiled_layers
    from conftok.config import TrainConfig
    from conftok.evaluate import evaluate, generate
    from conftok.merged import merged_lora
    from conftok.prompts import encode_prompt
    from conftok.token_rows import TokenRowsOnly
    from conftok.tokens import token_ids

    domains = cfg_domains()
    raw = read_raw_rows(args.data, max(1, args.val_rows // 2))
    batch = TrainConfig().eval_batch_size  # the variants around the default validation batch
    rows = sum(map(len, raw.values()))
    out: dict = {"rows": rows, "batch_size": batch, "validation": []}

    def validate(batch_size, autocast=True, adapter=True, merge="auto", static_cache=False):
        ctx = amp() if autocast else contextlib.nullcontext()
        off = model.disable_adapter() if not adapter else contextlib.nullcontext()
        with ctx, off:
            evaluate(model, tokenizer, raw, domains=domains, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                     progress=False, merge=merge, static_cache=static_cache)

    model.eval()

    def profile_generation():
        # The merge=False and no-autocast variants of the earlier runs are left out: measured there, and the time is
        # better spent on the static cache and the training steps within one call's limit.
        variants = [("as conftok.train runs it (bf16 autocast, LoRA merged for generation)", lambda: validate(batch)),
                    ("adapter disabled (the base model)", lambda: validate(batch, adapter=False)),
                    (f"batch {2 * batch}", lambda: validate(2 * batch))]
        if args.static_cache and not static_measured:  # on CUDA the decode step compiled once, replayed as a CUDA graph
            # At the default batch only: each batch size is a compile of its own (a minute or more for the 7B).
            variants += [(f"static KV cache, batch {batch} (timed after an untimed run that compiles)",
                          lambda: validate(batch, static_cache=True))]
        for name, fn in variants:
            try:
                first = {}
                if name.startswith("static KV cache"):
                    first["first_run_s"], _ = timed(device, fn)
                    log(f"profile: validation, {name}: first run {first['first_run_s']:.1f} s")
                seconds, _ = timed(device, fn)
                out["validation"].append({"variant": name, "seconds": seconds, "samples_per_s": rows / seconds, **first})
                log(f"profile: validation, {name}: {rows / seconds:.1f} samples/s")
            except Exception as e:  # keep the rest of the phase
                traceback.print_exc()
                out["validation"].append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            save(out)
        prompts = []
        for name, rows_ in raw.items():
            domain = domains.for_dataset(name)
            prompts += [encode_prompt(tokenizer, domain.build_question(r)) for r in rows_]
        prompts = sorted(prompts, key=len)[:batch]
        with amp():
            with TokenRowsOnly(model):  # as evaluate(merge=False) runs it: no whole embedding and head a step
                out["decode"] = {"adapter": manual_decode(model, tokenizer, prompts, args.max_new_tokens + 1, device)}
            with merged_lora(model, True):
                out["decode"]["adapter merged"] = manual_decode(model, tokenizer, prompts, args.max_new_tokens + 1, device)
            with model.disable_adapter():
                out["decode"]["base"] = manual_decode(model, tokenizer, prompts, args.max_new_tokens + 1, device)
        for k, d in out["decode"].items():
            log(f"profile: by hand, {k}: prefill of {d['batch']} x {d['prompt_tokens']} tokens "
                f"{1e3 * d['prefill_s']:.1f} ms, a decode step {1e3 * d['decode_step_s_median']:.1f} ms (median)")

        vocab = tokenizer.get_vocab()
        c_id, u_id = (vocab[t] for t in next(iter(domains)).tokens)
        with amp(), merged_lora(model, "auto"):
            out["generate"] = profiled(device, lambda: generate(
                model, tokenizer, prompts, stop_tokens=domains.tokens, max_new_tokens=args.max_new_tokens,
                batch_size=batch, progress=False, score_ids=(c_id, u_id)))
        log(f"profile: one generate of {len(prompts)} rows: {out['generate']['wall_s']:.2f} s, device busy "
            f"{out['generate']['device_busy_s']:.2f} s")
        save(out)

    with uncompiled_layers(model):  # generation runs the layers uncompiled, as conftok.train validates
        profile_generation()
    if train_batches:
        ids = token_ids(tokenizer, domains.tokens)
        ids_ = (sorted(ids.values()), sorted(ids[d.confident_token] for d in domains))
        guard_kwargs = TrainConfig().loss_kwargs()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        model.train()
        out["train"] = {}
        # Checkpointing off, then on (each layer's forward again in the backward: with compiled layers, twice the
        # compiled regions a step; fewer would mean a layer ran eagerly).
        for checkpointing in (False, True):
            set_checkpointing(model, checkpointing)
            for loss in ("token_only", "defaults"):
                if loss == "defaults" and guard_kwargs.get("stored_kl_weight") and not stored_kl_ready:
                    continue
                key = loss + (", checkpointing on" if checkpointing else "")
                step = make_step(model, optimizer, loss, ids_, guard_kwargs)
                train_step(step, train_batches[0])  # this shape's first pass, untimed
                out["train"][key] = profiled(device, lambda step=step: train_step(step, train_batches[1]))
                log(f"profile: a {key} step: {out['train'][key]['wall_s']:.3f} s, device busy "
                    f"{out['train'][key]['device_busy_s']:.3f} s, {out['train'][key]['compiled_regions']} compiled "
                    f"regions run")
                save(out)
        set_checkpointing(model, False)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    model.eval()
    return out


def run_unsloth(args, log) -> dict:
    if importlib.util.find_spec("unsloth") is None:
        return {"skipped": "unsloth is not installed (pip install 'conftok[gpu]')"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "unsloth.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--unsloth_child", str(out), "--data", args.data,
               "--batch_size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--rounds", str(args.rounds),
               "--seed", str(args.seed)] + (["--smoke"] if args.smoke else []) + \
              (["--tokenizer", args.tokenizer] if args.tokenizer else []) + \
              (["--rows", str(args.rows)] if args.rows else [])
        log("unsloth: child process ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"failed": f"unsloth child failed (exit {proc.returncode}): " + " | ".join(tail)}
        import json

        return json.loads(out.read_text())


def unsloth_child(args) -> int:
    """Runs in its own process: unsloth patches transformers and PEFT when imported, so it comes first."""
    import unsloth  # noqa: F401

    import torch

    if args.smoke:
        torch.set_num_threads(1)  # as in main()

    from conftok.modeling import build_model, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = SMOKE_SHAPE if args.smoke else QWEN25_7B
    tokenizer = load_tokenizer(tokenizer_dir(args))
    with tempfile.TemporaryDirectory() as tmp:
        # FastLanguageModel loads by name: save the random model once (about 15 GB at the 7B shape).
        base = build_random_model(shape, tokenizer, device, torch.bfloat16)
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model, tokenizer = build_model(tmp, backend="unsloth", bf16=True, gradient_checkpointing=True, seed=args.seed,
                                       max_seq_length=max_seq_length(args))
    _, _, measured, chosen = build_training_batches(tokenizer, args.data, args.rows, args.batch_size, args.seed,
                                                          max_seq_length(args), cfg_domains(), args.warmup + args.steps)
    args.losses, args.checkpointing, args.batching = ["token_only", "defaults"], ["on"], ["grouped"]
    # use_gradient_checkpointing="unsloth" was set by build_model: left as unsloth made it.
    rows = run_train(model, tokenizer, args, shape, device, measured, chosen, None, print,
                     toggle_checkpointing=False)
    write_json(args.unsloth_child, {"backend": "unsloth", "train": rows})
    return 0


def tokenizer_dir(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    from conftok.smollm import ensure_smollm2

    return str(ensure_smollm2())


def max_seq_length(args) -> int:
    from conftok.config import TrainConfig

    return 128 if args.smoke else TrainConfig().max_seq_length  # smoke: questions get cut


# ---------------------------------------------------------------- report

def check_targets(result: dict) -> list[dict]:
    rows = []
    train = [r for r in result.get("train", []) if "error" not in r]
    defaults = [r for r in train if r["loss"] == "defaults" and r["batching"] == "grouped"]
    if defaults:
        best = max(defaults, key=lambda r: r["samples_per_s"])
        where = (f"defaults, grouped, checkpointing {best['checkpointing']}, batch {best['batch_size']}"
                 + (", layers compiled" if best.get("compiled") else ""))
        rows.append({"target": f"defaults >= {TARGETS['defaults_samples_per_s']:g} samples/s at batch 8",
                     "value": best["samples_per_s"], "where": where,
                     "met": best["samples_per_s"] >= TARGETS["defaults_samples_per_s"]})
        if best.get("matmul_share") is not None:
            rows.append({"target": f"defaults >= {TARGETS['defaults_matmul_share']:.0%} of the matmul rate",
                         "value": best["matmul_share"], "where": where,
                         "met": best["matmul_share"] >= TARGETS["defaults_matmul_share"]})
    padding = result.get("padding")
    if padding and "grouped_epoch" in padding:
        rows.append({"target": f"length-grouped padding share <= {TARGETS['grouped_padding_share']:.0%} (an epoch)",
                     "value": padding["grouped_epoch"], "where": f"batch {padding['batch_size']}",
                     "met": padding["grouped_epoch"] <= TARGETS["grouped_padding_share"]})
    val = result.get("validate")
    if val and "best_batched" in val:  # the per-row loop ran (a later failure keeps these)
        best = val["best_batched"]
        rows.append({"target": f"validation >= {TARGETS['validation_samples_per_s']:g} samples/s",
                     "value": best["samples_per_s"],
                     "where": val_path(best),
                     "met": best["samples_per_s"] >= TARGETS["validation_samples_per_s"]})
        rows.append({"target": f"batched validation >= {TARGETS['batched_over_per_row']:g}x per-row",
                     "value": val["batched_over_per_row"], "where": f"batch {best['batch_size']} / one row",
                     "met": val["batched_over_per_row"] >= TARGETS["batched_over_per_row"]})
        agree = val["agreement"]
        rows.append({"target": "batched validation gives the per-row outputs (bf16: rounding can flip near-ties)",
                     "value": f"{agree['same_response']}/{agree['rows']} responses, {agree['same_token']}/"
                              f"{agree['rows']} tokens, max |dp| {agree['max_abs_p_confident_diff']:.2g}",
                     "where": f"batch {agree['batched_batch_size']}", "met": agree["equal"]})
    return rows


def print_report(result: dict) -> None:
    m = result["machine"]
    print(f"\n## bench/gpu.py: {m['device']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
          f"{m['date']}, commit {m['commit']}" + (" (SMOKE: tiny shape on the CPU)" if result["smoke"] else ""))
    if "matmul" in result:
        mm = result["matmul"]
        print(f"\nbf16 matmul {mm['n']}^3: {mm['tflops']:.3g} TFLOP/s")
    if result.get("train"):
        cfg = result["config"]
        print(f"\nTraining step, batch {cfg['batch_size']}: the median over {cfg.get('rounds', 1)} rounds (the "
              f"configurations interleaved, their order rotated each round) of the mean of {cfg['steps']} steps, after "
              f"{cfg['warmup']} warm-up in the first; spread = (slowest - fastest round) / median; "
              f"defaults = {result['defaults_loss_kwargs']}\n")
        token_only = {(r["checkpointing"], r["batching"]): r.get("step_s") for r in result["train"]
                      if r["loss"] == "token_only"}

        def ratio(r):
            base = token_only.get((r["checkpointing"], r["batching"]))
            return r["step_s"] / base if base and r.get("step_s") else None

        rows = [[r["loss"] + (" (compiled)" if r.get("compiled") else ""), r["checkpointing"], r["batching"], r.get("samples_per_s"), r.get("tokens_per_s"),
                 r.get("step_s"), r.get("round_spread"), ratio(r), r.get("model_tflop_per_step"), r.get("matmul_share"),
                 r.get("peak_memory_gib"), r["padding_share"], r.get("counted_over_formula"), r.get("graphs_compiled"),
                 r.get("compiled_regions_per_step"), r.get("error")] for r in result["train"]]
        print(markdown_table(["loss", "ckpt", "batches", "samples/s", "tokens/s", "step s", "spread", "x token-only",
                              "TFLOP/step", "share of matmul", "peak GiB", "padding", "counted/formula",
                              "graphs compiled", "compiled regions a step", "error"], rows))
        steps = {(r["loss"], r["checkpointing"], r["batching"]): r.get("step_s") for r in result["train"]}
        for (loss, ckpt, batching), before in steps.items():
            now = steps.get(("defaults", ckpt, batching))
            if loss == "defaults_before" and before and now:
                print(f"\nThe defaults with the device reads of the step before TrainStep, checkpointing {ckpt}, "
                      f"{batching} batches: {before / now:.3f}x the step as conftok.train takes it now")
        check = next((r["compile_check"] for r in result["train"] if r.get("compile_check")), None)
        if check:
            print(f"\nCompiled decoder layers ({check['layers']}, torch {check['torch']}): first compiled forward "
                  f"{check['first_forward_s']:.1f} s; defaults loss before any step, eager {check['eager_loss']:.5f} "
                  f"against compiled {check['compiled_loss']:.5f} (|diff| {check['abs_diff']:.2g})")
        print(f"\n{FLOP_FORMULA}")
        pad = result["padding"]
        print(f"\nPadding share over an epoch at batch {pad['batch_size']} ({pad['rows']} rows, mean "
              f"{pad['mean_tokens']:.0f} tokens): random {pad['random_epoch']:.1%}, length-grouped {pad['grouped_epoch']:.1%}")
    val = result.get("validate")
    if val and "rows" in val:  # what was measured, a failed or cut run's too
        print(f"\nValidation ({val['rows']} rows batched, {val['per_row_rows']} one at a time, "
              f"{val['max_new_tokens']} new tokens)\n")
        rows = [[f"evaluate, {val_path(b)}", b.get("samples_per_s"), b.get("seconds"), b.get("error")]
                for b in val["batched"]]
        if "per_row" in val:
            rows.append(["per row (generate, then a forward)", val["per_row"]["samples_per_s"],
                         val["per_row"]["seconds"], None])
        print(markdown_table(["path", "samples/s", "seconds", "error"], rows))
    if val and "error" in val:
        print(f"\nValidation failed: {val['error']}")
    prof = result.get("profile")
    if prof and "error" in prof:
        print(f"\nProfile failed: {prof['error']}")
    elif prof:
        print(f"\nProfile: validation of {prof['rows']} rows, variants timed back to back\n")
        print(markdown_table(["variant", "samples/s", "seconds", "error"],
                             [[v["variant"], v.get("samples_per_s"), v.get("seconds"), v.get("error")]
                              for v in prof["validation"]]))
        print("\nOne batch by hand (prefill keeps the last position's logits; decode steps on the KV cache)\n")
        print(markdown_table(["model", "batch", "prompt tokens", "prefill ms", "decode step ms (median)", "max"],
                             [[k, d["batch"], d["prompt_tokens"], 1e3 * d["prefill_s"], 1e3 * d["decode_step_s_median"],
                               1e3 * d["decode_step_s_max"]] for k, d in prof["decode"].items()]))
        for what, p in [("one generate", prof["generate"])] + [(f"a {k} training step", v)
                                                               for k, v in prof.get("train", {}).items()]:
            share = f" ({p['device_busy_share']:.0%})" if p["device_busy_share"] is not None else ""
            regions = f", {p['compiled_regions']} compiled regions run" if p.get("compiled_regions") else ""
            print(f"\nProfiled, {what}: wall {p['wall_s']:.3f} s, device busy {p['device_busy_s']:.3f} s{share}{regions}\n")
            for key, label in (("top_device", "device"), ("top_cpu", "CPU")):
                if p[key]:
                    print(f"Ops with the most {label} time:\n")
                    print(markdown_table(["op", "calls", "self CPU ms", "self device ms"],
                                         [[r["op"], r["calls"], r["self_cpu_ms"], r["self_device_ms"]] for r in p[key]]))
                    print()
    uns = result.get("unsloth")
    if uns is not None:
        if "skipped" in uns:
            print(f"\nunsloth: skipped: {uns['skipped']}")
        elif "failed" in uns:
            print(f"\nunsloth: FAILED: {uns['failed']}")
        else:
            print("\nunsloth backend (checkpointing on, grouped batches)\n")
            print(markdown_table(["loss", "samples/s", "tokens/s", "step s", "peak GiB", "error"],
                                 [[r["loss"], r.get("samples_per_s"), r.get("tokens_per_s"), r.get("step_s"),
                                   r.get("peak_memory_gib"), r.get("error")] for r in uns["train"]]))
    if result["targets"]:
        applies = "" if result["targets_apply"] else " (targets are for an H100/H200; not applicable here)"
        print(f"\nTargets{applies}\n")
        print(markdown_table(["target", "value", "where", "met"],
                             [[t["target"], t["value"], t["where"], "yes" if t["met"] else "NO"] for t in result["targets"]]))


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.unsloth_child:
        return unsloth_child(args)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    import torch

    from conftok.compiling import uncompiled_layers
    from conftok.config import TrainConfig
    from conftok.modeling import build_model, load_tokenizer
    from conftok.sampler import padding_share

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        print("error: no CUDA device; the 7B shape needs a GPU (use --smoke on a CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        torch.manual_seed(args.seed)
        # Tiny ops: one thread. Two OpenMP threads on a busy 2-core box made each op wait for a descheduled
        # thread (a 380 x 64 x 16 product took 20 ms; 20x slower a step than one thread).
        torch.set_num_threads(1)
    shape = SMOKE_SHAPE.copy() if args.smoke else QWEN25_7B
    result = {"smoke": args.smoke, "machine": machine_info(), "phases": args.phases, "shape": shape,
              "config": {k: getattr(args, k) for k in ("batch_size", "warmup", "steps", "rounds", "rows", "val_rows", "per_row_rows",
                                                        "val_batch_sizes", "val_batching", "max_new_tokens", "seed", "data")},
              "flop_formula": FLOP_FORMULA}
    from conftok.config import TrainConfig

    result["defaults_loss_kwargs"] = TrainConfig().loss_kwargs()
    log(f"device {result['machine']['device']}; phases {args.phases}")
    matmul_tflops = None
    if "matmul" in args.phases:
        result["matmul"] = measure_matmul(device, 256 if args.smoke else 8192)
        write_json(args.out, result)  # after every phase: a run cut short by a time limit keeps what it measured
        matmul_tflops = result["matmul"]["tflops"]
        log(f"matmul: {matmul_tflops:.3g} TFLOP/s")
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731  (as conftok.train does)
    if {"train", "validate", "profile"} & set(args.phases):
        tokenizer = load_tokenizer(tokenizer_dir(args))
        if args.smoke:  # a small vocabulary past the tokenizer's: the new tokens land in spare rows, as with Qwen
            shape["vocab_size"] = len(tokenizer) + 64
        start = time.perf_counter()
        base = build_random_model(shape, tokenizer, device, torch.bfloat16)
        model, tokenizer = build_model(base, tokenizer=tokenizer, backend="hf", bf16=True, gradient_checkpointing=True,
                                       seed=args.seed, device=device, lora_r=16, lora_alpha=32)
        result["model_build_s"] = time.perf_counter() - start
        result["compile"] = args.compile  # the layers are compiled in run_train, after an eager loss to compare
        result["parameters"] = sum(p.numel() for p in model.parameters())
        log(f"model: {result['parameters'] / 1e9:.2f} B parameters in {result['model_build_s']:.1f} s")
        if "train" in args.phases:
            lengths, epoch, measured, chosen = build_training_batches(
                tokenizer, args.data, args.rows, args.batch_size, args.seed, max_seq_length(args), cfg_domains(),
                args.warmup + args.steps)
            result["padding"] = {"batch_size": args.batch_size, "rows": len(lengths),
                                 "mean_tokens": sum(lengths) / len(lengths),
                                 "random_epoch": padding_share(epoch["random"], lengths),
                                 "grouped_epoch": padding_share(epoch["grouped"], lengths)}
            log(f"rows: {len(lengths)} (mean {result['padding']['mean_tokens']:.0f} tokens)")
            result["train"] = run_train(model, tokenizer, args, shape, device, measured, chosen, matmul_tflops,
                                        log, on_row=lambda rows: write_json(args.out, {**result, "train": rows}))
            write_json(args.out, result)
        if "validate" in args.phases:
            result["validate"] = {}  # filled as it runs: a failure or a cut keeps what was measured
            try:
                with uncompiled_layers(model):  # as conftok.train validates
                    run_validate(model, tokenizer, args, device, amp, log, out=result["validate"],
                                 on_update=lambda _: write_json(args.out, result))
            except Exception as e:  # keep the training figures and the report
                traceback.print_exc()
                result["validate"]["error"] = f"{type(e).__name__}: {e}"
            write_json(args.out, result)
        if "profile" in args.phases:
            train_batches = None
            if "train" in args.phases:
                from conftok.data import ConfidenceCollator

                collate = ConfidenceCollator(tokenizer.pad_token_id)
                train_batches = [collate([measured[i] for i in b]) for b in chosen["grouped"][:2]]
                set_checkpointing(model, False)
            partial: dict = {}

            def keep(part: dict) -> None:
                partial.update(part)
                write_json(args.out, {**result, "profile": part})

            # A static cache that validate measured at the default batch is not timed again here.
            static_measured = ("validate" in args.phases and args.static_cache
                               and TrainConfig().eval_batch_size in args.val_batch_sizes)
            try:
                result["profile"] = run_profile(model, tokenizer, args, device, amp, log, train_batches,
                                                stored_kl_ready=any(x.startswith("defaults") for x in args.losses),
                                                on_update=keep, static_measured=static_measured)
            except Exception as e:  # the parts it finished, with the error
                traceback.print_exc()
                result["profile"] = {**partial, "error": f"{type(e).__name__}: {e}"}
            write_json(args.out, result)
        del model, base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "unsloth" in args.phases:
        result["unsloth"] = run_unsloth(args, log)
    result["targets"] = check_targets(result)
    result["targets_apply"] = not args.smoke and any(n in result["machine"]["device"] for n in ("H100", "H200"))
    result["seconds"] = time.perf_counter() - started
    path = write_json(args.out, result)
    print_report(result)
    log(f"wrote {path}")
    failed = [name for name in ("validate", "profile") if "error" in (result.get(name) or {})]
    failed += ["unsloth"] * ("failed" in (result.get("unsloth") or {}))
    if failed:
        log(f"failed phase(s): {', '.join(failed)} (the figures of the others are in {path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
