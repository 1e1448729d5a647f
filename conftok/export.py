"""Export a trained adapter as a standalone model directory that any Hugging Face stack can serve.

    from conftok import export_merged
    export_merged("experiments/demo/trials/<best>/final", "exported/demo", dtype="bf16")

A conftok adapter is LoRA matrices plus the confidence tokens' embedding and output rows (PEFT
``trainable_token_indices``) on a base model whose matrices must first grow to the tokenizer: most
serving stacks (vLLM, TGI, plain ``from_pretrained``) cannot load that as it is. The export loads
the adapter onto its base in fp32 (the same way :func:`~conftok.modeling.load_adapter` does), folds
everything into the weights with PEFT ``merge_and_unload`` and writes:

- ``model.safetensors`` (safetensors only, no pickle) and ``config.json``: the merged weights. In
  PEFT 0.21.2 ``merge_and_unload`` merges each LoRA layer and replaces the rows of every
  ``TrainableTokensWrapper`` with the trained ones (``TrainableTokensLayer.merge`` index-copies the
  stored rows into the base weight). With tied embeddings the input and output matrices are one
  parameter, so one copy serves both and ``tie_word_embeddings`` stays true; untied, the embedding
  and lm_head each get their own trained rows.
- the tokenizer with the confidence tokens (and the chat template);
- ``generation_config.json`` whose ``eos_token_id`` lists the base's eos, the end-of-turn token and
  every confidence token, so a plain ``generate`` (or a server reading the file) stops at the
  token instead of running on; ``begin_suppress_tokens`` forbids the confidence tokens as the
  first generated token, as conftok's own generation does (a token comes after an answer, never
  instead of one); and greedy decoding with no repetition penalty, as conftok tagged, trained and
  validated (the base's sampling settings are dropped);
- ``conftok.json``: the domains and token ids (for reading p_confident from a server's
  log-probabilities with :func:`conftok.p_confident_from_logprobs`).

Everything is written to a temporary directory beside ``out_dir`` and renamed into place at the
end: a failure leaves nothing half-written. Merging is done in fp32 and then cast to ``dtype``; on
a CPU a 7B model needs about 30 GB of memory (fp32 weights), and a few minutes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from conftok.evaluate import GREEDY
from conftok.modeling import METADATA_FILE, PICKLE_PATTERNS, load_adapter
from conftok.smollm import _make_readable  # the usual umask modes (mkdtemp makes 0o700)
from conftok.tokens import end_of_turn_token_id, token_ids

__all__ = ["EXPORT_DTYPES", "export_merged"]

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bf16",
                  base_model: "str | os.PathLike | torch.nn.Module | None" = None,
                  device: "str | torch.device" = "cpu", overwrite: bool = False,
                  max_shard_size: str = "5GB", trust_remote_code: bool = False) -> Path:
    """Merge a conftok adapter into its base model and write a standalone model directory.

    Args:
        adapter_dir: an adapter written by :func:`~conftok.modeling.save_adapter` (a training
            run's ``final/``, ``best_*/`` or ``checkpoint-N/``).
        out_dir: the directory to create. It must not exist (or be empty) unless ``overwrite``.
        dtype: weights of the export: ``bf16``, ``fp16`` or ``fp32`` (merging is always fp32).
        base_model: the base model (name, path or model object); default: the one the adapter
            names in ``adapter_config.json``. A model object is consumed: cast to fp32, grown to the
            tokenizer and merged into in place (pass a name or path to leave a model in memory untouched).
        device: where to merge (``cuda`` is faster for a 7B model; the result is the same).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete). ``out_dir`` may
            neither hold nor be held by the adapter or a local base model directory.
        max_shard_size: safetensors shard size (``save_pretrained``).
        trust_remote_code: run code shipped with the base model's repo when loading it (off:
            transformers' own classes only).

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` without conftok or PEFT.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    _check_out_dir(out_dir, {"the adapter directory": adapter_dir,
                             "the base model directory": None if isinstance(base_model, torch.nn.Module) else base_model})
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose a new directory, "
                              "or pass overwrite=True (--overwrite) to replace it")

    if isinstance(base_model, torch.nn.Module):  # consumed: grown, merged into and cast; merged in fp32 all the same
        base_model.float()
    model, tokenizer, domains = load_adapter(adapter_dir, base_model=base_model, device=device, bf16=False,
                                             trust_remote_code=trust_remote_code)
    ids = token_ids(tokenizer, domains.tokens)
    merged = model.merge_and_unload()
    leftovers = [name for name, _ in merged.named_modules() if "lora_" in name or "token_adapter" in name]
    if leftovers:  # merge_and_unload replaces every PEFT wrapper by its base layer
        raise RuntimeError(f"merge_and_unload left PEFT modules behind: {leftovers[:5]}")
    rows = merged.get_input_embeddings().weight.shape[0]
    if max(ids.values()) >= rows:
        raise RuntimeError(f"confidence token ids {ids} fall outside the merged embedding matrix ({rows} rows)")
    merged.to(EXPORT_DTYPES[dtype])
    merged.config.use_cache = True  # training switched it off; generation wants the cache
    _set_generation_config(merged, tokenizer, list(ids.values()))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        pickled = sorted(p.name for p in tmp.rglob("*") if any(p.match(pattern) for pattern in PICKLE_PATTERNS))
        if pickled or not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"export must be safetensors only; wrote {sorted(p.name for p in tmp.iterdir())}")
        meta = {"domains": domains.to_list(), "token_ids": ids, "dtype": dtype,
                "adapter": str(adapter_dir.resolve() if adapter_dir.exists() else adapter_dir),  # or a Hub id
                "merged_with": "peft merge_and_unload"}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _make_readable(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:  # overwrite (or an empty directory): move it aside, and back if the rename fails
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %s (%s, %d confidence tokens) to %s", adapter_dir, dtype, len(ids), out_dir)
    return out_dir


def _check_out_dir(out_dir: Path, inputs: dict[str, "str | os.PathLike | None"]) -> None:
    """Refuse an ``out_dir`` that is, holds or lies inside one of the local ``inputs``: writing there
    (or replacing it with ``overwrite``) would delete what the export reads."""
    out = out_dir.resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():  # a Hub id, or nothing local
            continue
        source = Path(path).resolve()
        if out == source or source in out.parents:
            raise ValueError(f"out_dir {out_dir} is inside {what} {path}: choose another place")
        if out in source.parents:
            raise ValueError(f"out_dir {out_dir} holds {what} {path}: writing there would delete it; "
                             "choose another place")


def _set_generation_config(model, tokenizer, confidence_ids: list[int]) -> None:
    """Stop at the confidence tokens (plus the base's eos and the end-of-turn token); never start
    with one; pad with the tokenizer's pad token; decode greedily as conftok tagged, trained and
    validated (:data:`conftok.evaluate.GREEDY`): a base's sampling settings (Qwen2.5-Instruct's
    ``do_sample``, ``temperature`` 0.7, ``top_p``, ``top_k`` and ``repetition_penalty`` 1.05) would
    otherwise apply to every plain ``generate`` and to vLLM's default ``--generation-config auto``,
    changing the answers the token was trained on."""
    gen = model.generation_config
    for name, value in GREEDY.items():
        setattr(gen, name, value)
    gen.temperature = gen.top_p = gen.top_k = None  # sampling only; unset, as a fresh GenerationConfig has them
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    extra = [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer), *confidence_ids]
    gen.eos_token_id = list(dict.fromkeys(i for i in [*eos, *extra] if i is not None))
    gen.begin_suppress_tokens = list(confidence_ids)
    gen._from_model_config = False  # edited: generate() must not rebuild it from config.json
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id

