"""Generation with the LoRA update folded into the weights, and the weights given back exactly.

An unmerged LoRA projection launches a cast, two small products, a scaling and an add beside the
frozen product, for each of the seven projections of every layer. Greedy decoding is bound by those
launches, not by arithmetic: on an H200 a decode step of the 7B-shaped model at batch 64 took 163 ms
with the adapter against 47 ms without it, and validation ran 23.9 samples/s unmerged against 33.8
with the adapter merged (bench/README.md, "First H200 run").

PEFT's own ``merge_adapter()`` / ``unmerge_adapter()`` add the update into the weights in place and
subtract it again: in bf16, ``W + d - d`` is not ``W``, so each validation during training would move
the frozen base model a rounding step. :func:`merged_lora` instead puts a new tensor ``W + d``
(summed in fp32, rounded once) in each projection's ``nn.Linear`` and puts that module in the LoRA
layer's place, so a projection is one product with no PEFT wrapper around it; on exit the LoRA layer
and the original ``W`` object go back, bit for bit. The cost is a second copy of the projection
weights (13 GB for a 7B model in bf16) while it lasts; where that does not fit in free memory, or
where the layers are not plain PEFT LoRA (quantized weights, DoRA and other variants, a LoRA bias),
it does nothing and says why. unsloth patches the attention and MLP modules around PEFT's layers, not the
layers, and its fused kernels take a plain ``nn.Linear``: its models merge too.

The new tokens' rows (PEFT ``trainable_token_indices``) are folded in the same way. Unmerged, PEFT's
``TrainableTokensLayer`` builds the whole embedding matrix anew at every forward (``W.index_copy`` of
the new rows, after copying their indices to the device): for a 7B model with an untied head that is
two 1.1 GB copies per decode step, the embedding's and lm_head's. Within the block each wrapped
embedding and head is its own module again, holding one such copy made once; the rows are copied, not
added, so the outputs are bit for bit PEFT's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from conftok.memory import free_memory
from conftok.token_rows import trainable_token_layers

__all__ = ["merged_lora", "MERGE_MEMORY_SHARE"]

logger = logging.getLogger(__name__)

# The merged copies may take at most this share of the memory free on the weights' device.
MERGE_MEMORY_SHARE = 0.8


def _lora_layers(model) -> list:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear)]


def _why_not(layers) -> str | None:
    """None if every LoRA layer can be merged by swapping its weight; else the reason."""
    if not layers:
        return "no PEFT LoRA layers"
    for layer in layers:
        forward = getattr(type(layer).forward, "__module__", "") or ""
        if not forward.startswith("peft."):  # unsloth patches PEFT's forward with its own kernels
            return f"the LoRA layers' forward comes from {forward or 'elsewhere'}, not PEFT"
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or type(base) is not torch.nn.Linear:
            return f"{type(base).__name__} base layers (quantized or custom) are used unmerged"
        if layer.merged:
            return "the adapter is merged already"
        if layer.disable_adapters:  # inside model.disable_adapter(): the base model is what is asked for
            return "the adapter is disabled"
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if any(a in getattr(layer, "lora_variant", {}) for a in active):
            return "a LoRA variant (DoRA, ...) merges differently"
        if any(getattr(layer, "lora_bias", {}).get(a) for a in active):
            return "a LoRA bias"
    return None


@contextmanager
def merged_lora(model, enabled: bool | str = "auto") -> Iterator[bool]:
    """Within the block, each LoRA projection computes ``x @ (W + scale * B @ A)^T`` in one product.

    Yields whether the weights were merged. ``enabled``: ``"auto"`` merges where the layers allow it
    and the copies fit in :data:`MERGE_MEMORY_SHARE` of free memory, logging why not otherwise;
    ``True`` merges where the layers allow it, whatever the memory; ``False`` never merges. For
    inference only: gradients do not reach the adapter through the merged weights.
    """
    if enabled not in (True, False, "auto"):
        raise ValueError(f"merge must be True, False or 'auto', got {enabled!r}")
    layers = _lora_layers(model) if enabled else []
    reason = "merging is off" if not enabled else _why_not(layers)
    tokens = trainable_token_layers(model) if reason is None else []
    if reason is None and enabled == "auto":
        device = layers[0].get_base_layer().weight.device
        need = sum(layer.get_base_layer().weight.nbytes for layer in layers) + \
            sum(t.base_layer.weight.nbytes for t in tokens)
        free = free_memory(device)
        if free is None or need > MERGE_MEMORY_SHARE * free:
            reason = (f"the merged weights need {need / 2**30:.1f} GiB, "
                      f"{'unknown' if free is None else f'{free / 2**30:.1f} GiB'} free on {device}")
    if reason is not None:
        if enabled:
            logger.info("LoRA left unmerged for generation: %s", reason)
        yield False
        return
    where = {id(module): (parent, name) for parent in model.modules() for name, module in parent.named_children()}
    swapped = []
    device_type = layers[0].get_base_layer().weight.device.type
    try:
        # B @ A in fp32 even when called under autocast (validation in train runs under bf16 autocast).
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            for layer in layers:
                parent, name = where[id(layer)]
                base = layer.get_base_layer()
                merged = base.weight.to(torch.float32, copy=True)  # never the original, fp32 or not
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged += layer.get_delta_weight(adapter).float()
                original = base.weight
                base.weight = torch.nn.Parameter(merged.to(original.dtype), requires_grad=False)
                swapped.append((parent, name, layer, base, original))
                parent._modules[name] = base  # the plain Linear in the LoRA layer's place: no wrapper call at all
            # The model's embed_tokens / lm_head is PEFT's wrapper around each token layer.
            wrappers = {id(m.token_adapter): m for m in model.modules() if hasattr(m, "token_adapter")}
            for token_layer in tokens:
                wrapper = wrappers.get(id(token_layer), token_layer)
                parent, name = where[id(wrapper)]
                base = token_layer.base_layer
                active = [a for a in token_layer.active_adapters if a in token_layer.token_indices]
                merged = token_layer.get_merged_weights(active)  # W.index_copy(new rows): PEFT's own forward weight
                original = base.weight
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
                swapped.append((parent, name, wrapper, base, original))
                parent._modules[name] = base  # the plain embedding / head: no copy of the matrix per forward
        yield True
    finally:
        for parent, name, layer, base, original in reversed(swapped):
            parent._modules[name] = layer
            base.weight = original
