"""The unsloth backend (FastLanguageModel). Imported only when ``backend='unsloth'`` is chosen.

Unsloth patches transformers and PEFT when imported, so it must be imported before them in the
process that uses it: ``conftok`` itself imports neither unsloth nor (at module level) PEFT. Its
``from_pretrained`` defaults to 4-bit, so every load passes ``load_in_4bit`` explicitly; tokens
are added before ``get_peft_model`` so the new rows exist when PEFT wraps the embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from conftok.domains import DomainSet
from conftok.lora_targets import present_target_modules, trainable_token_indices
from conftok.memory import auto_gradient_checkpointing
from conftok.tokens import add_confidence_tokens, init_token_rows


def build_model(model_name: str, *, domains: DomainSet, quantization: str, lora_r: int, lora_alpha: int,
                lora_dropout: float, target_modules: Sequence[str], gradient_checkpointing: bool | str,
                dtype: torch.dtype, token_init: str, max_seq_length: int, seed: int, batch_size: int = 8,
                seq_len: int | Callable[[Any], int] | None = None, trust_remote_code: bool = False):
    import unsloth  # noqa: F401  (patches transformers/peft; must come first)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=quantization == "4bit",
        load_in_8bit=quantization == "8bit",
        trust_remote_code=trust_remote_code,
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = list(add_confidence_tokens(tokenizer, None, domains.tokens).values())
    init_token_rows(model, tokenizer, ids, token_init)  # also when the tokenizer held the tokens already
    if gradient_checkpointing == "auto":  # unsloth sets it when it wraps: decided here, for the rows' longest
        rows = seq_len(tokenizer) if callable(seq_len) else seq_len or max_seq_length
        # On CUDA padded batches train under SDPA's math kernel (conftok.loss.padded_attention_guard), which unsloth
        # runs as the hf backend does for a masked forward: its (batch, heads, T, T) scores count.
        on_cuda = next(model.parameters()).device.type == "cuda"
        gradient_checkpointing = auto_gradient_checkpointing(model, batch_size=batch_size, seq_len=rows, lora_r=lora_r,
                                                             target_modules=target_modules, math_attention=on_cuda)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=present_target_modules(model, target_modules),
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        random_state=seed,
        trainable_token_indices=trainable_token_indices(model, ids),
    )
    _undo_wrapping_side_effects(model, tokenizer, model_name)
    return model, tokenizer


def _undo_wrapping_side_effects(model, tokenizer, model_name: str) -> None:
    """What unsloth's ``get_peft_model`` does on its GPU path (unsloth 2026.10) that conftok cannot keep:

    - it leaves only LoRA matrices trainable (unsloth_zoo's ``prepare_model_for_training`` freezes every other
      parameter), PEFT's token rows included: the confidence tokens' rows would never move, and C and U, which
      start equal, would give p_confident 0.5 at every answer. They are trainable again, in float32 as PEFT makes
      them on the hf backend;
    - it sets the tokenizer it was loaded with to pad on the right (conftok pads on the left, and every
      checkpoint saves the tokenizer);
    - the adapter names the repo unsloth loaded (its own copy: ``unsloth/Qwen2.5-7B-Instruct``, or a pre-quantized
      ``...-bnb-4bit`` one, which a full-precision export cannot cast) as its base: it names ``model_name``.
    """
    for name, param in model.named_parameters():
        if "trainable_tokens_delta" in name:
            if param.dtype != torch.float32:
                param.data = param.data.float()
            param.requires_grad_(True)
    tokenizer.padding_side = "left"
    for config in model.peft_config.values():
        config.base_model_name_or_path = model_name
