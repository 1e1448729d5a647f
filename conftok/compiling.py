"""Regional compilation: ``torch.compile`` each decoder layer of the model, not the whole model.

A 7B step in eager mode launches ~7,700 kernels (bench/README.md, the H200 profile): the norms,
rotary embedding, activation, residual adds, casts and each projection's LoRA path are separate
small kernels, and the host that launches them, not the card, sets the step's pace. Compiled, each
layer's elementwise work fuses into a few Triton kernels around the matrix products.

Layers share one compiled graph (the same code over different weights), so the compile is paid about
once, not once per layer: on the first step and again on the first step of another length (after
which the sequence length is a dynamic dimension). Validation generates with the layers uncompiled
(:func:`uncompiled_layers`): generation's shapes (a prefill, then one token a step) would compile
graphs of their own, and it swaps the projections for merged copies (``conftok.merged``).

A compiled graph takes SDPA's kernel at trace time, whatever ``sdpa_kernel`` context is in force at a
later call. Padded batches need SDPA's math kernel (``conftok.loss.padded_attention_guard``), so a
compiled model's training forward always runs under it (``padded_attention_guard(..., always=True)``):
one kernel choice for every batch. At the lengths conftok trains on (a few hundred tokens) attention
is ~1% of a step's arithmetic; the math kernel's O(rows x heads x T^2) scores are its memory cost.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["RECOMPILE_LIMIT", "decoder_layers", "compile_layers", "layers_compiled", "uncompiled_layers",
           "compiler_available"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its longest ``nn.ModuleList`` whose entries share one class
    (``model.model.layers`` for Llama/Qwen/Mistral, also under a PEFT wrapper)."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder layers (an nn.ModuleList of one layer class)")
    return best


# Graphs torch.compile may build for one function before it runs it eagerly instead (torch's default: 8).
# The layers' one forward gets a graph per variant: a padded batch or not (attention mask or none), the
# first layer's input with or without gradients, the first length static and the next dynamic, ... A
# layer past the limit would silently run eager.
RECOMPILE_LIMIT = 64


def compile_layers(model: nn.Module, *, dynamic: bool | None = None) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``); returns how many.

    Already compiled layers are left as they are. ``dynamic=None`` (torch's default) compiles the
    first shape static and marks the dimensions that change as dynamic at the second. Raises
    torch._dynamo's recompile limit to :data:`RECOMPILE_LIMIT` (process-wide) where it is lower."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    layers = decoder_layers(model)
    for layer in layers:
        if layer._compiled_call_impl is None:
            layer.compile(dynamic=dynamic)
    return len(layers)


def layers_compiled(model: nn.Module) -> bool:
    """Whether the model's decoder layers run compiled (:func:`compile_layers`)."""
    try:
        return any(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    except ValueError:
        return False


@contextmanager
def uncompiled_layers(model: nn.Module):
    """Run the decoder layers eagerly inside the block; their compiled forms come back on exit, also
    on an error. A no-op for a model without compiled layers."""
    try:
        layers = list(decoder_layers(model))
    except ValueError:
        layers = []
    saved = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield model
    finally:
        for layer, compiled in zip(layers, saved):
            layer._compiled_call_impl = compiled


def compiler_available(device: "str | torch.device | None" = None) -> tuple[bool, str]:
    """(whether ``torch.compile``'s default backend can build code for ``device`` here, the reason if not).

    Inductor needs Triton for CUDA tensors and a C++ compiler for CPU ones. ``device`` None: CUDA where there
    is one (where ``train`` puts a model), else the CPU."""
    import shutil

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "torch.compile on CUDA needs triton (pip install triton)"
        return True, ""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang")):
        return False, "torch.compile on the CPU needs a C++ compiler (gcc or clang) on PATH"
    return True, ""
