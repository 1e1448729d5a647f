"""Training configuration: every flag of the original script with its default, plus validation
sources, backend and quantization. Checked in ``__post_init__``; all problems reported at once."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from conftok.calibration import CALIBRATION_P_NORMS
from conftok.evaluate import BATCHINGS
from conftok.inputs import InputError
from conftok.loss import ANSWER_CE_ROWS
from conftok.modeling import BACKENDS, DEFAULT_TARGET_MODULES, QUANTIZATIONS

__all__ = ["TrainConfig", "ConfigError", "RESUME_MAY_CHANGE"]

LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")

# Fields a run resumed from its checkpoint may change: where and how often it validates, writes and logs,
# and how its steps are computed (numerics aside). Any other field shapes the run itself (the model, the
# data and its order, the batches, the schedule, the loss): changing one would splice two runs into one.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "hf_repo", "progress", "logging_steps", "save_total_limit", "eval_steps", "val_sources", "val_split",
    "val_max_samples", "eval_batch_size", "eval_static_cache", "eval_batching", "max_new_tokens", "calib_beta",
    "calib_p_norm", "score_lambda", "bf16", "gradient_checkpointing", "torch_compile", "padding_free",
    "reference_cache", "trust_remote_code"})


def _domains_form(spec: Any) -> Any:
    """``spec`` (None, a file path, a list of domain mappings) as the domains it resolves to, for comparing; as it
    is where it does not resolve here (a file gone)."""
    from conftok.domains import resolve_domains

    try:
        return resolve_domains(spec).to_list()
    except Exception:  # noqa: BLE001 - compared as given
        return spec


class ConfigError(InputError):
    """One or more config fields are invalid; the message lists each."""


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    # Model and data (the seed's flags)
    model_name: str = _help("Hub id or local directory of the instruct model.",
                            default="Qwen/Qwen2.5-7B-Instruct")
    train_data: str = _help("Tagged JSONL: {question, tagged_response, dataset} per line.",
                            default="tagged/qwen/qwen_all_tagged.jsonl")
    output_dir: str = _help("Run directory: checkpoint-N/, best_*/, final/, logs/ go here.",
                            default="./checkpoints/qwen_confidence")
    hf_repo: str | None = _help("Hub repo to push the final adapter to (token from env/login).", default=None)
    num_epochs: int = _help("Training epochs.", default=3)
    batch_size: int = _help("Examples per micro-batch.", default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak AdamW learning rate.", default=2e-4)
    warmup_ratio: float = _help("Fraction of optimizer steps spent warming up.", default=0.03)
    weight_decay: float = _help("AdamW weight decay (LoRA matrices; not the token rows).", default=0.01)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = _help("Dropout on LoRA inputs.", default=0.05)
    calib_beta: int = _help("Items per calibration bin.", default=100)
    calib_p_norm: str = _help("Calibration error norm: '1', '2' or 'infty'.", default="2")
    max_seq_length: int = _help("Longest example; questions are cut from the start to fit.", default=2048)
    bf16: bool = _help("bfloat16 weights/autocast where the device supports it.", default=True)
    seed: int = _help("Random seed (model init, data order).", default=42)
    eval_steps: int | None = _help("Validate every N optimizer steps (and at each epoch end); None: epoch ends only.",
                                   default=500)
    # Validation
    val_sources: dict[str, str] | None = _help(
        "Data set name -> validation source (local .jsonl/.parquet or Hub name); None: each domain's default.",
        default=None)
    val_split: str = _help("Split to read from Hub validation sources.", default="validation")
    val_max_samples: int | None = _help("Rows per data set used for validation (None: all).", default=500)
    eval_batch_size: int = _help(
        "Generation batch size in validation (and the batch of the stored KL's base pass). Greedy decoding "
        "is bound by launching kernels, not by the card, so larger batches cost little more a step: on an "
        "H200 a 7B validated 20.9 rows/s at 64 against 9.9 at 16 (bench/results/gpu_h200.json).", default=64)
    eval_static_cache: bool = _help(
        "Validation decodes into a static KV cache of one shape (conftok.evaluate.generate): on CUDA transformers "
        "compiles the decode step once and replays it as a CUDA graph, where a decode step is otherwise bound by "
        "launching its kernels (a 7B on an H200: 47 ms a base-model step at batch 64, where reading the weights "
        "takes ~3 ms; validation ran no faster at batch 256 than at 64). The first validation pays the compile. "
        "One cache length serves every domain, so one compiled step serves a whole validation and the next. A "
        "float32 model under bf16 autocast keeps the dynamic cache (its keys and values differ in dtype), logged. "
        "hf backend only (unsloth's generate takes its own dynamic cache). Not yet timed on a GPU "
        "(bench/gpu.py --static_cache).", default=False)
    eval_batching: str = _help(
        "How validation groups its length-sorted prompts (conftok.evaluate.plan_batches): 'rows', eval_batch_size "
        "a batch; 'padding', at most eval_batch_size a batch, the fewest prefill positions plus each batch's decode "
        "steps; 'tokens', as many as fit eval_batch_size rows of the longest prompt (up to 4x the rows), in the "
        "fewest batches, then the least padding (for decoding bound by launching kernels; not yet timed on a GPU); "
        "'auto': 'padding' on a CPU, 'rows' elsewhere. On 64 + 64 real rows at 64, 'rows' batches are 69% padding "
        "and 'padding' 15%: 3.3x the samples/s on the CPU (bench/validation_batches.py). With eval_static_cache "
        "the batches are 'rows' (one shape).", default="auto")
    max_new_tokens: int = _help("Longest generated answer in validation (tagging's budget too); the confidence "
                                "token gets one step more.", default=16)
    # Model building
    backend: str = _help("'hf' (transformers + PEFT), 'unsloth' or 'auto'.", default="auto")
    quantization: str = _help("'none', '8bit' or '4bit' (bitsandbytes).", default="none")
    trust_remote_code: bool = _help(
        "Run Python code that a model's Hub repo or directory ships (its config's auto_map) when loading the "
        "model and tokenizer. Off: transformers' own classes only; a repo that needs its own code fails to load. "
        "Turn it on only for a repo whose code you have read.", default=False)
    target_modules: tuple[str, ...] = _help("LoRA target modules.", default=DEFAULT_TARGET_MODULES)
    gradient_checkpointing: bool | str = _help(
        "Recompute activations in backward: less memory, ~1/3 more compute. 'auto': off when the step fits in "
        "80 percent of the free memory without it, on otherwise, decided before the first step from the "
        "model's shape, the batch and its longest row (conftok.memory; one line in the log says why). On a "
        "CPU the free memory is the available RAM, decided the same way: RAM is shared with other processes "
        "and a step without checkpointing is ~1.5x faster there too. true/false force it.", default="auto")
    token_init: str = _help("New token rows from 'end_of_turn' or 'mean'.", default="end_of_turn")
    domains: Any = _help("Domain list or JSON/YAML file; None: read (boolq) and med (medqa).", default=None)
    # Loop
    lr_scheduler: str = _help("transformers schedule after warmup.", default="linear")
    logging_steps: int = _help("Log train/* scalars every N optimizer steps.", default=10)
    max_steps: int | None = _help("Stop after N optimizer steps (None: num_epochs).", default=None)
    save_total_limit: int | None = _help(
        "Keep the weights and trainer state of the last N checkpoint-* dirs (None: all); older ones keep only "
        "validation.json. best_accuracy/, best_calibration/ and final/ are kept whatever N is. 1 is enough to "
        "resume: a run resumes from its last checkpoint.", default=1)
    group_by_length: bool = _help(
        "Batch rows of similar length together (conftok.sampler.LengthGroupedBatchSampler; batch order "
        "still shuffled by seed and epoch): padding falls from ~40 to ~2 percent of batch positions with "
        "8 real BoolQ/MedQA rows a batch (bench/padding.py).", default=True)
    padding_free: bool = _help(
        "Concatenate each batch's rows into one sequence with no padding at all (conftok.packing). Needs "
        "flash-attention 2 (the flash_attn package, a CUDA GPU; the model is loaded with "
        "attn_implementation='flash_attention_2') and the hf backend.", default=False)
    torch_compile: bool | str = _help(
        "torch.compile each decoder layer for training (conftok.compiling): fewer, fused kernels a step where "
        "launching them bounds it. On an H200 a 7B step with the default loss ran 1.31x faster compiled, 1.57x "
        "token-only (bench/README.md); the first step, and the first of another length, pay the compile (about "
        "47 s for a 7B there). 'auto': on for a model on CUDA with the hf backend, no quantization and no "
        "padding_free, where triton imports; off otherwise (one line in the log says why). Validation runs the "
        "layers uncompiled.", default="auto")
    placement_weight: float = _help(
        "Weight of -log(1 - p(confidence token)) at the answer's positions: keeps the token after the "
        "answer (0: token loss only).", default=1.0)
    kl_weight: float = _help(
        "Weight of the live KL(base || tuned) at the answer's positions: keeps the answers the base model's "
        "(0: off; costs one extra forward without gradients a step; exclusive with stored_kl_weight).", default=0.0)
    answer_ce_weight: float = _help(
        "Weight of -log p(answer token) at the answer's positions (the answers are the base model's own): "
        "keeps the answers without a second forward (0: off).", default=0.0)
    answer_ce_rows: str = _help("Rows whose answers answer_ce_weight holds: 'all', or 'correct' (those tagged "
                                "confident; Self-REF masks the wrong answers).", default="all")
    stored_kl_weight: float = _help(
        "Weight of KL(base || tuned) at the answer's positions against the base model's top-k "
        "log-probabilities, computed once before training (the default guard: keeps the answers at "
        "~1.01x a token-only step; 0: off; exclusive with kl_weight).", default=1.0)
    stored_kl_top_k: int = _help("Base log-probabilities kept per answer position for stored_kl_weight.", default=32)
    reference_cache: str = _help(
        "Directory that keeps stored_kl_weight's base top-k between runs on the same rows and base model (a "
        "resumed run, the trials of a search: one base pass for all); 'auto': <output_dir>/cache (a search: "
        "the trials' shared cache); '': off.", default="auto")
    balance_token_classes: bool = _help(
        "Weight the token loss per domain by inverse class frequency (C and U count equally).", default=False)
    score_lambda: float = _help("val/score = accuracy - lambda * calibration error.", default=1.0)
    progress: bool = _help("Show progress bars.", default=True)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        p = []
        positive_ints = ("num_epochs", "batch_size", "gradient_accumulation_steps", "lora_r", "calib_beta",
                         "max_seq_length", "eval_batch_size", "max_new_tokens", "logging_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_steps", "val_max_samples", "max_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                p.append(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("learning_rate", "lora_alpha", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                p.append(f"{name} must be a positive number, got {value!r}")
        for name in ("warmup_ratio", "lora_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                p.append(f"{name} must be in [0, 1), got {value!r}")
        for f in dataclasses.fields(self):  # "false" in a YAML file or a dict is a string, and bool("false") is True
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                p.append(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("score_lambda", "placement_weight", "kl_weight", "answer_ce_weight", "stored_kl_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                p.append(f"{name} must be a number >= 0, got {value!r}")
        choices = {"calib_p_norm": CALIBRATION_P_NORMS, "backend": BACKENDS, "quantization": QUANTIZATIONS,
                   "token_init": ("end_of_turn", "mean"), "lr_scheduler": LR_SCHEDULERS,
                   "answer_ce_rows": ANSWER_CE_ROWS, "eval_batching": ("auto", *BATCHINGS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                p.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.padding_free and self.backend == "unsloth":
            p.append("padding_free=True needs backend 'hf' (or 'auto' without unsloth), got 'unsloth'")
        if self.eval_static_cache and self.backend == "unsloth":  # its generate takes a dynamic cache whatever is asked
            p.append("eval_static_cache=True needs backend 'hf' (or 'auto' without unsloth), got 'unsloth'")
        if not isinstance(self.torch_compile, bool) and self.torch_compile != "auto":
            p.append(f"torch_compile must be true, false or 'auto', got {self.torch_compile!r}")
        if self.torch_compile is True and self.backend == "unsloth":
            p.append("torch_compile=True needs backend 'hf' (unsloth compiles its own kernels), got 'unsloth'")
        if self.torch_compile is True and self.quantization != "none":
            p.append(f"torch_compile=True needs quantization 'none' (bitsandbytes layers are not compiled), got "
                     f"{self.quantization!r}")
        if self.torch_compile is True and self.padding_free:
            p.append("torch_compile=True and padding_free=True: choose one (flash-attention's varlen path is not compiled)")
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != "auto":
            p.append(f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        for name in ("model_name", "train_data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                p.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.val_sources is not None and (
                not isinstance(self.val_sources, dict) or not all(isinstance(v, str) for v in self.val_sources.values())):
            p.append(f"val_sources must map data set name -> source string, got {self.val_sources!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 32:
            p.append(f"seed must be an integer in [0, 2**32) (numpy's range), got {self.seed!r}")
        if self.kl_weight and self.stored_kl_weight:
            p.append(f"kl_weight ({self.kl_weight}) and stored_kl_weight ({self.stored_kl_weight}) are two forms of "
                     "the same term: set one of them to 0")
        if not isinstance(self.stored_kl_top_k, int) or isinstance(self.stored_kl_top_k, bool) or self.stored_kl_top_k < 1:
            p.append(f"stored_kl_top_k must be a positive integer, got {self.stored_kl_top_k!r}")
        if not self.target_modules:
            p.append("target_modules must name at least one module")
        if p:
            raise ConfigError("invalid TrainConfig:\n  " + "\n  ".join(p))

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`conftok.loss.training_loss` that this config sets (the guard terms)."""
        return {"placement_weight": self.placement_weight, "kl_weight": self.kl_weight,
                "answer_ce_weight": self.answer_ce_weight, "answer_ce_rows": self.answer_ce_rows,
                "stored_kl_weight": self.stored_kl_weight}

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values: ``domains`` as given when it is None or a file path, else as the list of
        domain mappings it resolves to (Domain objects or a DomainSet would otherwise be written as their repr)."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        if isinstance(self.domains, os.PathLike):
            out["domains"] = os.fspath(self.domains)
        elif self.domains is not None and not isinstance(self.domains, str):
            from conftok.domains import resolve_domains

            out["domains"] = resolve_domains(self.domains).to_list()
        return out

    def input_fingerprints(self) -> dict[str, Any]:
        """What the run's inputs hold, beyond their names: the training file's SHA-256 (None where it cannot be
        read here) and the domains as resolved. A checkpoint keeps these (``conftok.json``, ``inputs``), so a
        resume on a file tagged again in place, or a domain file edited, is refused (:meth:`resume_conflicts`)."""
        import hashlib

        from conftok.domains import resolve_domains

        digest = None
        try:
            with open(self.train_data, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:  # not readable here: the data loader says why, where it reads it
            pass
        try:
            domains = resolve_domains(self.domains).to_list()
        except Exception:  # noqa: BLE001 - a bad domain file: train() reports it in full
            domains = None
        return {"train_data_sha256": digest, "domains": domains}

    def resume_conflicts(self, saved: dict[str, Any], saved_inputs: dict[str, Any] | None = None) -> list[str]:
        """``"field: saved -> now"`` for each field outside :data:`RESUME_MAY_CHANGE` on which this config and
        ``saved`` (the ``to_dict()`` of the config a checkpoint was written under) differ, and for each of the
        ``saved_inputs`` (:meth:`input_fingerprints` when the checkpoint was written) that the inputs no longer
        match: the training file's content, the domains' content."""
        now = self.to_dict()
        out = []
        for name, value in now.items():
            if name in RESUME_MAY_CHANGE or name not in saved:
                continue
            before = saved[name]
            if name == "train_data" and isinstance(before, str):  # the same file, however it is named
                before, value = os.path.realpath(before), os.path.realpath(value)
            if name == "domains":  # a path or the list it holds, compared by what they resolve to
                before, value = _domains_form(before), _domains_form(value)
            if isinstance(before, list) and isinstance(value, (list, tuple)):
                value = list(value)
            if before != value:
                out.append(f"{name}: {before!r} -> {value!r}")
        if saved_inputs:  # the same names, other contents (said once: a changed name is listed above)
            now_inputs = self.input_fingerprints()
            before, value = saved_inputs.get("train_data_sha256"), now_inputs["train_data_sha256"]
            if before and value and before != value and not any(c.startswith("train_data:") for c in out):
                out.append(f"train_data {self.train_data}: its content (SHA-256) {before[:12]}… -> {value[:12]}…")
            before, value = saved_inputs.get("domains"), now_inputs["domains"]
            if before and value and before != value and not any(c.startswith("domains:") for c in out):
                out.append("domains: their content changed")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**data)
