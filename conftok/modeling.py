"""Build the LoRA model (backends ``hf``, ``unsloth``, ``auto``), save and load adapters.

The new tokens' rows are trained through PEFT ``trainable_token_indices``; everything else is
frozen but the LoRA matrices. Adapters are saved as safetensors with
``save_embedding_layers=False``: the file holds LoRA weights and the new rows only (not copies of
whole embedding matrices), and reloading rebuilds the base rows the same deterministic way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from conftok.domains import DomainSet, resolve_domains
from conftok.lora_targets import present_target_modules, trainable_token_indices
from conftok.loss import CHECKPOINTING_KWARGS
from conftok.memory import auto_gradient_checkpointing
from conftok.tokens import add_confidence_tokens, init_token_rows, token_ids

__all__ = ["BACKENDS", "QUANTIZATIONS", "DEFAULT_TARGET_MODULES", "METADATA_FILE", "ADAPTER_WEIGHTS_FILE",
           "PICKLE_PATTERNS", "build_model",
           "enable_gradient_checkpointing",
           "load_tokenizer", "looks_like_hub_id", "resolve_backend", "save_adapter", "load_adapter", "model_device",
           "replace_directory"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "unsloth")
QUANTIZATIONS = ("none", "8bit", "4bit")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METADATA_FILE = "conftok.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Files a pickle-based loader would read (torch.save archives, pickles): never downloaded, never read.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


def _unsloth_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``unsloth`` when CUDA and unsloth are present, else ``hf``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "unsloth" if torch.cuda.is_available() and _unsloth_available() else "hf"
    if backend == "unsloth" and not _unsloth_available():
        raise ImportError("backend='unsloth' needs unsloth: pip install 'conftok[gpu]' "
                          "(on a CPU box: pip install --no-deps unsloth unsloth_zoo, see the Makefile)")
    return backend


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())


def _quantization_config(quantization: str, compute_dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes, which is not installed: "
                          "pip install 'conftok[gpu]' (or pip install bitsandbytes), or use quantization='none'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """A tokenizer that pads on the left with a pad token (eos when it has none).

    ``trust_remote_code`` is passed on explicitly: a repo's own tokenizer code runs only when asked for.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    model_name: "str | os.PathLike | torch.nn.Module",
    *,
    tokenizer=None,
    domains=None,
    backend: str = "auto",
    quantization: str = "none",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    gradient_checkpointing: bool | str = True,
    bf16: bool = True,
    token_init: str = "end_of_turn",
    max_seq_length: int = 2048,
    seed: int = 42,
    device: "str | torch.device | None" = None,
    batch_size: int = 8,
    seq_len: int | Callable[[Any], int] | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM, add the domains' confidence tokens and wrap it with LoRA.

    Args:
        model_name: Hub id or local directory; or an already built model (tests), in which case
            ``tokenizer`` must be given and the backend is ``hf``.
        domains: :class:`~conftok.domains.DomainSet` or spec; defaults to read/med.
        backend: ``hf`` (transformers + PEFT), ``unsloth`` (FastLanguageModel) or ``auto``.
        quantization: ``none``, ``8bit`` or ``4bit`` (bitsandbytes).
        bf16: load weights in bfloat16 on a CPU or a GPU that supports it (fp32 otherwise).
        token_init: ``end_of_turn`` or ``mean`` (see :func:`~conftok.tokens.add_confidence_tokens`).
        gradient_checkpointing: True, False, or ``"auto"``: decided by
            :func:`conftok.memory.auto_gradient_checkpointing` once the weights are on the device, for
            batches of ``batch_size`` rows of ``seq_len`` tokens (default ``max_seq_length``).
        seq_len: the longest row in tokens, or a function of the tokenizer (the confidence tokens added)
            that gives it, called only where ``"auto"`` is decided (``conftok.train`` reads its rows there).
        attn_implementation: passed to ``from_pretrained`` (``flash_attention_2`` for padding-free
            batches); None: transformers' default. A model object keeps its own.
        trust_remote_code: run code shipped with the model (its config's ``auto_map``); off, only
            transformers' own classes load. Weights are read from safetensors only (no pickle).

    Returns:
        ``(peft_model, tokenizer)``; the tokenizer pads on the left.
    """
    domains = resolve_domains(domains)
    torch.manual_seed(seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    # bf16 weights on a GPU that has it, and on CPUs too (2.7x faster matmuls than fp32 on this
    # project's AVX-512 boxes); LoRA matrices stay fp32 (PEFT autocast_adapter_dtype).
    use_bf16 = bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(gradient_checkpointing, bool) and gradient_checkpointing != "auto":
        raise ValueError(f"gradient_checkpointing must be True, False or 'auto', got {gradient_checkpointing!r}")
    quant_config = _quantization_config(quantization, dtype)

    if isinstance(model_name, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("build_model(model, ...) with a model object needs tokenizer=")
        if backend == "unsloth":
            raise ValueError("backend='unsloth' loads the model itself: pass a model name or path, "
                             "not a model object (or use backend='hf')")
        if quant_config is not None:
            raise ValueError(f"quantization={quantization!r} applies when loading by name; a model object "
                             "is used as given (quantize it before passing it, or pass its name or path)")
        backend, model = "hf", model_name
    else:
        backend = resolve_backend(backend)
        if backend == "unsloth":
            if attn_implementation is not None:
                raise ValueError(f"attn_implementation={attn_implementation!r} applies to the hf backend; unsloth "
                                 "chooses its own attention (use backend='hf')")
            from conftok import _unsloth

            return _unsloth.build_model(
                str(model_name), domains=domains, quantization=quantization, lora_r=lora_r,
                lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                gradient_checkpointing=gradient_checkpointing, dtype=dtype, token_init=token_init,
                max_seq_length=max_seq_length, seed=seed, batch_size=batch_size, seq_len=seq_len,
                trust_remote_code=trust_remote_code,
            )
        from transformers import AutoModelForCausalLM

        tokenizer = tokenizer or load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        # use_safetensors: a repo with only pytorch_model.bin (a pickle) fails here instead of being unpickled.
        model = AutoModelForCausalLM.from_pretrained(
            str(model_name), dtype=dtype, quantization_config=quant_config, use_safetensors=True,
            trust_remote_code=trust_remote_code, **extra,
            device_map={"": device.index or 0} if quant_config is not None and device.type == "cuda" else None,
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The rows are set on every base model prepared here, also when the tokenizer held the tokens already
    # (reused from an earlier build): add_confidence_tokens sets only the rows of tokens it adds.
    ids = add_confidence_tokens(tokenizer, None, domains.tokens)
    init_token_rows(model, tokenizer, list(ids.values()), token_init)
    if quant_config is None:
        model.to(device)
    if gradient_checkpointing == "auto":
        rows = seq_len(tokenizer) if callable(seq_len) else seq_len or max_seq_length
        gradient_checkpointing = auto_gradient_checkpointing(model, batch_size=batch_size, seq_len=rows,
                                                             lora_r=lora_r, target_modules=target_modules)
    return _wrap_lora(model, tokenizer, list(ids.values()), quantized=quant_config is not None,
                      lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=target_modules, gradient_checkpointing=gradient_checkpointing)


def _wrap_lora(model, tokenizer, ids, *, quantized, lora_r, lora_alpha, lora_dropout, target_modules,
               gradient_checkpointing):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS,
        )
    elif gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads keep it robust anyway.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
        model.enable_input_require_grads()
    model.config.use_cache = False
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
        target_modules=present_target_modules(model, target_modules),
        trainable_token_indices=trainable_token_indices(model, ids),
    )
    return get_peft_model(model, config), tokenizer


def enable_gradient_checkpointing(model) -> None:
    """Turn on gradient checkpointing in a model ``build_model`` wrapped without it (hf backend), as
    ``gradient_checkpointing=True`` would have: non-reentrant, with input gradients."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    base.enable_input_require_grads()


def _write_metadata(out_dir: Path, tokenizer, domains: DomainSet, extra: dict[str, Any]) -> None:
    meta = {
        "domains": domains.to_list(),
        "token_ids": token_ids(tokenizer, domains.tokens),
        **extra,
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))


def save_adapter(model, tokenizer, out_dir: str | os.PathLike, *, domains=None,
                 token_init: str = "end_of_turn", extra: dict[str, Any] | None = None) -> Path:
    """Write adapter (safetensors), tokenizer and ``conftok.json`` to ``out_dir`` atomically.

    Files go to a temporary sibling first and replace ``out_dir`` in one rename, so a crash
    leaves either the old directory or the new one, never a half-written one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    domains = resolve_domains(domains)
    # Named with the pid, as every temporary of a run's tree (conftok.checkpoint.remove_leftovers).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_metadata(tmp, tokenizer, domains, {"token_init": token_init, **(extra or {})})
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def replace_directory(new: Path, out_dir: Path) -> None:
    """Put the finished directory ``new`` at ``out_dir`` by renames: a reader sees the old directory
    or the new one, never a mix (an existing ``out_dir`` is moved aside, then removed)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(new, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def looks_like_hub_id(value: "str | os.PathLike") -> bool:
    """Whether ``value`` names a Hub repo (``user/name``) rather than a local path: no such path here,
    one slash, and neither a path's start (``.``, ``/``, ``~``) nor an existing directory before the
    slash (``experimnts/final`` beside ``experiments/`` is a mistyped path, ``runs/final`` with
    ``runs/`` present a missing one: both get "no such directory", not a Hub download)."""
    text = str(value)
    if Path(text).exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    owner, name = text.split("/")
    return bool(owner and name) and not Path(owner).exists()


def load_adapter(adapter_dir: str | os.PathLike, *, base_model: "str | torch.nn.Module | None" = None,
                 device: "str | torch.device | None" = None, bf16: bool = False, is_trainable: bool = False,
                 trust_remote_code: bool = False):
    """Load a saved adapter (a directory or a Hub repo id) onto a fresh base model:
    ``(model, tokenizer, domains)``.

    ``base_model`` defaults to the adapter's ``base_model_name_or_path``; pass a model object to
    reuse one. The tokenizer (with the confidence tokens) comes from ``adapter_dir``. Nothing is
    unpickled: the adapter must be ``adapter_model.safetensors`` (PEFT would fall back to a pickled
    ``adapter_model.bin``; that is refused here), and the base model's weights safetensors too.
    ``trust_remote_code`` applies to the base model and the tokenizer. ``bf16``: load the base model in
    bfloat16 on a GPU (half the memory, about twice the decode speed, and the precision training validated in);
    off, float32 (exact reference values).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    if looks_like_hub_id(adapter_dir):
        from huggingface_hub import snapshot_download

        adapter_dir = Path(snapshot_download(str(adapter_dir), ignore_patterns=list(PICKLE_PATTERNS)))
    meta_path = adapter_dir / METADATA_FILE
    if not (adapter_dir / "adapter_config.json").is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a conftok adapter (needs adapter_config.json and "
                                f"{METADATA_FILE}, written by save_adapter)")
    if not (adapter_dir / ADAPTER_WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_model"))
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS_FILE} (found {found or 'no adapter weights'}); "
                                "adapters are read from safetensors only, never from a pickle such as adapter_model.bin")
    meta = json.loads(meta_path.read_text())
    domains = resolve_domains(meta["domains"])
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(base_model, torch.nn.Module):
        model = base_model
    else:
        name = base_model or json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(name), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    ids = token_ids(tokenizer, domains.tokens)
    if ids != {k: int(v) for k, v in meta["token_ids"].items()}:
        raise ValueError(f"{adapter_dir}: tokenizer token ids {ids} differ from {METADATA_FILE} {meta['token_ids']}")
    init_token_rows(model, tokenizer, list(ids.values()), meta.get("token_init", "end_of_turn"))
    model.to(device)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    model.eval()
    return model, tokenizer, domains
