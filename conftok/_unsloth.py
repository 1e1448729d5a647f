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
        gradient_checkpointing = auto_gradient_checkpointing(model, batch_size=batch_size, seq_len=rows, lora_r=lora_r,
                                                             target_modules=target_modules)
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
    return model, tokenizer
