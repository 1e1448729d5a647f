"""The training loop: LoRA on the confidence token, validation on the fly.

``train(cfg)`` reads top to bottom: build the model, read the data, then epochs of optimizer
steps with validation every ``eval_steps`` and at each epoch end. Each validation writes
``checkpoint-N/`` (adapter + optimizer state, enough to resume) and calls
``on_validation(metrics, checkpoint_dir)``; Ray's worker reports from there. Output tree::

    output_dir/
      checkpoint-N/            adapter, tokenizer, validation.json (metrics, reliability bins,
                               per-row records: answer, token, p_confident), trainer_state.json +
                               trainer_state.safetensors (optimizer, schedule, random states: no pickle)
      best_accuracy/           best mean token accuracy so far (adapter, tokenizer, validation.json)
      best_calibration/        lowest mean calibration error so far
      final/                   adapter after the last step, final_metrics.json
      reliability_epoch_N.json per-epoch metrics and reliability-diagram bins
      logs/                    TensorBoard: train/*, val/*

What stays on disk: the last ``save_total_limit`` checkpoints (default 1: what a resume needs)
whole; older ones keep only their validation.json (kB; the report's learning curves read it).
A finished run has nothing left to resume: its last checkpoint then drops its trainer state too
(``save_total_limit=None`` keeps everything). ``best_*/`` and ``final/`` are hard links to a
checkpoint's files (``conftok.checkpoint.link_tree``), not copies: a best checkpoint costs no space
while it is the last one, and its adapter alone (no optimizer state) once it is pruned; ``final/``
shares the last checkpoint's files (a run ends with a validation at its last step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from conftok import metrics as M
from conftok.checkpoint import (TRAINER_STATE_FILE, TRAINER_STATE_FILES, drop_trainer_state, link_tree,
                                load_trainer_state, remove_leftovers, save_trainer_state)
from conftok.compiling import compile_layers, compiler_available, uncompiled_layers
from conftok.config import ConfigError, TrainConfig
from conftok.data import ConfidenceCollator, ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.evaluate import evaluate, load_rows, print_validation_block
from conftok.loss import (LoraInputsUncast, LossTerms, TermSizes, group_loss, host_facts, padded_attention_guard,
                          term_sizes, training_loss)
from conftok.memory import auto_gradient_checkpointing
from conftok.modeling import (ADAPTER_WEIGHTS_FILE, METADATA_FILE, build_model,
                              enable_gradient_checkpointing, model_device, replace_directory, resolve_backend, save_adapter)
from conftok.packing import (FLASH_ATTENTION, HOST_KEYS, PackedConfidenceCollator, check_padding_free,
                             packed_training_loss)
from conftok.reference_cache import attach_base_topk_cached
from conftok.sampler import LengthGroupedBatchSampler, padding_share
from conftok.token_rows import TokenRowsOnly
from conftok.tokens import token_ids

__all__ = ["train", "TrainStep", "StepReading", "TrainResult", "TRAINER_STATE_FILE", "load_validation_sets",
           "check_resume_config", "planned_validations"]

logger = logging.getLogger(__name__)

OnValidation = Callable[[dict[str, Any], Path], None]
VALIDATION_FILE = "validation.json"
FINAL_METRICS_FILE = "final_metrics.json"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_validation_sets(cfg: TrainConfig, domains) -> dict[str, list[dict]]:
    """Validation rows per data set: ``cfg.val_sources`` or each domain's default source."""
    sources = cfg.val_sources
    if sources is None:
        sources = {d.datasets[0]: d.validation for d in domains if d.validation}
    out = {}
    for dataset, source in sources.items():
        # unknown names and bad rows (conftok.domains.Domain.row_problems) fail here, before any training
        out[dataset] = load_rows(source, split=cfg.val_split, limit=cfg.val_max_samples,
                                 domain=domains.for_dataset(dataset))
    if not out:
        raise ValueError("no validation sources: set val_sources or give the domains a 'validation' source")
    return out


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Token rows are embeddings: decaying them pulls the new tokens toward zero.
            (no_decay if "trainable_tokens" in name or "bias" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


class StepReading(NamedTuple):
    """What :meth:`TrainStep.read` brings back from the device, in one transfer."""
    losses: list[float]  # each micro-batch's own loss (its mean terms), in order: which one went non-finite
    loss: float  # the step's loss, what its gradient is of: the micro-batches' parts summed (group_loss)
    terms: list[float]  # token, placement, KL, answer CE: the step's, each its micro-batches' means by their shares
    grad_norm: float  # the total gradient norm before clipping


class TrainStep:
    """An optimizer step as :func:`train` takes it, with one CPU-GPU sync.

    ``add(batch)`` for a step of one batch, ``add_group(batches)`` for a step of several micro-batches
    (gradient accumulation; collated batches on the CPU). Each batch's facts are read on the host
    (:func:`conftok.loss.host_facts`), it moves to the device without waiting, and the loss runs under bf16
    autocast with LoRA inputs uncast and the new tokens' rows computed alone
    (:class:`conftok.token_rows.TokenRowsOnly`), then its backward. Nothing is read back. A group's gradient
    is the one its micro-batches would give as one batch: each term is weighed by the micro-batch's share of
    what the term averages over in the whole step (rows, answer positions: :func:`conftok.loss.term_sizes`),
    so a small or short-answered micro-batch (the last of an epoch, a length group's) counts for what it
    holds, not for a full micro-batch. ``read()`` clips
    the gradients and reads every micro-batch's loss and terms and the gradient norm in one transfer.
    ``apply()`` runs the optimizer and clears the gradients. The caller checks the reading in between:
    a non-finite loss or norm is never applied.

    Why one sync: each read of the device (``.item()``, ``bool(t)``, a Python list copied to it) makes the
    host wait until the card has run everything queued, so the host's work for what follows (launching
    kernels, the next batch) no longer overlaps the card's. A step that read the loss after its forward,
    the terms and the norm after its backward, and the padding, the labels' check, the answers' length, the
    token indices (PEFT copies them at every forward of the embedding and the head) and the confidence ids
    along the way, waited about ten times. What is left besides the read: transformers' check of the
    attention mask as each forward starts (once, twice for a padded batch), when little is queued.
    ``tests/test_train_step.py`` counts them, and on CUDA runs the step under torch's sync debug mode.
    """

    def __init__(self, model, optimizer, *, loss_kwargs: dict[str, Any], confidence_ids, confident_ids,
                 token_weights: torch.Tensor | None = None, bf16: bool = True, compiled: bool = False,
                 max_grad_norm: float = 1.0, packed: bool = False,
                 compute_loss: Callable[..., LossTerms] | None = None):
        self.model, self.optimizer = model, optimizer
        self.device = model_device(model)
        self.amp = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.uncast = LoraInputsUncast(model) if bf16 else nullcontext()
        self.rows = TokenRowsOnly(model)
        self.compiled = compiled
        # compute_loss: training_loss's signature and result (bench/gpu.py times a full-logits baseline through it)
        self.compute_loss = compute_loss or (packed_training_loss if packed else training_loss)
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        ids = {"confidence_ids": confidence_ids, "confident_ids": confident_ids}
        # The ids on the device once (a list would be copied to it, a sync, at every use).
        self.loss_kwargs = {**loss_kwargs, "token_weights": token_weights,
                            **{k: torch.tensor(sorted(v), dtype=torch.long, device=self.device) for k, v in ids.items()}}
        self._pending: list[torch.Tensor] = []  # each micro-batch's (loss, token, placement, KL, answer CE)
        # What a group's shares are counted from, on the host: the class weights, the confident ids, which rows
        # answer_ce guards (a custom compute_loss is used for steps of one batch only: add_group checks).
        self._sizes = {"token_weights": None if token_weights is None else token_weights.cpu(),
                       "confident_ids": sorted(confident_ids), "answer_ce_rows": loss_kwargs.get("answer_ce_rows", "all")}
        self._custom_loss = compute_loss is not None

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """A step of one batch: its forward and backward."""
        self.add_group([batch])

    def add_group(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """A step of several micro-batches (gradient accumulation): each one's forward and backward, its terms
        weighed by its share of the step's rows and answer positions (:func:`conftok.loss.group_loss`)."""
        if self._pending:
            raise RuntimeError("TrainStep.add_group() with a step pending: read() it first")
        if not batches:
            raise ValueError("TrainStep.add_group() needs at least one batch")
        if len(batches) == 1:
            self._add(batches[0], None)
            return
        if self._custom_loss:
            raise ValueError("a custom compute_loss takes steps of one batch (add), not groups")
        sizes = [term_sizes(batch, **self._sizes) for batch in batches]
        totals = [sum(column) for column in zip(*sizes)]
        for batch, size in zip(batches, sizes):
            self._add(batch, TermSizes(*(part / total if total else 0.0 for part, total in zip(size, totals))))

    def _add(self, batch: dict[str, torch.Tensor], shares: TermSizes | None) -> None:
        facts = host_facts(batch)  # read on the CPU copy: no sync (a packed batch holds the padded one's labels)
        batch = {k: v if k in HOST_KEYS else v.to(self.device, non_blocking=True) for k, v in batch.items()}
        kwargs = {**self.loss_kwargs, "facts": facts}
        # Padded batches on CUDA: SDPA's math kernel; the fused kernels' gradients go non-finite there.
        # Compiled layers keep the kernel they were traced with: the math kernel for every batch then.
        with self.amp(), self._guard(batch, facts.padded), self.uncast, self.rows:
            terms = self.compute_loss(self.model, batch, **kwargs)
        # build_model's checkpointing recomputes under the forward's kernels and LoRA casts by itself
        # (CHECKPOINTING_KWARGS); unsloth's own, or a user's, does not, so the backward runs under both here.
        part = terms.loss if shares is None else group_loss(terms, shares, **self.loss_kwargs)
        with self._guard(batch, facts.padded), self.uncast:
            part.backward()
        share = shares or TermSizes(1.0, 1.0, 1.0)  # each term's part of the step's, as group_loss weighs it
        self._pending.append(torch.stack([terms.loss, part, terms.token * share.token, terms.placement * share.answer,
                                          terms.kl * share.answer, terms.answer_ce * share.answer_ce]).detach().float())

    def _guard(self, batch, padded: bool):
        return padded_attention_guard(batch["attention_mask"], always=self.compiled, padded=padded)

    def read(self) -> StepReading:
        if not self._pending:
            raise RuntimeError("TrainStep.read() before any add(batch) or add_group(batches)")
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        per_batch = torch.stack(self._pending)  # (micro-batches, 6)
        self._pending = []
        values = torch.cat([per_batch.flatten(), norm.detach().float().reshape(1)]).tolist()  # the step's one sync
        rows = [values[k:k + 6] for k in range(0, len(values) - 1, 6)]
        return StepReading([r[0] for r in rows], sum(r[1] for r in rows), [sum(r[j] for r in rows) for j in range(2, 6)],
                           values[-1])

    def apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _reference_cache(cfg: TrainConfig, out: Path) -> Path | None:
    """Where the stored KL reference is kept between runs (``cfg.reference_cache``), or None."""
    if not cfg.reference_cache:
        return None
    return out / "cache" if cfg.reference_cache == "auto" else Path(cfg.reference_cache)


def _model_description(cfg: TrainConfig, model, tokenizer, passed_model: bool) -> dict[str, Any]:
    """What the base model's top-k depend on besides the rows: the reference cache's key."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    return {"model": getattr(config, "_name_or_path", None) if passed_model else cfg.model_name,
            "class": type(base).__name__, "commit": getattr(config, "_commit_hash", None),
            "quantization": cfg.quantization, "bf16": cfg.bf16, "dtype": str(getattr(base, "dtype", None)),
            "token_init": cfg.token_init, "vocab": len(tokenizer)}


def train(cfg: TrainConfig, *, on_validation: OnValidation | None = None, model=None, tokenizer=None,
          resume_from: str | os.PathLike | None = None, val_sets: dict[str, list[dict]] | None = None) -> TrainResult:
    """Train the confidence token with LoRA; see the module docstring for what is written.

    Args:
        cfg: the run's configuration.
        on_validation: called after each validation with the flat metrics (``conftok.metrics``
            names plus ``step`` and ``epoch``) and the checkpoint directory just written.
        model, tokenizer: a base model object and its tokenizer to use instead of loading
            ``cfg.model_name`` (tests, notebooks).
        resume_from: a ``checkpoint-N`` directory; training continues after its step with its
            optimizer, schedule, data order and best-so-far figures. The last checkpoint of a run
            that finished into ``cfg.output_dir`` (no trainer state left) returns that run at once.
        val_sets: raw validation rows per data set, instead of ``cfg.val_sources``.
    """
    out = Path(cfg.output_dir)  # made once the inputs are read: a bad input leaves nothing behind
    if resume_from is not None:
        check_resume_config(cfg, Path(resume_from))
    if resume_from is not None and (finished := _finished_run(out, Path(resume_from))) is not None:
        print(f"{resume_from} is the last checkpoint of the run finished in {finished.final_dir}: nothing to train",
              flush=True)
        return finished
    if resume_from is not None:  # before the model loads and the stored KL's base pass runs (minutes for a 7B)
        _check_resumable(Path(resume_from), out)
    inputs = cfg.input_fingerprints()  # kept with every checkpoint: a resume on other data is refused
    seed_everything(cfg.seed)
    domains = resolve_domains(cfg.domains)
    # 'auto' checkpointing is decided once the rows are read (the longest sets the batch's shape): the hf
    # backend turns it on after wrapping; unsloth sets it when it wraps, so build_model reads the rows then,
    # with unsloth's tokenizer (read_rows), and they are not read twice.
    hf_backend = model is not None or resolve_backend(cfg.backend) == "hf"
    auto_checkpointing = cfg.gradient_checkpointing == "auto" and hf_backend
    read: dict[str, ConfidenceDataset] = {}

    def read_rows(tokenizer) -> int:
        read["rows"] = ConfidenceDataset(cfg.train_data, tokenizer, cfg.max_seq_length, domains=domains)
        return max(read["rows"].lengths())

    if cfg.padding_free:
        if not hf_backend:
            raise ValueError(f"padding_free=True needs the hf backend; backend={cfg.backend!r} resolves to unsloth here")
        check_padding_free()  # before loading anything
    if cfg.eval_static_cache and not hf_backend:  # unsloth's generate takes its own dynamic cache whatever is asked
        raise ValueError(f"eval_static_cache=True needs the hf backend; backend={cfg.backend!r} resolves to unsloth here")
    if cfg.torch_compile is True:  # asked for: say now, before loading anything, if it cannot be done
        if not hf_backend:
            raise ValueError(f"torch_compile=True needs the hf backend; backend={cfg.backend!r} resolves to unsloth here")
        ok, why = compiler_available()
        if not ok:
            raise RuntimeError(f"torch_compile=True: {why}")
    passed_model = model is not None
    model, tokenizer = build_model(
        model if model is not None else cfg.model_name, tokenizer=tokenizer, domains=domains,
        backend=cfg.backend, quantization=cfg.quantization, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
        gradient_checkpointing=False if auto_checkpointing else cfg.gradient_checkpointing, bf16=cfg.bf16,
        token_init=cfg.token_init, max_seq_length=cfg.max_seq_length, seed=cfg.seed, batch_size=cfg.batch_size,
        seq_len=read_rows, attn_implementation=FLASH_ATTENTION if cfg.padding_free and model is None else None,
        trust_remote_code=cfg.trust_remote_code,
    )
    token_rows = [param for name, param in model.named_parameters() if "trainable_tokens_delta" in name]
    if not token_rows or not all(param.requires_grad for param in token_rows):  # the one thing the loss trains
        raise RuntimeError(f"the confidence tokens' rows are not trainable after build_model (backend {cfg.backend!r}, "
                           f"{len(token_rows)} row blocks found): the tokens would never be learned")
    device = model_device(model)
    use_bf16 = cfg.bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported())
    if cfg.padding_free:
        check_padding_free(model, bf16=use_bf16)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    dataset = read["rows"] if "rows" in read else ConfidenceDataset(cfg.train_data, tokenizer, cfg.max_seq_length,
                                                                    domains=domains)
    val_sets = val_sets if val_sets is not None else load_validation_sets(cfg, domains)
    if cfg.stored_kl_weight:
        # The stored KL guard's reference: the base model's top-k at each answer position, computed once
        # (and kept in the reference cache for a resumed run or the next trial of a search). Under the
        # autocast the steps run with: float32 weights read in float32 would leave a KL floor of rounding
        # alone at the first step (0.095 nats on a sharp tiny model against 2e-4), which the guard would train.
        attach_base_topk_cached(dataset, model, cfg.stored_kl_top_k, cache_dir=_reference_cache(cfg, out),
                                model_description=_model_description(cfg, model, tokenizer, passed_model),
                                batch_size=cfg.eval_batch_size, progress=cfg.progress,
                                autocast_dtype=torch.bfloat16 if use_bf16 else None)
    collate = (PackedConfidenceCollator if cfg.padding_free else ConfidenceCollator)(tokenizer.pad_token_id)
    lengths = dataset.lengths()
    compiled, why = decide_torch_compile(cfg, device, hf_backend)
    print(f"torch.compile {why}", flush=True)
    if auto_checkpointing and auto_gradient_checkpointing(model, batch_size=cfg.batch_size, seq_len=max(lengths),
                                                          math_attention=math_attention(cfg, device, compiled)):
        enable_gradient_checkpointing(model)
    if compiled:
        compile_layers(model)
    steps_per_epoch, total_steps = _schedule(len(dataset), cfg)
    planned = planned_validations(len(dataset), cfg)
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    from transformers import get_scheduler

    optimizer = _optimizer(model, cfg)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_accuracy": -math.inf,
             "best_calibration": math.inf, "history": []}
    if resume_from is not None:
        state = _load_checkpoint(Path(resume_from), model, optimizer, scheduler)
        logger.info("resumed from %s at step %d", resume_from, state["global_step"])
        _relink_best(out, Path(resume_from), state)

    from torch.utils.tensorboard import SummaryWriter

    # An earlier process's half-written checkpoint. Not in the reference cache: a search's trials share it, and a
    # trial on another node of a shared filesystem may be writing there under a pid this machine does not know.
    remove_leftovers(out)
    out.mkdir(parents=True, exist_ok=True)
    # Resumed after step K: the events an earlier process wrote after K go (it may have logged past its last
    # checkpoint before it died); K's own, which this process does not write again, stay.
    writer = SummaryWriter(str(out / "logs"), purge_step=state["global_step"] + 1 if resume_from is not None else None)
    print(f"Training on {len(dataset)} examples ({dataset.truncated} with the question cut to fit); {total_steps} "
          f"optimizer steps; token counts {dataset.token_counts()}; device {device}", flush=True)
    if cfg.group_by_length:
        first = LengthGroupedBatchSampler(lengths, cfg.batch_size, seed=cfg.seed, epoch=state["epoch"])
        print(f"Length-grouped batches: {padding_share(first, lengths):.1%} of batch positions are padding", flush=True)

    def validate(epoch: float, epoch_end: int | None = None) -> dict[str, Any]:
        """Validate, record, checkpoint, link best_*/, call ``on_validation``; at an epoch's end (``epoch_end``: its
        number) write its reliability file first, with the checkpoint: a process stopped after the checkpoint is
        resumed past this validation and would never write it."""
        step = state["global_step"]
        print("\n" + "=" * 70 + f"\nVALIDATION - Epoch {epoch:.1f}\n" + "=" * 70, flush=True)
        try:
            with amp(), uncompiled_layers(model):
                result = evaluate(model, tokenizer, val_sets, domains=domains, beta=cfg.calib_beta,
                                  p=cfg.calib_p_norm, batch_size=cfg.eval_batch_size,
                                  max_new_tokens=cfg.max_new_tokens, progress=cfg.progress, verbose=True,
                                  static_cache=cfg.eval_static_cache, batching=cfg.eval_batching)
        except FloatingPointError as e:  # a finite loss and gradient, then an update that overflowed the weights
            raise FloatingPointError(
                f"validation after step {step} (epoch {epoch:.1f}): {e}; the update of step {step} diverged. Try a "
                f"lower learning_rate (now {cfg.learning_rate}) or a longer warmup") from None
        print_validation_block(result, epoch)
        metrics = {**result["metrics"], M.STEP: step, M.EPOCH: epoch, M.VALIDATION: len(state["history"]) + 1,
                   M.VALIDATIONS_PLANNED: planned}
        metrics[M.VAL_SCORE] = metrics[M.VAL_ACCURACY] - cfg.score_lambda * metrics[M.VAL_CALIBRATION_ERROR]
        for key, value in metrics.items():
            if key.startswith("val/") and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, step)
        writer.flush()
        state["history"].append(metrics)
        improved = []
        if metrics[M.VAL_ACCURACY] > state["best_accuracy"]:
            state["best_accuracy"] = metrics[M.VAL_ACCURACY]
            improved.append(("validation accuracy", "best_accuracy"))
        if metrics[M.VAL_CALIBRATION_ERROR] < state["best_calibration"]:
            state["best_calibration"] = metrics[M.VAL_CALIBRATION_ERROR]
            improved.append(("calibration error", "best_calibration"))
        if epoch_end is not None:
            _write_json(out / f"reliability_epoch_{epoch_end}.json",
                        {"epoch": epoch_end, "step": step, "metrics": result["metrics"], "domains": result["domains"],
                         "reliability": result["reliability"]})
        ckpt = _save_checkpoint(out / f"checkpoint-{step}", model, tokenizer, optimizer, scheduler, state, cfg,
                                domains, inputs, {"metrics": metrics, "domains": result["domains"],
                                                  "reliability": result["reliability"], "records": result["records"]})
        saved[step] = ckpt
        for what, name in improved:
            link_tree(ckpt, out / name, skip=TRAINER_STATE_FILES)  # the adapter only: no optimizer state
            print(f"✓ New best {what}! Saving to {out / name}", flush=True)
        _prune_checkpoints(out, cfg.save_total_limit)
        if on_validation is not None:
            on_validation(metrics, ckpt)
        return {**result, "metrics": metrics}

    saved: dict[int, Path] = {}  # step -> the checkpoint this process wrote then
    model.train()
    last_validated = state["global_step"] if resume_from is not None else -1
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="Training", disable=not cfg.progress)
    # The logging window's sums since the last logged step (loss, optimizer steps, each term), kept in the state: a
    # resumed run logs the window that straddles the checkpoint as the uninterrupted run did.
    window = state.setdefault("log_window", [0.0, 0, 0.0, 0.0, 0.0, 0.0])
    ids = token_ids(tokenizer, domains.tokens)
    step_runner = TrainStep(model, optimizer, loss_kwargs=cfg.loss_kwargs(), confidence_ids=ids.values(),
                            confident_ids=[ids[d.confident_token] for d in domains],
                            token_weights=_token_class_weights(dataset, ids, model, device)
                            if cfg.balance_token_classes else None,
                            bf16=use_bf16, compiled=compiled, max_grad_norm=cfg.max_grad_norm,
                            packed=cfg.padding_free)
    pin = device.type == "cuda"  # pinned batches: their copy to the GPU does not wait (TrainStep.add)
    for epoch in range(state["epoch"], num_epochs):
        # Data order depends on (seed, epoch) only, so a resumed run sees the same batches. Both loaders
        # get their own generator: without one, each new iterator draws its base seed from the global
        # generator, one draw more in a run resumed mid-epoch than in the uninterrupted one, and
        # LoRA dropout, drawing from the same generator, then differs.
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        if cfg.group_by_length:
            sampler = LengthGroupedBatchSampler(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator,
                                                 pin_memory=pin)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                                 generator=generator, pin_memory=pin)
        skip = state["step_in_epoch"] * cfg.gradient_accumulation_steps if epoch == state["epoch"] else 0
        state["epoch"], state["step_in_epoch"] = epoch, state["step_in_epoch"] if skip else 0
        group = []  # one optimizer step's micro-batches; the last of an epoch may hold fewer
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            group.append(batch)
            last_batch = i + 1 == len(loader)
            if len(group) < cfg.gradient_accumulation_steps and not last_batch:
                continue
            step_runner.add_group(group)
            group = []
            reading = step_runner.read()
            for k, loss_value in enumerate(reading.losses):
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"loss is {loss_value} at step {state['global_step'] + 1} (epoch {epoch + 1}, batch "
                        f"{i + 1 - (len(reading.losses) - 1 - k)}); try a lower learning_rate (now {cfg.learning_rate}) "
                        f"or a longer warmup")
            loss_value, grad_norm = reading.loss, reading.grad_norm
            if not math.isfinite(grad_norm):  # a finite loss can still back-propagate NaN; never apply it
                raise FloatingPointError(
                    f"gradient norm is {grad_norm} at step {state['global_step'] + 1} (epoch {epoch + 1}, batch {i + 1}) "
                    f"with a finite loss ({loss_value:.4g}); the parameters were not updated. Try --no-bf16 or "
                    f"--gradient_checkpointing false, and report the model and attention implementation")
            window[:] = [window[0] + reading.loss, window[1] + 1, *(a + b for a, b in zip(window[2:], reading.terms))]
            step_runner.apply()
            scheduler.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            step = state["global_step"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % cfg.logging_steps == 0 or step == total_steps:
                writer.add_scalar(M.TRAIN_LOSS, window[0] / window[1], step)
                names = (M.TRAIN_TOKEN_LOSS, M.TRAIN_PLACEMENT_LOSS, M.TRAIN_KL, M.TRAIN_ANSWER_CE)
                for name, value in zip(names, window[2:]):
                    writer.add_scalar(name, value / window[1], step)
                writer.add_scalar(M.TRAIN_LEARNING_RATE, scheduler.get_last_lr()[0], step)
                writer.add_scalar(M.TRAIN_GRAD_NORM, grad_norm, step)
                window[:] = [0.0, 0, 0.0, 0.0, 0.0, 0.0]
            end_of_epoch = last_batch
            if step >= total_steps:
                break
            if cfg.eval_steps and step % cfg.eval_steps == 0 and not end_of_epoch:
                validate(epoch + state["step_in_epoch"] / steps_per_epoch)
                last_validated = step
                model.train()
        # End of epoch (or of max_steps): validate once, and write the epoch's reliability file.
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if last_validated != state["global_step"]:
            validate(float(epoch + 1), epoch_end=epoch + 1)
            last_validated = state["global_step"]
            model.train()
        if state["global_step"] >= total_steps:
            break
    bar.close()
    writer.close()

    last = saved.get(state["global_step"])
    if last is not None and (last / ADAPTER_WEIGHTS_FILE).is_file():
        # The last validation's checkpoint holds these very weights (and the same conftok.json): link, don't copy.
        final_dir = link_tree(last, out / "final", skip=(*TRAINER_STATE_FILES, VALIDATION_FILE))
    else:  # resumed from a checkpoint of the last step: nothing was trained or saved here
        final_dir = save_adapter(model, tokenizer, out / "final", domains=domains, token_init=cfg.token_init,
                                 extra={"config": cfg.to_dict(), "inputs": inputs, "global_step": state["global_step"]})
    best = {"best_accuracy": state["best_accuracy"], "best_calibration": state["best_calibration"]}
    _write_json(final_dir / FINAL_METRICS_FILE, {"history": state["history"], **best})
    if cfg.save_total_limit is not None:  # finished: nothing left to resume (final/ keeps the adapter)
        drop_trainer_state(out / f"checkpoint-{state['global_step']}")
    return TrainResult(out, final_dir, state["global_step"], state["history"], best)


def decide_torch_compile(cfg: TrainConfig, device: torch.device, hf_backend: bool) -> tuple[bool, str]:
    """``(compile the decoder layers, why)`` for ``cfg.torch_compile`` and a model on ``device``.

    ``True`` compiles (its limits were checked before loading); ``'auto'`` compiles where it is measured to
    pay: a model on CUDA, the hf backend, unquantized, padded batches, and triton importable."""
    if cfg.torch_compile is True:
        return True, "on (torch_compile=true): the decoder layers compile at the first step of each new length"
    if cfg.torch_compile is False:
        return False, "off (torch_compile=false)"
    if device.type != "cuda":
        return False, f"off (auto): the model is on {device.type}; auto compiles on CUDA only"
    if not hf_backend:
        return False, "off (auto): the unsloth backend compiles its own kernels"
    if cfg.quantization != "none":
        return False, f"off (auto): {cfg.quantization} quantization"
    if cfg.padding_free:
        return False, "off (auto): padding_free batches"
    ok, why = compiler_available(device)
    if not ok:
        return False, f"off (auto): {why}"
    return True, "on (auto): the decoder layers compile at the first step of each new length"


def check_resume_config(cfg: TrainConfig, checkpoint: Path) -> None:
    """Raise :class:`~conftok.config.ConfigError` when ``checkpoint`` was written under settings that shape a run
    (:meth:`TrainConfig.resume_conflicts`) other than ``cfg``'s: resuming would go on with the old run's
    optimizer, schedule and data order under the new settings, or return the old run's adapter if it had
    finished, as if it were the new one. A checkpoint without its config (an older conftok) is not checked."""
    meta_path = checkpoint / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    saved = meta.get("config")
    conflicts = cfg.resume_conflicts(saved, meta.get("inputs")) if isinstance(saved, dict) else []
    if conflicts:
        raise ConfigError(f"cannot resume from {checkpoint}: it was written by a run with other settings "
                          f"({'; '.join(conflicts)}). Resume with the settings that run was started with, or start "
                          "a new run in another output_dir")


def _schedule(n_rows: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps an epoch, optimizer steps in all) for ``n_rows`` training rows."""
    per_epoch = math.ceil(n_rows / cfg.batch_size / cfg.gradient_accumulation_steps)
    return per_epoch, cfg.max_steps or per_epoch * cfg.num_epochs


def planned_validations(n_rows: int, cfg: TrainConfig) -> int:
    """How many validations :func:`train` makes on ``n_rows`` training rows: every ``eval_steps`` steps and at each
    epoch's end (and at ``max_steps``), once at a step that is both (what a search's ASHA ``max_t`` must allow)."""
    per_epoch, total = _schedule(n_rows, cfg)
    ends = {min(per_epoch * e, total) for e in range(1, math.ceil(total / per_epoch) + 1)}
    middles = set(range(cfg.eval_steps, total, cfg.eval_steps)) if cfg.eval_steps else set()
    return len(ends | middles)


def math_attention(cfg: TrainConfig, device: torch.device, compiled: bool) -> bool:
    """Whether training attention runs SDPA's math kernel, which keeps (batch, heads, T, T) scores (the memory
    estimate of ``gradient_checkpointing="auto"`` counts them then). Compiled layers train under it always; eager
    ones on CUDA for padded batches (:func:`conftok.loss.padded_attention_guard`), which length-grouped batches
    nearly all are (rows of several lengths: 442 of 443 on the real rows at batch 8). Padding-free batches
    (flash-attention) have none."""
    return compiled or (device.type == "cuda" and not cfg.padding_free)


def _finished_run(out: Path, checkpoint: Path) -> TrainResult | None:
    """The run finished in ``out`` whose last checkpoint is ``checkpoint`` (its trainer state
    dropped, its step final/'s), or None."""
    def global_step(directory: Path) -> int | None:
        meta = directory / METADATA_FILE
        return json.loads(meta.read_text()).get("global_step") if meta.is_file() else None

    final = out / "final"
    if (checkpoint / TRAINER_STATE_FILE).is_file() or not (final / FINAL_METRICS_FILE).is_file():
        return None
    step = global_step(final)
    if step is None or global_step(checkpoint) != step:
        return None
    record = json.loads((final / FINAL_METRICS_FILE).read_text())
    best = {k: record[k] for k in ("best_accuracy", "best_calibration")}
    return TrainResult(out, final, step, record["history"], best)


def _token_class_weights(dataset, ids: dict[str, int], model, device) -> torch.Tensor:
    """(V,) weights for the token loss: per domain, C and U weigh n / (2 n_class), so both count equally (n / 2 each
    over an epoch) and the domain's rows weigh n in all, as unweighted; a domain whose rows are all one class keeps
    weight 1 (n / (2 n) would halve it against the other domains)."""
    counts = dataset.token_counts()
    weights = torch.ones(model.get_output_embeddings().weight.shape[0], device=device)
    for domain in dataset.domains:
        n = {t: counts.get(t, 0) for t in domain.tokens}
        total = sum(n.values())
        if sum(1 for count in n.values() if count) < 2:
            continue
        for t, count in n.items():
            weights[ids[t]] = total / (2 * count)
    return weights


def _save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, state, cfg, domains, inputs,
                     validation) -> Path:
    """Adapter + everything needed to resume, written atomically: every file goes to a hidden
    staging directory that becomes ``path`` in one rename, so a crash leaves no ``checkpoint-N``
    without its trainer state (a resume would pick it and fail)."""
    staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
    try:
        save_adapter(model, tokenizer, staging, domains=domains, token_init=cfg.token_init,
                     extra={"config": cfg.to_dict(), "inputs": inputs, "global_step": state["global_step"]})
        save_trainer_state(staging, optimizer=optimizer, scheduler=scheduler, state=state)
        _write_json(staging / VALIDATION_FILE, validation)
        replace_directory(staging, path)  # the same step written again (a resumed run): the new one wins
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _check_resumable(path: Path, out: Path) -> None:
    """Raise FileNotFoundError, naming what is wrong, unless ``path`` holds a trainer state to resume from."""
    if not path.is_dir():
        raise FileNotFoundError(f"cannot resume from {path}: no such directory")
    if all((path / name).is_file() for name in TRAINER_STATE_FILES):
        return
    if (path / ADAPTER_WEIGHTS_FILE).is_file():  # a run's last checkpoint, its trainer state dropped when it finished
        raise FileNotFoundError(f"cannot resume from {path}: it is the last checkpoint of a finished run (its trainer "
                                f"state was dropped); that run's output_dir holds its result, not {out}")
    raise FileNotFoundError(f"cannot resume from {path}: no {' + '.join(TRAINER_STATE_FILES)} (not a checkpoint-N "
                            "directory, or one pruned by save_total_limit down to its validation.json)")


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not all((path / name).is_file() for name in TRAINER_STATE_FILES):
        raise FileNotFoundError(f"cannot resume from {path}: no {' + '.join(TRAINER_STATE_FILES)} (not a "
                                "checkpoint-N directory)")
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(model_device(model)))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: adapter does not match the model (unexpected keys {result.unexpected_keys[:5]})")
    return load_trainer_state(path, optimizer=optimizer, scheduler=scheduler)  # also restores every random state


_BEST = (("best_accuracy", M.VAL_ACCURACY), ("best_calibration", M.VAL_CALIBRATION_ERROR))  # directory = state key


def _relink_best(out: Path, checkpoint: Path, state: dict[str, Any]) -> None:
    """Point ``best_*/`` at ``checkpoint`` where its validation set that best figure but the directory does not
    show it: a process stopped between writing the checkpoint and linking ``best_*/`` to it (the resumed run
    takes the figure from the checkpoint's state and would not link it again)."""
    history = state.get("history") or []
    if not history:
        return
    for name, key in _BEST:
        first = next((m for m in history if m.get(key) == state.get(name)), None)
        if first is None or first[M.STEP] != state["global_step"]:
            continue
        shown = out / name / VALIDATION_FILE
        step = json.loads(shown.read_text())["metrics"].get(M.STEP) if shown.is_file() else None
        if step != state["global_step"]:
            link_tree(checkpoint, out / name, skip=TRAINER_STATE_FILES)
            logger.info("%s: linked to %s (the run stopped before it was)", out / name, checkpoint)


def _prune_checkpoints(out: Path, keep: int | None) -> None:
    """Strip every ``checkpoint-N/`` but the last ``keep`` whole ones down to its validation.json.

    Files that ``best_*/`` (or Ray's storage) link to stay on disk under those names."""
    if keep is None:
        return
    whole = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                    and any(f.name != VALIDATION_FILE for f in p.iterdir())), key=lambda p: int(p.name.split("-")[-1]))
    for old in whole[:-keep]:
        for item in old.iterdir():
            if item.name != VALIDATION_FILE:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
