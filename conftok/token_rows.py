"""The new tokens' rows computed alone (training, unmerged generation), not the whole matrix rebuilt.

``conftok.build_model`` trains the confidence tokens' rows of the embedding (and of an untied
lm_head) through PEFT's ``trainable_token_indices``. At every forward PEFT's ``TrainableTokensLayer``
builds the whole matrix anew, ``W.index_copy(0, indices, rows)``, after copying the indices from a
Python list to the device, and runs the plain embedding or product on that copy. In training the copy
needs a gradient, so the backward makes another full matrix for it and then keeps four of its rows.
For Qwen2.5-7B (vocabulary 152,064, hidden 3,584, untied) that is a 1.1 GB copy and a 1.1 GB
gradient apiece for the embedding and the head at every step, and two CPU-GPU syncs (the index
copies), one of them after the whole forward is queued: the host waits there for the card.

:class:`TokenRowsOnly` is a context for the training forward, and for generation where the weights
are not merged (``conftok.evaluate.generate``; unmerged, every decode step would rebuild both
matrices), in which each such layer computes the same function from the frozen matrix and the new
rows: the embedding looks the ids up in ``W`` and puts a new token's row where its id occurs; the
head multiplies by ``W`` and then by the new rows, written over their columns. The index is copied
to the device once. The embedding's output is PEFT's bit for bit; the head's other columns are too,
and the new columns are the same dot products by a smaller product (equal up to the product's
rounding). The parameters, their names and what
``save_pretrained`` writes are PEFT's: only the forward changes, inside the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["trainable_token_layers", "TokenRowsOnly"]


def trainable_token_layers(model) -> list:
    """PEFT's trainable-token layers (the new tokens' rows of the embedding and an untied lm_head) over a
    plain ``nn.Embedding`` or ``nn.Linear`` with a floating-point weight, an adapter active, not merged."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:
        return []
    found = []
    for m in model.modules():
        if not isinstance(m, TrainableTokensLayer) or m.merged or m.disable_adapters:
            continue
        base = m.base_layer
        weight = getattr(base, "weight", None)
        if (isinstance(base, (nn.Embedding, nn.Linear)) and isinstance(weight, torch.Tensor)
                and weight.is_floating_point() and any(a in m.token_indices for a in m.active_adapters)):
            found.append(m)
    return found


class TokenRowsOnly:
    """A context: PEFT's trainable-token layers compute with the new rows alone (module docstring).

    A layer whose state is not the plain one (adapter disabled, as in ``model.disable_adapter()``;
    merged; several adapters active; an embedding with ``max_norm``; a head with a bias) runs PEFT's
    own forward, inside the block too. Entering sets an instance ``forward`` on each layer found;
    leaving puts back what was there (nothing, or an enclosing block's). Re-entrant, and nests with other
    instances. Every block sets the same forward object on a layer (kept on the layer): a compiled decode
    step (a static KV cache, ``conftok.evaluate``) guards on it, and a new object per ``generate`` call
    would throw the compiled step away and compile it again at every call.
    """

    def __init__(self, model):
        self.layers = [m for m in trainable_token_layers(model) if _supported(m)]
        self._depth = 0
        self._before: list = []  # each layer's instance forward before entering (another block's), or None

    def __enter__(self):
        if self._depth == 0:
            self._before = [layer.__dict__.get("forward") for layer in self.layers]
            for layer in self.layers:
                layer.forward = _rows_forward(layer)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for layer, before in zip(self.layers, self._before):
                if before is None:
                    layer.__dict__.pop("forward", None)
                else:  # inside another TokenRowsOnly block (generate called within one): leave its forward
                    layer.forward = before


def _supported(layer) -> bool:
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return base.max_norm is None and not base.sparse
    return base.bias is None


def _rows_forward(layer) -> "_RowsForward":
    """The layer's one :class:`_RowsForward`, made at its first block and kept on it."""
    forward = layer.__dict__.get("_conftok_rows_forward")
    if forward is None:
        forward = layer.__dict__["_conftok_rows_forward"] = _RowsForward(layer)
    return forward


class _RowsForward:
    """The layer's forward with the new rows alone; PEFT's own where the layer is not in the plain state."""

    def __init__(self, layer):
        self.layer = layer
        self.index: torch.Tensor | None = None  # the new tokens' ids, on the weight's device

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        adapters = layer.active_adapters
        if (args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1
                or adapters[0] not in layer.token_indices):
            return type(layer).forward(layer, x, *args, **kwargs)
        name = adapters[0]
        base = layer.base_layer
        weight = base.weight
        index = self.index
        if index is None or index.device != weight.device:
            index = self.index = torch.tensor(layer.token_indices[name], device=weight.device)  # once: a copy to it
        rows = layer.trainable_tokens_delta[name].to(weight)  # (n, d), as PEFT casts them
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
            match = x.unsqueeze(-1) == index  # (..., n): where each new token occurs
            new = F.embedding(match.int().argmax(-1), rows)  # that token's row (row 0 where none; masked below)
            out = torch.where(match.any(-1, keepdim=True), new, out)
            scale = getattr(layer, "_get_embed_scale", lambda: None)()  # Gemma-style scaled embeddings, as PEFT
            return out if scale is None else out * scale.to(out.dtype)
        # One 2-D product. F.linear on a 3-D input that is not contiguous (the last positions of the hidden
        # states) and needs a gradient, against a weight that needs none, runs as a batched product with the
        # weight copied for every row: 2.5 GB a step for a 7B head at batch 8, measured (bench/token_rows.py).
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight)  # (N, V); its backward needs x and W only, so it may be written over
        out.index_copy_(-1, index, F.linear(flat, rows).to(out.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])
