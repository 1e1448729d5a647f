"""Does a training step fit without gradient checkpointing? The estimate behind ``gradient_checkpointing="auto"``.

Gradient checkpointing keeps only each decoder layer's input for the backward pass and runs the
layer again there: far less memory, about a third more compute (a 7B-shaped model on an H100:
17.5 samples/s with it, 26.8 without; SmolLM2 on 2 CPU cores: 1.5x slower a step). ``auto`` turns
it off when the step fits with a margin and on otherwise, from

    weights + 16 bytes per trainable parameter (fp32 weight, gradient, two AdamW moments)
      + activations + kept logits  <=  margin x memory free for the run

Activations without checkpointing are ``bytes_per_hidden x hidden x layers x batch x seq_len`` at
16-bit (twice at fp32), with LoRA on all seven projections. On CUDA ``GPU_ACTIVATION_BYTES_PER_HIDDEN``
(100): ``bench/gpu.py``'s Qwen2.5-7B shape (hidden 3584, 28 layers, bf16, 15.2 GB of weights), batch 8,
its longest measured batch 351 tokens, checkpointing off, peaked at 38.4 GiB on an H100 (fused SDPA
kernels) and 42.4 GiB on an H200 (the math kernel for padded batches: + the scores below); less the
weights, the optimizer and the 4.4 GB of token-row matrices PEFT rebuilt then (``conftok.token_rows``
no longer does), about 74 bytes x hidden per token and layer, rounded up to 100 for a margin (the
estimate is then 17-19% above those peaks; a step that does not fit is an out-of-memory error, a
needless checkpointing 1.5x slower steps). Elsewhere ``ACTIVATION_BYTES_PER_HIDDEN`` (140):
SmolLM2-135M (hidden 576, 30 layers, bf16) at batch 8 x 768 tokens on the CPU peaked at 15.0 GiB
resident without and 3.4 GiB with (about 139; resident memory holds more than the tensors). Until
2026-11-28 the CPU's 140 served CUDA too, fitted to a peak taken for batch 8 x 320 tokens (the mean
padded length) where the longest batch set it: it turned checkpointing on for the real rows' longest
(814 tokens) on a 141 GB H200, where the step fits. The textbook figure
for a plain decoder layer is 34 x hidden in 16-bit (Korthikanti et al., 2022); LoRA's fp32 copies
of each projection's input and SwiGLU's wide MLP account for the rest. With checkpointing on, one
hidden state per token and layer stays, plus one layer's full activations while it is recomputed.
Eager attention also keeps (batch, heads, seq, seq) scores; SDPA and flash attention do not.

The estimate takes the longest batch (``batch x seq_len``); with length-grouped batches the
longest rows share one batch, so ``seq_len`` is the longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ACTIVATION_BYTES_PER_HIDDEN", "GPU_ACTIVATION_BYTES_PER_HIDDEN", "DEFAULT_MARGIN", "GRADIENT_CHECKPOINTING_CHOICES",
           "decide_gradient_checkpointing", "estimate_training_memory", "free_memory", "auto_gradient_checkpointing"]

ACTIVATION_BYTES_PER_HIDDEN = 140  # 16-bit activations, bytes per hidden unit, token and layer: the CPU's (139)
GPU_ACTIVATION_BYTES_PER_HIDDEN = 100  # the same on CUDA: about 74 measured on an H100 and an H200, with a margin
DEFAULT_MARGIN = 0.8  # use at most 80% of free memory: allocator fragmentation, kernels' workspaces
TRAINABLE_BYTES = 16  # fp32 LoRA weight + gradient + AdamW exp_avg + exp_avg_sq
LOGIT_COPIES = 3  # fp32 logits, their log-softmax, the base model's log-softmax (KL term)
GRADIENT_CHECKPOINTING_CHOICES = (True, False, "auto")
GB = 1e9


def estimate_training_memory(n_params: int, hidden: int, layers: int, batch: int, seq_len: int, *,
                             bytes_per_param: float = 2.0, trainable_params: int = 0, activation_bytes: int = 2,
                             vocab_size: int = 0, kept_positions: int = 17, eager_attention_heads: int = 0,
                             bytes_per_hidden: float = ACTIVATION_BYTES_PER_HIDDEN) -> dict[str, float]:
    """Peak bytes of one training step, by part, with checkpointing off and on.

    Returns ``{"weights", "trainable", "logits", "activations_off", "activations_on", "total_off",
    "total_on"}`` in bytes. ``bytes_per_hidden``: the activations' constant (module docstring). Example
    (the 7B shape above, on CUDA): ``estimate_training_memory(7.6e9, 3584, 28, 8, 351, trainable_params=40e6,
    bytes_per_hidden=100)`` gives weights 15.2e9, trainable 0.64e9, activations_off 100 x 3584 x 28 x 2808
    = 28.2e9, so total_off 44.0e9 (38.4 GiB = 41.2 GB measured on the H100 with 4.4 GB of PEFT's
    token-row matrices that are no longer made, so about 36.8 GB now).
    """
    tokens = batch * seq_len
    scale = activation_bytes / 2
    per_layer = bytes_per_hidden * scale * hidden * tokens
    if eager_attention_heads:
        # fp32 softmax output + its 16-bit copy kept for the matmul with V, per score.
        per_layer += (4 + activation_bytes) * batch * eager_attention_heads * seq_len ** 2
    parts = {
        "weights": n_params * bytes_per_param,
        "trainable": trainable_params * TRAINABLE_BYTES,
        "logits": LOGIT_COPIES * 4 * batch * kept_positions * vocab_size,
        "activations_off": layers * per_layer,
        # Each layer's input stays; the layer being recomputed holds its full activations.
        "activations_on": layers * activation_bytes * hidden * tokens + per_layer,
    }
    fixed = parts["weights"] + parts["trainable"] + parts["logits"]
    parts["total_off"] = fixed + parts["activations_off"]
    parts["total_on"] = fixed + parts["activations_on"]
    return parts


def decide_gradient_checkpointing(n_params: int, hidden: int, layers: int, batch: int, seq_len: int,
                                  free_bytes: float | None, *, margin: float = DEFAULT_MARGIN,
                                  where: str = "the device", **estimate_kwargs) -> tuple[bool, str]:
    """``(use_checkpointing, reason)``: off when the step fits in ``margin x free_bytes`` without it.

    ``free_bytes`` is the memory the run may use, counting what its weights already occupy (free
    memory measured before loading them, or free now plus their bytes); None when unknown, which
    turns checkpointing on. ``estimate_kwargs`` go to :func:`estimate_training_memory`. The reason
    is one line with the numbers, for the log.

    Example, on CUDA (``bytes_per_hidden=100``, the math kernel's scores for 28 heads): the 7B shape at batch 8
    x 351 tokens with 79 GB free needs 48.9 GB <= 0.8 x 79 = 63.2 GB, so ``(False, "...")``; at batch 8 x 814
    tokens it needs 106 GB: on with 79 GB free, off with 139 GB (an H200).
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    parts = estimate_training_memory(n_params, hidden, layers, batch, seq_len, **estimate_kwargs)
    shape = f"batch {batch} x {seq_len} tokens, {layers} layers, hidden {hidden}"
    if free_bytes is None:
        return True, f"on: free memory on {where} unknown ({shape})"
    budget = margin * free_bytes
    need = (f"weights {parts['weights'] / GB:.1f} GB + trainable {parts['trainable'] / GB:.1f} GB + logits "
            f"{parts['logits'] / GB:.1f} GB + activations {parts['activations_off'] / GB:.1f} GB ({shape}) = "
            f"{parts['total_off'] / GB:.1f} GB")
    if parts["total_off"] <= budget:
        return False, f"off: {need} fits in {margin:.0%} of {free_bytes / GB:.1f} GB free on {where}"
    short = "" if parts["total_on"] <= budget else " (does not fit either: lower batch_size or max_seq_length)"
    return True, (f"on: {need} exceeds {margin:.0%} of {free_bytes / GB:.1f} GB free on {where}; "
                  f"with checkpointing {parts['total_on'] / GB:.1f} GB{short}")


def free_memory(device: torch.device) -> float | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory plus what torch's caching
    allocator holds unused; on a CPU the available RAM (psutil, else /proc/meminfo); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _lora_params(model, lora_r: int, target_modules: Sequence[str]) -> int:
    """LoRA parameters that wrapping ``model`` would add: r x (in + out) per targeted linear layer."""
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in target_modules and hasattr(module, "in_features"):
            total += lora_r * (module.in_features + module.out_features)
    return total


def auto_gradient_checkpointing(model, *, batch_size: int, seq_len: int, lora_r: int | None = None,
                                target_modules: Sequence[str] = (), margin: float = DEFAULT_MARGIN,
                                math_attention: bool = False) -> bool:
    """Decide ``gradient_checkpointing="auto"`` for ``model`` (already on its device) and print why.

    ``model`` is a PEFT model (its trainable parameters are counted) or a base model about to be
    wrapped with LoRA of rank ``lora_r`` on ``target_modules`` (they are estimated).
    ``math_attention``: attention keeps its (batch, heads, seq, seq) scores as eager attention does
    (SDPA's math kernel: compiled layers, ``conftok.compiling``, and padded batches on CUDA,
    ``conftok.loss.padded_attention_guard``).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    device = next(p.device for p in model.parameters())
    peft = hasattr(model, "peft_config")
    frozen_params = frozen_bytes = trainable = resident = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        resident += size if p.device == device else 0
        if peft and p.requires_grad:
            trainable += p.numel()
        else:
            frozen_params += p.numel()
            frozen_bytes += size
    if not peft and lora_r:
        trainable = _lora_params(model, lora_r, target_modules)
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    where = str(device)
    if not hidden or not layers:
        use, reason = True, "on: the model config has no hidden_size/num_hidden_layers to estimate activations from"
    else:
        free = free_memory(device)
        dtype = getattr(model, "dtype", torch.float32)
        eager = math_attention or getattr(config, "_attn_implementation", None) == "eager"
        use, reason = decide_gradient_checkpointing(
            frozen_params, hidden, layers, batch_size, seq_len, None if free is None else free + resident,
            margin=margin, where=where, bytes_per_param=frozen_bytes / max(frozen_params, 1),
            trainable_params=trainable, activation_bytes=2 if dtype in (torch.bfloat16, torch.float16) else 4,
            vocab_size=getattr(config, "vocab_size", 0) or 0,
            eager_attention_heads=getattr(config, "num_attention_heads", 0) if eager else 0,
            bytes_per_hidden=GPU_ACTIVATION_BYTES_PER_HIDDEN if device.type == "cuda" else ACTIVATION_BYTES_PER_HIDDEN)
    print(f"Gradient checkpointing (auto) {reason}", flush=True)
    return use
