"""Where LoRA and the trainable token rows attach in a model: shared by both backends.

``conftok.modeling`` (the ``hf`` backend) and ``conftok._unsloth`` (the ``unsloth`` backend) wrap
the same modules the same way; both import these from here, below them, so neither imports the
other for them. Plain functions of a ``transformers`` model; no PEFT import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["embedding_module_names", "present_target_modules", "trainable_token_indices"]

logger = logging.getLogger(__name__)


def embedding_module_names(model) -> tuple[str, str | None, bool]:
    """Short names of the input and output embedding modules, and whether their weights are tied:
    ``("embed_tokens", "lm_head", False)`` for an untied Llama or Qwen2."""
    embed, output = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    tied = output is None or output.weight is embed.weight
    return names[id(embed)], (None if output is None else names[id(output)]), tied


def trainable_token_indices(model, ids: list[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices`` for the new rows: the input embeddings only when lm_head
    is tied to them (PEFT ties the output side itself), both otherwise; a list for the input
    embeddings alone would leave an untied lm_head's rows untrained (PEFT 0.21.2: the list form goes to the
    input embeddings only)."""
    embed_name, output_name, tied = embedding_module_names(model)
    if tied:
        return {embed_name: ids}
    return {embed_name: ids, output_name: ids}


def present_target_modules(model, target_modules: Sequence[str]) -> list[str]:
    """The requested LoRA target modules that this model has (a warning names the others);
    raises when it has none of them, listing the projections it does have."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [m for m in target_modules if m in leaf_names]
    if not present:
        raise ValueError(f"none of target_modules {list(target_modules)} is in the model; "
                         f"its linear layers include {sorted(n for n in leaf_names if 'proj' in n)[:12]}")
    missing = sorted(set(target_modules) - set(present))
    if missing:
        logger.warning("target modules %s are not in this model; using %s", missing, present)
    return present
