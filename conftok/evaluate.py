"""Validation: generate answer + token for raw rows, check the answer, score the token.

For each domain: greedy generation in batches (left padding) that stops at a confidence token or
end of turn; the answer is parsed and checked against the gold answer; the expected token is C if
the answer is right, U otherwise; token accuracy = emitted token equals expected (no token counts
as wrong). p_confident = p(C) / (p(C) + p(U)) is read where the token is: right after the answer,
by one forward pass over prompt + answer, whether or not the model emitted a token.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from conftok import metrics as M
from conftok.calibration import auroc, brier_score, calibration_error, reliability_bins
from conftok.data import DataError
from conftok.domains import Domain, resolve_domains
from conftok.inputs import line_problems, problems_message, read_json_lines, read_text, require_file
from conftok.loss import confidence_logits, p_confident
from conftok.merged import merged_lora
from conftok.prompts import encode_prompt
from conftok.token_rows import TokenRowsOnly
from conftok.tokens import end_of_turn_token_id

__all__ = ["Generation", "GREEDY", "load_rows", "generate", "evaluate", "plan_batches", "resolve_batching",
           "summarize_domain", "print_validation_block", "BATCHINGS"]

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    """One generated response: the answer text, its token ids, the confidence token it stopped at
    (if any), and whether it stopped by itself (a stop token) rather than at max_new_tokens."""

    text: str
    answer_ids: list[int]
    stop_token: str | None
    finished: bool = True
    p_confident: float | None = None  # read from the step's logits where generation stopped
    p_answer: float | None = None  # the model's probability of its answer's first token


def load_rows(source: str | Path, split: str = "validation", limit: int | None = None,
              domain: Domain | None = None) -> list[dict[str, Any]]:
    """Raw rows from a local ``.jsonl``/``.json``/``.parquet`` file, or a Hub data set name
    through ``datasets.load_dataset(source, split=split)``.

    With ``domain``, every row is checked against that domain's task first
    (:meth:`Domain.row_problems`). Problems raise :class:`~conftok.data.DataError` listing each as
    ``FILE:LINE: field 'answer': problem`` (``SOURCE: row N: ...`` where rows have no line: JSON
    arrays, parquet, the Hub). Local files are UTF-8 without BOM; blank lines are skipped.
    """
    path = Path(source)
    numbered: list[tuple[int, Any]]  # (line, or row number from 1, raw row)
    problems: list[tuple[int, str]] = []
    has_lines = False
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        what = "validation rows file"
        if path.suffix == ".parquet":
            import datasets

            numbered = list(enumerate(datasets.Dataset.from_parquet(str(require_file(path, what))), start=1))
        elif path.suffix == ".json" and read_text(path, what).lstrip().startswith("["):
            try:
                numbered = list(enumerate(json.loads(read_text(path, what)), start=1))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        else:
            numbered, problems = read_json_lines(path, what)
            has_lines = True
    else:
        import datasets

        numbered = list(enumerate(datasets.load_dataset(str(source), split=split), start=1))
    if domain is not None:
        problems += [(n, p) for n, row in numbered for p in domain.row_problems(row)]
    if problems:
        listed = (line_problems(source, problems) if has_lines
                  else [f"{source}: row {n}: {p}" for n, p in sorted(problems, key=lambda p: p[0])])
        raise DataError(problems_message(source, listed, "bad row(s)"))
    if not numbered:
        raise DataError(f"{source}: no rows (empty or blank); expected one JSON object per line"
                        + (f", each a {domain.task} row of domain {domain.name!r}" if domain else ""))
    rows = [row for _, row in numbered]
    return rows[:limit] if limit else rows


# Greedy decoding whatever a model's generation_config holds: transformers fills every setting a call leaves
# unset from it (Qwen2.5-Instruct's has repetition_penalty=1.05, which penalises the prompt's own words).
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)


class _ExactPair:
    """A context for one ``generate`` call: the head's logits come out in float32, the pair (C, U) as float32
    products, so p_confident is not read from rounded logits.

    Under bf16 the head's logits are rounded to bf16 (8 bits: at a logit of 20, steps of 0.125), so
    p(C) / (p(C) + p(U)) read from them takes few values (54 distinct among 320 rows on the positive control,
    25 of them exactly 0.5). Inside the block the output embedding's forward (an instance ``forward``, as
    :class:`conftok.token_rows.TokenRowsOnly` sets them) returns its own logits in float32 with the pair's two
    columns written over by the hidden state times the head's two rows in float32 (the rows: the head's gradient
    at one probe input, taken at entering, in the dtype and autocast state generation runs with, so any linear
    head serves: PEFT's token rows, a merged adapter). What the model does after its head (Gemma 2's
    soft-capping) is then done to the exact values; such a model then computes that step in float32 for every
    column, so its greedy choice between two other tokens that bf16 rounds to one value may differ from a plain
    ``model.generate``. The other columns keep their values, and a plain head's greedy path is unchanged.

    A forward that casts the logits back to bf16 after the head (unsloth's) rounds the pair again, so run eagerly
    the forward also keeps each step's pair (:meth:`steps`), which the caller takes where the logits' pair is
    that pair rounded. The forward is a plain tensor function otherwise, so a compiled decode step (a static KV
    cache) traces it; it is one object kept on the head, and its rows one tensor overwritten in place, so a
    compiled step guards on the same objects at every call. Where the rows cannot be read (inference mode; a head
    autograd cannot go through, quantized) the block does nothing and p_confident is read from the rounded
    logits. So is it where a backend computes its logits without calling the head module.
    """

    def __init__(self, model, ids: tuple[int, int]):
        self.head, self.ids = model.get_output_embeddings(), list(ids)
        self.forward: _PairForward | None = None

    def __enter__(self):
        if self.head is None or torch.is_inference_mode_enabled():
            return self
        before = self.head.__dict__.get("forward")
        if isinstance(before, _PairForward):  # inside another block on this head: it serves
            return self
        weight = next(self.head.parameters(), None)
        if weight is None:
            return self
        probe = torch.zeros(1, 1, weight.shape[-1], device=weight.device, dtype=weight.dtype, requires_grad=True)
        try:  # the head is linear in its input: its gradient is the two rows, its value at 0 their bias
            with torch.enable_grad():
                pair = self.head(probe)[0, -1, self.ids]
                rows = [torch.autograd.grad(pair[k], probe, retain_graph=k == 0)[0].reshape(-1) for k in range(2)]
        except RuntimeError as e:  # a head autograd cannot go through (quantized): the rounded logits then
            logger.info("p_confident read from the head's logits (its rows could not be read: %s)", e)
            return self
        self.forward = _PairForward.on(self.head)
        self.forward.set(before, self.ids, torch.stack(rows).float(), pair.detach().float())
        self.head.forward = self.forward
        return self

    def __exit__(self, *exc) -> None:
        if self.forward is None:
            return
        if self.forward.before is None:
            self.head.__dict__.pop("forward", None)
        else:
            self.head.forward = self.forward.before
        self.forward.seen = None
        self.forward = None

    def start(self) -> None:
        """Before each ``model.generate`` call in the block: forget the pairs kept so far."""
        if self.forward is not None:
            self.forward.seen = []

    def steps(self, count: int) -> list[torch.Tensor] | None:
        """The (B, 2) float32 pair of each of the last call's ``count`` steps, where the forward ran eagerly at
        every one of them (none inside a compiled step, none where the model skipped the head), else None."""
        seen = self.forward.seen if self.forward is not None else None
        return seen if seen and len(seen) == count else None


class _PairForward:
    """The head's forward inside an :class:`_ExactPair` block: one object a head (:meth:`on`)."""

    def __init__(self, head):
        self.head = head
        self.before = None  # the instance forward it wraps (TokenRowsOnly's), or None: the class's
        self.index = self.rows = self.bias = None
        self.seen: list[torch.Tensor] | None = None  # each eager call's pair at the last position

    @staticmethod
    def on(head) -> "_PairForward":
        forward = head.__dict__.get("_conftok_pair_forward")
        if forward is None:
            forward = head.__dict__["_conftok_pair_forward"] = _PairForward(head)
        return forward

    def set(self, before, ids: list[int], rows: torch.Tensor, bias: torch.Tensor) -> None:
        self.before = before
        if self.rows is None or self.rows.shape != rows.shape or self.rows.device != rows.device:
            self.index = torch.tensor(ids, device=rows.device)
            self.rows, self.bias = rows, bias
        else:  # the same tensors, new values: what a compiled step read before
            self.index.copy_(torch.tensor(ids))
            self.rows.copy_(rows)
            self.bias.copy_(bias)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        logits = (self.before(x, *args, **kwargs) if self.before is not None
                  else type(self.head).forward(self.head, x, *args, **kwargs))
        with torch.autocast(x.device.type, enabled=False):
            pair = x.float() @ self.rows.T + self.bias
        if self.seen is not None and not torch.compiler.is_compiling():  # a side effect: not in a compiled step
            self.seen.append(pair[:, -1])
        return logits.float().index_copy_(-1, self.index, pair)  # a new float32 tensor under bf16; no grad here


def head_skipped_for_one_row(model) -> bool:
    """Whether the model's forward computes a one-row decode step's logits from the head's weight, not by calling
    the head module: unsloth's CausalLM forward takes ``torch.mv(lm_head.weight, h)`` when the batch is one row
    of one token. :class:`_ExactPair`'s forward is skipped there, and unsloth casts the logits back to bf16 after
    the head, so the pair of such a step would be read rounded."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (getattr(type(base).forward, "__module__", "") or "").startswith("unsloth")


def _stop_ids(tokenizer, stop_tokens: Sequence[str]) -> list[int]:
    ids = {tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in stop_tokens if t in vocab)
    return sorted(i for i in ids if i is not None)


# How generate groups its length-sorted prompts (plan_batches); "auto" picks one for the device.
BATCHINGS = ("rows", "tokens", "padding")
# batching="tokens": a batch may hold up to this many times batch_size rows (the logits kept for scoring, one
# (rows, vocabulary) float32 matrix a step, grow with the rows, not with the prompts' length).
TOKEN_BATCH_ROWS = 4
# batching="padding": what a decode step costs beyond its rows, in prefill positions. SmolLM2-135M on the 2-core
# CPU box, bf16 autocast: a step 45 ms + 5.3 ms a row, a prefill 1.1 ms a position (bench/README.md,
# "Validation batches").
DECODE_STEP_POSITIONS = 40


def resolve_batching(batching: str, device: torch.device | str) -> str:
    """``"auto"``: ``"padding"`` on a CPU (a decode step's fixed cost is that of ~40 prefill positions, so the
    prefills' padding sets the time), ``"rows"`` elsewhere; any other value is checked and returned."""
    if batching == "auto":
        return "padding" if torch.device(device).type == "cpu" else "rows"
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be 'auto' or one of {list(BATCHINGS)}, got {batching!r}")
    return batching


def plan_batches(lengths: Sequence[int], batch_size: int, batching: str = "rows",
                 decode_steps: int = 16) -> list[list[int]]:
    """Batches of prompt indices, each a run of the prompts sorted by length (shortest first).

    ``"rows"``: ``batch_size`` prompts a batch. Sorted prompts of similar length share a batch, but the
    last batch holds the longest ones, whose lengths spread widely: on 128 real BoolQ and 128 MedQA
    prompts at batch 64, 53% of the positions the batches' forward computes are padding, 80% of it
    in the batch of the longest prompts (``bench/padding.py --validation``).

    ``"tokens"``, for decoding bound by launching kernels (a GPU: each batch costs one decode step a
    token whatever its rows): every batch fits the budget of ``batch_size`` rows of the longest prompt
    (rows x its longest prompt <= batch_size x the longest of all: what the widest ``"rows"`` batch
    already holds) and holds at most :data:`TOKEN_BATCH_ROWS` x ``batch_size`` rows. Among such plans:
    the fewest batches, and among those the fewest padded positions.

    ``"padding"``, for decoding bound by arithmetic (a CPU: the prefill's positions, padding included,
    set the time): at most ``batch_size`` rows a batch, and the fewest positions the prefills compute
    plus ``decode_steps`` x :data:`DECODE_STEP_POSITIONS` for each batch (a batch's decode steps cost
    beyond its rows).

    Both are found exactly, by dynamic programming over the sorted lengths.
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {list(BATCHINGS)}, got {batching!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if batching == "rows" or not order:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    sizes = [lengths[i] for i in order]
    budget = batch_size * sizes[-1]
    max_rows = TOKEN_BATCH_ROWS * batch_size if batching == "tokens" else batch_size
    per_batch = decode_steps * DECODE_STEP_POSITIONS
    # best[j]: the cost of the best plan for the first j sorted prompts, compared as a tuple: (batches, positions)
    # for "tokens", (positions + per_batch x batches, 0) for "padding"; start[j]: its last batch's first prompt.
    # The last batch's longest prompt is its last one, so it computes rows x sizes[j - 1] positions.
    worst = (math.inf, math.inf)
    best: list[tuple[float, float]] = [(0, 0)] + [worst] * len(sizes)
    start = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j - 1, max(0, j - max_rows) - 1, -1):
            rows = j - i
            positions = rows * sizes[j - 1]
            if rows > 1 and positions > budget:
                break  # more rows only add to it
            cost = ((best[i][0] + 1, best[i][1] + positions) if batching == "tokens"
                    else (best[i][0] + per_batch + positions, 0))
            if cost < best[j]:
                best[j], start[j] = cost, i
    batches, j = [], len(sizes)
    while j:
        batches.append(order[start[j]:j])
        j = start[j]
    return batches[::-1]


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


# A static KV cache is sized to the longest prompt + the new tokens, rounded up to this: one cache shape
# (one compiled decode step) serves every batch of a validation, and the next validation of the same rows.
STATIC_CACHE_MULTIPLE = 256


def static_cache_length(prompts: Sequence[Sequence[int]], new_tokens: int, multiple: int = STATIC_CACHE_MULTIPLE) -> int:
    """The static cache's length for ``prompts``: the longest + ``new_tokens``, rounded up to ``multiple``."""
    need = max(map(len, prompts)) + new_tokens
    return -(-need // multiple) * multiple


def static_cache_problem(model) -> str | None:
    """Why a static KV cache cannot serve ``model`` here, or None.

    A static cache holds keys and values in one dtype, taken from the first keys it stores. A float32 model
    under bf16 autocast (a model object passed as it was, trained with ``bf16``) makes bf16 values but float32
    keys (the rotary embedding multiplies the bf16 keys by float32 tables), and the cache then refuses the
    values (``index_copy_``: Float and BFloat16). The dynamic cache keeps each in its own dtype."""
    device = next(model.parameters()).device
    if not torch.is_autocast_enabled(device.type):
        return None
    compute = torch.get_autocast_dtype(device.type)
    weights = next((p.dtype for n, p in model.named_parameters()
                    if p.is_floating_point() and "lora_" not in n and "trainable_tokens" not in n), compute)
    if weights != compute:
        return (f"the model's weights are {str(weights).removeprefix('torch.')} under "
                f"{str(compute).removeprefix('torch.')} autocast, so its keys and values differ in dtype")
    return None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, stop_tokens: Sequence[str], max_new_tokens: int = 16,
             batch_size: int = 8, desc: str | None = None, progress: bool = True,
             score_ids: tuple[int, int] | None = None, static_cache: bool = False,
             cache_length: int | None = None, batching: str = "auto") -> list[Generation]:
    """Greedy generation for prompt ids, in batches of similar length (less padding).

    ``batching``: how the length-sorted prompts are grouped (:func:`plan_batches`): ``"rows"``,
    ``batch_size`` a batch; ``"tokens"``, a budget of ``batch_size`` x the longest prompt's positions a
    batch, in as few batches as fit it, with the least padding; ``"padding"``, at most ``batch_size`` a
    batch, the least prefill positions plus each batch's decode steps; ``"auto"``
    (:func:`resolve_batching`), ``"padding"`` on a CPU and ``"rows"`` elsewhere. A static cache takes one
    batch shape, so with ``static_cache`` the batches are ``"rows"``.

    ``static_cache``: every batch decodes into a KV cache of one shape (``batch_size`` rows, a short
    batch filled with copies of its last prompt whose outputs are dropped; :func:`static_cache_length`
    positions). On CUDA transformers then compiles the decode step once and replays it as a CUDA graph
    (``torch.compile`` mode ``reduce-overhead``): one launch a step instead of one per kernel, where a
    decode step is bound by launching kernels. The first batch pays the compile. Elsewhere the static
    cache decodes eagerly, with the same outputs. Where it cannot serve the model (:func:`static_cache_problem`)
    the dynamic cache is used and the reason logged. ``cache_length``: at least this many positions (one
    length for several calls, so one compiled step serves them all; :func:`evaluate` passes one for
    every domain).

    ``max_new_tokens`` bounds the answer. With ``score_ids=(C, U)`` generation runs one step more, the
    token's step: an answer of ``max_new_tokens`` ids may still be followed by its token (tagging, with
    the same budget, trains a cut answer's token after it). A row that has not stopped by then is cut
    to ``max_new_tokens`` ids (``finished=False``), the extra step's own id dropped.
    p_confident is read from the logits of the step after each row's answer (its input: prompt +
    answer, where the token goes): the step where the row stopped (a confidence token or end of turn),
    or the token's step for a cut row. So no second forward over the prompt is needed. Where a model's
    ``generate`` returned fewer steps than asked, those rows are scored by a forward over prompt +
    answer (:func:`score_confidence`): with ``score_ids`` every row has p_confident.

    Decoding is greedy whatever the model's own ``generation_config`` holds (:data:`GREEDY`: no
    repetition penalty, no n-gram ban, one beam), so tagging and validation see the model's argmax.
    ``p_answer`` is the first answer token's probability among the tokens the first step could pick (the
    confidence tokens are barred there).

    The new tokens' rows of a PEFT model whose weights are not merged (:func:`conftok.merged.merged_lora`
    folds them in) are computed alone (:class:`conftok.token_rows.TokenRowsOnly`), not rebuilt into a
    whole embedding and head matrix at every decode step.
    """
    with TokenRowsOnly(model):
        return _generate(model, tokenizer, prompts, stop_tokens=stop_tokens, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, desc=desc, progress=progress, score_ids=score_ids,
                         static_cache=static_cache, cache_length=cache_length, batching=batching)


def _generate(model, tokenizer, prompts, *, stop_tokens, max_new_tokens, batch_size, desc, progress, score_ids,
              static_cache, cache_length, batching) -> list[Generation]:
    """:func:`generate`'s work, inside its :class:`TokenRowsOnly` block."""
    device = next(model.parameters()).device
    problem = static_cache_problem(model) if static_cache else None
    if problem:
        logger.info("static KV cache off (the dynamic cache instead): %s", problem)
        static_cache = False
    stop = _stop_ids(tokenizer, stop_tokens)
    vocab = tokenizer.get_vocab()
    id_to_token = {vocab[t]: t for t in stop_tokens if t in vocab}
    asked, batching = batching, resolve_batching(batching, device)
    if static_cache and batching != "rows":
        if asked != "auto":
            logger.info("batching=%r with a static KV cache: batches of batch_size rows (one cache shape)", asked)
        batching = "rows"
    out: list[Generation | None] = [None] * len(prompts)
    new_tokens = max_new_tokens + (score_ids is not None)
    batches = plan_batches([len(p) for p in prompts], batch_size, batching, decode_steps=new_tokens)
    cache = dict(cache_implementation="static",
                 max_cache_len=max(cache_length or 0, static_cache_length(prompts, new_tokens))) \
        if static_cache and prompts else {}
    # A batch is at least this many rows: a one-row batch gets a copy of its row beside it (its outputs dropped)
    # where one row would decode without calling the head module (head_skipped_for_one_row: unsloth).
    min_rows = batch_size if cache else 2 if head_skipped_for_one_row(model) else 1
    with _ExactPair(model, score_ids) if score_ids is not None else nullcontext() as pair:  # the pair in float32
        _generate_batches(model, tokenizer, prompts, out, batches, min_rows, pair, stop=stop, id_to_token=id_to_token,
                          new_tokens=new_tokens, max_new_tokens=max_new_tokens, score_ids=score_ids, cache=cache,
                          desc=desc, progress=progress)
    unscored = [i for i, g in enumerate(out) if score_ids is not None and g.p_confident is None]
    if unscored:
        probs = score_confidence(model, tokenizer, [prompts[i] + out[i].answer_ids for i in unscored], *score_ids,
                                 batch_size=batch_size)
        for i, p in zip(unscored, probs):
            out[i].p_confident = p
    return out  # type: ignore[return-value]


def _generate_batches(model, tokenizer, prompts, out, batches, min_rows, pair, *, stop, id_to_token, new_tokens,
                      max_new_tokens, score_ids, cache, desc, progress) -> None:
    """:func:`generate`'s batches, each into ``out`` at its prompts' places."""
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for idx in batches:
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (min_rows - len(batch))  # a static cache: one shape for every batch
        input_ids, mask = _left_pad(batch, tokenizer.pad_token_id, device)
        if pair is not None:
            pair.start()
        result = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
            **GREEDY, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, use_cache=True,
            # A confidence token comes after an answer, never instead of one: a trained token can
            # outscore every answer token at the first step (seen on real rows), so forbid it there.
            begin_suppress_tokens=list(id_to_token) or None,
            output_logits=score_ids is not None, return_dict_in_generate=True, **cache,
        )
        generated = result.sequences[:len(idx), input_ids.shape[1]:input_ids.shape[1] + new_tokens].tolist()
        stops = [next((k for k, t in enumerate(seq) if t in stop), len(seq)) for seq in generated]
        cuts = [min(k, max_new_tokens) for k in stops]  # each answer's length: where the step after it is
        p_rows: list[float | None] = [None] * len(idx)
        p_first: list[float | None] = [None] * len(idx)
        if score_ids is not None:  # the batch's rows at once: a few kernels and one host sync, not several per row
            scored = [row for row, cut in enumerate(cuts) if cut < len(result.logits)]
            if scored:  # logits (V) of step `cut`: the step after the answer
                at_cut = torch.stack([result.logits[cuts[row]][row] for row in scored])[:, list(score_ids)].float()
                kept = pair.steps(len(result.logits)) if pair is not None else None
                if kept is not None:  # the forward's own pair, where the logits hold it rounded after the head (unsloth)
                    fine = torch.stack([kept[cuts[row]][row] for row in scored])
                    if bool(((fine - at_cut).abs() <= at_cut.abs() * 2 ** -7 + 1e-3).all()):
                        at_cut = fine
                for row, p in zip(scored, torch.softmax(at_cut, dim=-1)[:, 0].tolist()):
                    p_rows[row] = p
            answered = [row for row, cut in enumerate(cuts) if cut > 0]
            if answered:  # p of each answer's first token among those the first step could pick
                first = result.logits[0][answered].float()
                if id_to_token:
                    first[:, list(id_to_token)] = -math.inf  # barred there (begin_suppress_tokens)
                ids = torch.tensor([generated[row][0] for row in answered], device=first.device)[:, None]
                probs = (first.gather(1, ids).squeeze(1) - first.logsumexp(-1)).exp().tolist()
                for row, p in zip(answered, probs):
                    p_first[row] = p
        for row, (i, seq, k, cut) in enumerate(zip(idx, generated, stops, cuts)):
            answer_ids = seq[:cut]
            stop_token = id_to_token.get(seq[k]) if k < len(seq) else None
            text = tokenizer.decode(answer_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            out[i] = Generation(text, answer_ids, stop_token, finished=k < len(seq), p_confident=p_rows[row],
                                p_answer=p_first[row])
        bar.update(len(idx))
    bar.close()


@torch.no_grad()
def score_confidence(model, tokenizer, contexts: list[list[int]], confident_id: int, unconfident_id: int,
                     batch_size: int = 8) -> list[float]:
    """p_confident at the position after each context (prompt + answer ids)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(contexts), batch_size):
        ids, mask = _left_pad(contexts[start:start + batch_size], tokenizer.pad_token_id, device)
        out += p_confident(confidence_logits(model, ids, mask), confident_id, unconfident_id).tolist()
    return out


def _wrong_domain_rate(records: list[dict[str, Any]]) -> float:
    if not all("domain_tokens" in r for r in records):
        return float("nan")  # hand-made records that do not say which tokens are the domain's
    return float(np.mean([r["token"] is not None and r["token"] not in r["domain_tokens"] for r in records]))


def summarize_domain(records: list[dict[str, Any]], beta: int = 100, p: str = "2") -> dict[str, float]:
    """Per-domain figures from per-row records (see :func:`evaluate`)."""
    conf = np.array([r["p_confident"] for r in records], dtype=float)
    correct = np.array([r["correct"] for r in records], dtype=float)
    both = 0 < correct.sum() < len(correct)
    return {
        "n": len(records),
        "token_accuracy": float(np.mean([r["token_correct"] for r in records])),
        "calibration_error": calibration_error(conf, correct, beta=beta, p=p),
        "brier": brier_score(conf, correct),
        "auroc": auroc(conf, correct) if both else float("nan"),
        "answer_accuracy": float(correct.mean()),
        "token_rate": float(np.mean([r["token"] is not None for r in records])),
        # Answers followed by another domain's token (a reading answer ending in <U_MED>).
        "wrong_domain_token_rate": _wrong_domain_rate(records),
        "unparsed": int(sum(r["answer"] is None for r in records)),
    }


def _evaluate_domain(model, tokenizer, domain: Domain, rows, prompts, *, stop_tokens, batch_size, max_new_tokens,
                     progress, dataset_name, static_cache=False, cache_length=None,
                     batching="auto") -> list[dict[str, Any]]:
    c_id, u_id = (tokenizer.convert_tokens_to_ids(t) for t in domain.tokens)
    # max_new_tokens bounds the ANSWER, as in tagging; with score_ids the token gets one step more, so an
    # answer that tagging cut at max_new_tokens (and trained with its token after it) can still show its token.
    gens = generate(model, tokenizer, prompts, stop_tokens=stop_tokens, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, desc=f"Validating on {dataset_name}", progress=progress,
                    score_ids=(c_id, u_id), static_cache=static_cache, cache_length=cache_length,
                    batching=batching)
    records = []
    for row, gen in zip(rows, gens):
        answer = domain.parse_answer(gen.text, row)
        gold = domain.gold_answer(row)
        correct = answer is not None and answer == gold
        expected = domain.confident_token if correct else domain.unconfident_token
        records.append({
            "domain": domain.name, "dataset": dataset_name, "id": row.get("id"), "response": gen.text,
            "answer": answer, "gold": gold, "correct": bool(correct), "token": gen.stop_token,
            "expected_token": expected, "token_correct": gen.stop_token == expected,
            "p_confident": float(gen.p_confident),
            "domain_tokens": list(domain.tokens),
            "p_answer": gen.p_answer,
        })
    return records


def evaluate(model, tokenizer, rows_by_dataset: Mapping[str, Sequence[Mapping[str, Any]]], *, domains=None,
             beta: int = 100, p: str = "2", batch_size: int = 8, max_new_tokens: int = 16,
             progress: bool = True, n_reliability_bins: int = 10, verbose: bool = False,
             merge: bool | str = "auto", static_cache: bool = False, batching: str = "auto") -> dict[str, Any]:
    """Validate on raw rows per data set; returns metrics, per-domain figures, records and bins.

    Args:
        rows_by_dataset: data set name (``boolq``) -> raw rows of that domain's task.
        max_new_tokens: the longest answer (tagging's budget); generation runs one step more, for the token
            (:func:`generate`).
        beta, p: calibration error bin size and norm (``calib_beta``, ``calib_p_norm``).
        verbose: print the seed's validation block per data set as it finishes.
        merge: generate with the LoRA update folded into a copy of the weights (:func:`conftok.merged.merged_lora`;
            ``"auto"``: where it fits in free memory). The model's own weights are untouched either way.
        static_cache: decode into a KV cache of one shape, one length for every domain; on CUDA a compiled
            decode step replayed as a CUDA graph (:func:`generate`).
        batching: ``"rows"``, ``"tokens"``, ``"padding"`` or ``"auto"``: how the prompts are batched
            (:func:`generate`, :func:`plan_batches`).

    Returns:
        ``{"metrics": {...flat, metric-name keys...}, "domains": {name: figures},
        "records": [...], "reliability": {name: bins}}``. A domain's figures and bins cover the rows of
        all its data sets; overall accuracy and calibration error are the mean over domains.
    """
    domains = resolve_domains(domains)
    plan = []  # (data set, domain, rows, prompt ids)
    for dataset_name, rows in rows_by_dataset.items():
        domain, rows = domains.for_dataset(dataset_name), list(rows)
        plan.append((dataset_name, domain, rows, [encode_prompt(tokenizer, domain.build_question(r)) for r in rows]))
    # One static cache length for every domain (the answer's budget + the token's step), so one compiled decode
    # step serves them all, and the next validation of the same rows.
    every_prompt = [prompt for *_, prompts in plan for prompt in prompts] if static_cache else []
    cache_length = static_cache_length(every_prompt, max_new_tokens + 1) if every_prompt else None
    was_training = model.training
    # unsloth's generate turns every layer's gradient checkpointing off and turns it on again only for a model it
    # found training, which this one is not (eval below): the flags come back as they were.
    checkpointing = [(m, m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    model.eval()
    per_domain, records, reliability = {}, [], {}
    try:
        with merged_lora(model, merge):
            for dataset_name, domain, rows, prompts in plan:
                if verbose:
                    print(f"\nValidating on {dataset_name}...", flush=True)
                recs = _evaluate_domain(model, tokenizer, domain, rows, prompts, stop_tokens=domains.tokens,
                                        batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                                        dataset_name=dataset_name, static_cache=static_cache,
                                        cache_length=cache_length, batching=batching)
                not_finite = [k for k, r in enumerate(recs) if not math.isfinite(r["p_confident"])]
                if not_finite:  # the model's outputs are NaN/inf: its weights diverged, not the rows
                    raise FloatingPointError(
                        f"p_confident is not finite on {len(not_finite)} of {len(recs)} {dataset_name} validation rows "
                        f"(first: row {not_finite[0]}): the model's outputs are not finite")
                records += recs
                if verbose:
                    figures = summarize_domain(recs, beta=beta, p=p)
                    print(f"\n{dataset_name.upper()} Results:\n"
                          f"  Validation Accuracy: {100 * figures['token_accuracy']:.2f}%\n"
                          f"  Calibration Error: {figures['calibration_error']:.4f}\n"
                          f"  Samples evaluated: {figures['n']}", flush=True)
    finally:
        model.train(was_training)
        for module, flag in checkpointing:
            if module.gradient_checkpointing != flag:  # set only where changed: a set marks a compiled layer mutated
                module.gradient_checkpointing = flag
    for name in dict.fromkeys(domain.name for _, domain, *_ in plan):  # a domain's figures: all its data sets' rows
        recs = [r for r in records if r["domain"] == name]
        per_domain[name] = summarize_domain(recs, beta=beta, p=p)
        reliability[name] = reliability_bins([r["p_confident"] for r in recs], [r["correct"] for r in recs],
                                             n_bins=n_reliability_bins)
    return {"metrics": flatten_metrics(per_domain), "domains": per_domain, "records": records,
            "reliability": reliability}


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def flatten_metrics(per_domain: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat metric dict: overall means over domains plus ``val/<domain>/<name>``."""
    out = {
        M.VAL_ACCURACY: _nanmean(d["token_accuracy"] for d in per_domain.values()),
        M.VAL_CALIBRATION_ERROR: _nanmean(d["calibration_error"] for d in per_domain.values()),
        M.VAL_BRIER: _nanmean(d["brier"] for d in per_domain.values()),
        M.VAL_AUROC: _nanmean(d["auroc"] for d in per_domain.values()),
        M.VAL_ANSWER_ACCURACY: _nanmean(d["answer_accuracy"] for d in per_domain.values()),
        M.VAL_TOKEN_RATE: _nanmean(d["token_rate"] for d in per_domain.values()),
    }
    for name, figures in per_domain.items():
        for key, value in figures.items():
            out[M.domain_key(name, key)] = value
    return out


def print_validation_block(result: Mapping[str, Any], epoch: float) -> None:
    """The overall part of the seed's console block (per-domain lines print as domains finish)."""
    m = result["metrics"]
    print("\n" + "=" * 70)
    print("OVERALL VALIDATION METRICS:")
    print(f"  Average Validation Accuracy: {100 * m[M.VAL_ACCURACY]:.2f}%")
    print(f"  Average Calibration Error: {m[M.VAL_CALIBRATION_ERROR]:.4f}")
    print("=" * 70, flush=True)
