"""The stored KL guard's reference, kept on disk between runs on the same rows and base model.

The stored KL guard (``stored_kl_weight``) needs the base model's top-k log-probabilities at every
answer position, one forward over the training rows without gradients before the first step
(:func:`conftok.loss.attach_base_topk`). The trials of a search train on the same rows from the
same base model, and a run resumed after its worker died reads the same rows again: each would
repeat that pass. :func:`attach_base_topk_cached` does it once and keeps the result in
``cache_dir`` as safetensors (ids int32, log-probabilities fp16, each row's answer length) with
its key and ``k`` in the metadata; nothing is unpickled.

The key is a SHA-256 over what the reference depends on: every row's token ids (prompt and answer,
so the data, the tokenizer, the chat template and ``max_seq_length`` all count) and answer length,
the confidence tokens' ids (left out of the reference), and the model's description (name,
quantization, dtype, new-token initialisation, ``k``). Version 2: the reference leaves the confidence
tokens out (version 1's files, which held them, are never read). Version 3: ``conftok.train`` computes
it under the training's bf16 autocast (``autocast_dtype``; version 2's files of a float32 model were read
without it). The
weights behind a model name can change while the name stays; so before a cached reference is
used, one batch of it is computed again and compared (top-1 ids, log-probabilities): a mismatch
discards the file and computes the whole reference anew, saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conftok.loss import rows_base_topk

__all__ = ["attach_base_topk_cached", "reference_key", "CACHE_VERSION"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
# A fresh batch against its cached copy: the same model gives the same top-1 ids but where two
# candidates tie within bf16 rounding, and log-probabilities within bf16's resolution.
MIN_TOP1_AGREEMENT = 0.95
MAX_MEAN_LOGP_DIFF = 0.05


def reference_key(dataset, model_description: Mapping[str, Any], k: int) -> str:
    """SHA-256 (hex) over the rows' token ids and answer lengths, the confidence tokens' ids, the model's
    description and ``k``."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "k": k, "model": dict(model_description),
                         "confidence_ids": list(dataset.confidence_ids)}, sort_keys=True, default=str).encode())
    for context, _token, answer_length in dataset.examples:  # the token's label does not change the reference
        h.update(np.asarray([len(context), answer_length], dtype=np.int64).tobytes())
        h.update(np.asarray(context, dtype=np.int64).tobytes())
    return h.hexdigest()


def _path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"base_topk-{key[:32]}.safetensors"


def _save(path: Path, key: str, k: int, topk: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": torch.cat([ids for ids, _ in topk]).contiguous(),
               "logp": torch.cat([logp for _, logp in topk]).contiguous(),
               "lengths": torch.tensor([len(ids) for ids, _ in topk], dtype=torch.int64)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": key, "k": str(k), "version": str(CACHE_VERSION)})
    os.replace(tmp, path)  # trials writing the same reference at once: the last rename wins, all equal


def _load(path: Path, key: str, k: int, answer_lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cached reference, or ValueError saying why it cannot be used."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("k") != str(k):
            raise ValueError("written for other rows, model or k")
        ids, logp, lengths = f.get_tensor("ids"), f.get_tensor("logp"), f.get_tensor("lengths")
    if lengths.tolist() != answer_lengths or ids.shape != (sum(answer_lengths), k) or logp.shape != ids.shape:
        raise ValueError("its shapes do not match the rows")
    if ids.dtype != torch.int32 or logp.dtype != torch.float16:
        raise ValueError(f"unexpected dtypes {ids.dtype}, {logp.dtype}")
    return list(zip(ids.split(answer_lengths), logp.split(answer_lengths)))


def _agrees(cached: list[tuple[torch.Tensor, torch.Tensor]], fresh: list[tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """None when a fresh batch matches its cached copy, else what differs."""
    c_ids = torch.cat([ids[:, 0] for ids, _ in cached])
    f_ids = torch.cat([ids[:, 0] for ids, _ in fresh])
    agreement = (c_ids == f_ids).float().mean().item()
    diff = (torch.cat([lp[:, 0] for _, lp in cached]).float() - torch.cat([lp[:, 0] for _, lp in fresh]).float())
    mean_diff = diff.abs().mean().item()
    if agreement < MIN_TOP1_AGREEMENT or not mean_diff <= MAX_MEAN_LOGP_DIFF:
        return (f"top-1 ids agree on {agreement:.0%} of a fresh batch's positions (at least "
                f"{MIN_TOP1_AGREEMENT:.0%} expected), top-1 log-probabilities differ by {mean_diff:.3g} on average "
                f"(at most {MAX_MEAN_LOGP_DIFF} expected)")
    return None


@torch.no_grad()
def attach_base_topk_cached(dataset, model, k: int, *, cache_dir: str | os.PathLike | None,
                            model_description: Mapping[str, Any], batch_size: int = 16,
                            progress: bool = True, autocast_dtype: torch.dtype | None = None) -> str:
    """Set ``dataset.base_topk`` (as :func:`conftok.loss.attach_base_topk`) from ``cache_dir`` when
    it holds this reference and a fresh batch agrees with it; else compute it and write it there.

    ``cache_dir=None`` turns the cache off. Returns what happened, for the log: ``"computed"``,
    ``"reused"`` or ``"computed (cached copy unusable: WHY)"``.
    """
    dataset.base_topk = None
    lengths = [answer_length for _, _, answer_length in dataset.examples]
    key = reference_key(dataset, model_description, k)
    path = _path(Path(cache_dir), key) if cache_dir is not None else None
    why = None
    if path is not None and path.exists():
        try:
            cached = _load(path, key, k, lengths)
            # The shortest rows, a batch of them, as the full pass would have batched them.
            probe = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i][0]))[:batch_size]
            why = _agrees([cached[i] for i in probe], rows_base_topk(dataset, model, k, probe, batch_size=batch_size,
                                                                     autocast_dtype=autocast_dtype))
            if why is None:
                dataset.base_topk = cached
                print(f"Stored KL reference: reused {path}", flush=True)
                return "reused"
        except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, whatever the damage
            why = f"{type(e).__name__}: {e}"
        logger.warning("stored KL reference %s cannot be used (%s): computing it again", path, why)
        path.unlink(missing_ok=True)
    dataset.base_topk = rows_base_topk(dataset, model, k, range(len(dataset)), batch_size=batch_size, progress=progress,
                                       autocast_dtype=autocast_dtype)
    kept = ""
    if path is not None:
        try:
            _save(path, key, k, dataset.base_topk)
            kept = f", kept in {path}"
        except OSError as e:  # a full or read-only disk costs the next run this pass, not this run
            logger.warning("could not keep the stored KL reference in %s: %s", path, e)
    print(f"Stored KL reference: computed for {len(dataset)} rows{kept}", flush=True)
    return "computed" if why is None else f"computed (cached copy unusable: {why})"
