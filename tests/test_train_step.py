"""conftok.train.TrainStep: a step as train() takes it, with one read of the device."""

from __future__ import annotations

import importlib
import math
import traceback
import warnings

import pytest
import torch
from conftest import long_answer_rows, make_model, make_tokenizer, tolerance, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode

from conftok.config import TrainConfig
from conftok.data import ConfidenceCollator, ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.loss import attach_base_topk, training_loss
from conftok.modeling import build_model
from conftok.packing import PackedConfidenceCollator
from conftok.tokens import token_ids

train_module = importlib.import_module("conftok.train")  # `conftok.train` the attribute is the function


class DeviceReads(TorchDispatchMode):
    """Counts what would make the host wait for a GPU: reading a value back (``.item()``, ``bool(t)``,
    ``int(t)``) and tensors made from Python data (then copied to the device), apart from the reads of
    transformers' attention-mask builder (``mask_reads``). ``paused`` stops the count."""

    def __init__(self):
        super().__init__()
        self.reads, self.lifted, self.mask_reads, self.paused = 0, 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func is torch.ops.aten._local_scalar_dense.default:
            if any(f.filename.endswith("masking_utils.py") for f in traceback.extract_stack()):
                self.mask_reads += 1
            else:
                self.reads += 1
        if not self.paused:
            self.lifted += func is torch.ops.aten.lift_fresh.default and out.dim() > 0
        return out


def tiny_lora(device, *, bf16: bool):
    tok = make_tokenizer()
    return build_model(make_model(len(tok), seed=7, device=device), tokenizer=tok, backend="hf", bf16=bf16,
                       lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, device=device)


def setup(tmp_path, device, *, bf16: bool, packed: bool = False):
    model, tok = tiny_lora(device, bf16=bf16)
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", long_answer_rows()), tok)
    cfg = TrainConfig()  # the default loss: placement and the stored KL
    attach_base_topk(ds, model, cfg.stored_kl_top_k, progress=False)
    ids = token_ids(tok, resolve_domains().tokens)
    domains = resolve_domains()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    step = train_module.TrainStep(model, optimizer, loss_kwargs=cfg.loss_kwargs(), confidence_ids=ids.values(),
                                  confident_ids=[ids[d.confident_token] for d in domains], bf16=bf16, packed=packed)
    collate = (PackedConfidenceCollator if packed else ConfidenceCollator)(tok.pad_token_id)
    batches = [collate([ds[i] for i in range(0, 3)]), collate([ds[i] for i in range(3, 6)])]
    twins = [collate([ds[i], ds[i]]) for i in (1, 4)]  # one row twice: no padding
    return model, step, batches, twins, cfg, ids


def test_a_step_reads_the_device_once(tmp_path, device, monkeypatch):
    """Two micro-batches with the guard terms and the clipping read nothing back and copy no Python list to the
    device: the facts a loss needs (padding, the labels' check, the answers' length) are read from each batch's
    host copy before it moves, and the ids and the new tokens' indices are on the device already. Left:
    transformers' own check of the mask (or of the positions) as each forward starts, once without padding and
    twice with it. ``read`` brings every loss, term and the norm back in one transfer, and they are the loss's
    own values."""
    model, step, batches, twins, cfg, ids = setup(tmp_path, device, bf16=False)
    model.train()
    step.add_group(batches)  # the first step: the new tokens' indices go to the device once
    step.read()
    step.optimizer.zero_grad(set_to_none=True)
    real_facts = train_module.host_facts

    def host_facts(batch, **kwargs):  # reads the batch's CPU copy: no device involved
        counter.paused = True
        try:
            return real_facts(batch, **kwargs)
        finally:
            counter.paused = False

    real_sizes = train_module.term_sizes

    def term_sizes(batch, **kwargs):  # the group's shares, from the host copies too
        counter.paused = True
        try:
            return real_sizes(batch, **kwargs)
        finally:
            counter.paused = False

    monkeypatch.setattr(train_module, "host_facts", host_facts)
    monkeypatch.setattr(train_module, "term_sizes", term_sizes)
    found = {}
    for name, micro in (("unpadded", twins), ("padded", batches)):
        counter = DeviceReads()
        with counter:
            step.add_group(micro)
            reading = step.read()
        found[name] = (counter.reads, counter.lifted, counter.mask_reads)
        step.optimizer.zero_grad(set_to_none=True)
    assert found == {"unpadded": (0, 0, 2), "padded": (0, 0, 4)}
    step.add_group(batches)  # the padded micro-batches again, for the values below
    reading = step.read()

    expected = []
    with torch.no_grad():
        for batch in batches:
            on_device = {k: v.to(device) for k, v in batch.items()}
            terms = training_loss(model, on_device, confidence_ids=sorted(ids.values()),
                                  confident_ids=[ids[d.confident_token] for d in resolve_domains()],
                                  **cfg.loss_kwargs())
            expected.append([terms.loss.item(), terms.token.item(), terms.placement.item(), terms.kl.item()])
    assert reading.losses == pytest.approx([e[0] for e in expected], rel=1e-5)
    # The step's terms: each micro-batch's mean by its share of the step's rows / answer positions.
    from conftok.loss import term_sizes

    sizes = [term_sizes(b, confident_ids=[ids[d.confident_token] for d in resolve_domains()]) for b in batches]
    shares = [(s.token / sum(x.token for x in sizes), s.answer / sum(x.answer for x in sizes)) for s in sizes]
    assert reading.terms[:3] == pytest.approx(
        [sum(e[1] * sh[0] for e, sh in zip(expected, shares)), *(sum(e[j] * sh[1] for e, sh in zip(expected, shares))
                                                                  for j in (2, 3))], rel=1e-5, abs=1e-7)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in step.params if p.grad is not None]))
    assert reading.grad_norm > step.max_grad_norm  # the norm before clipping is read; the gradients are clipped
    assert clipped.item() == pytest.approx(step.max_grad_norm, rel=1e-5)
    step.apply()
    assert all(p.grad is None for p in step.params)


def test_a_padding_free_step_reads_its_facts_from_the_host_copy(tmp_path, device):
    """Packed batches too: the loss gets the host facts (the labels' check, the answers' length) and the longest
    row (flash-attention's max_length, a Python int) on the host, so it reads nothing back from the device; the
    step's losses and gradient norm are the padded step's."""
    from conftok.packing import packed_training_loss

    readings, seen = {}, []

    def spy(model, batch, **kwargs):
        seen.append((kwargs.get("facts"), batch["max_length"].device.type, batch["input_ids"].device.type))
        return packed_training_loss(model, batch, **kwargs)

    for packed in (False, True):
        (tmp_path / str(packed)).mkdir()
        model, step, batches, _, _, _ = setup(tmp_path / str(packed), device, bf16=False, packed=packed)
        if packed:
            step.compute_loss = spy
        model.train()
        step.add_group(batches)
        readings[packed] = step.read()
    assert len(seen) == len(batches)
    assert all(facts is not None and facts.padded and host == "cpu" and ids == device.type
               for facts, host, ids in seen), seen
    assert readings[True].losses == pytest.approx(readings[False].losses, rel=1e-5)
    assert readings[True].grad_norm == pytest.approx(readings[False].grad_norm, rel=1e-4)


def test_the_loss_with_host_facts_is_the_loss_without(tmp_path, device):
    """training_loss given the batch's host facts (and the ids as device tensors) computes what it computes
    reading them from the device, with and without padding."""
    from conftok.loss import host_facts

    model, step, batches, twins, cfg, ids = setup(tmp_path, device, bf16=False)
    model.eval()
    for batch in batches + twins:
        facts = host_facts(batch)
        on_device = {k: v.to(device) for k, v in batch.items()}
        kwargs = {**cfg.loss_kwargs(), "answer_ce_weight": 0.5}
        with torch.no_grad():
            plain = training_loss(model, on_device, confidence_ids=sorted(ids.values()),
                                  confident_ids=[ids[d.confident_token] for d in resolve_domains()], **kwargs)
            given = training_loss(model, on_device, facts=facts, **{**step.loss_kwargs, **kwargs})
        for name, a, b in zip(plain._fields, plain, given):
            torch.testing.assert_close(b, a, **tolerance(torch.float32), msg=name)
    assert not host_facts(twins[0]).padded and host_facts(batches[0]).padded


def test_a_step_backpropagates_through_checkpointing_that_is_not_build_models(tmp_path, device):
    """Layers checkpointed the plain way (transformers' own non-reentrant checkpointing, as unsloth's or a user's
    model has it) recompute in the backward, outside the step's forward: the LoRA inputs must stay uncast there
    too, or the recompute saves float32 where the forward saved bfloat16 (torch.utils.checkpoint's
    CheckpointError, seen with unsloth's CPU fallback through bench/gpu.py)."""
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), seed=7, device=device), tokenizer=tok, backend="hf", bf16=True,
                             lora_r=4, lora_alpha=8, lora_dropout=0.1, gradient_checkpointing=False, device=device)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", long_answer_rows()), tok)
    ids = token_ids(tok, resolve_domains().tokens)
    step = train_module.TrainStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                                  loss_kwargs={"placement_weight": 1.0}, confidence_ids=ids.values(),
                                  confident_ids=[ids[d.confident_token] for d in resolve_domains()], bf16=True)
    model.train()
    step.add(ConfidenceCollator(tok.pad_token_id)([ds[i] for i in range(4)]))
    reading = step.read()
    assert all(map(math.isfinite, reading.losses)) and math.isfinite(reading.grad_norm) and reading.grad_norm > 0


ACCUMULATED_LOSSES = {
    "the defaults (placement, stored KL)": {},
    "live KL, answer CE on the confident rows, weighted classes": {
        "stored_kl_weight": 0.0, "kl_weight": 1.0, "answer_ce_weight": 0.5, "answer_ce_rows": "correct"},
}


@pytest.mark.parametrize("loss", list(ACCUMULATED_LOSSES))
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tmp_path, device, loss):
    """Six rows (answers of 1 to 7 tokens) as one batch, as micro-batches of 4 + 2 and of 1 + 5, and as the last
    group of an epoch (one micro-batch where two would make a step): the same gradient each time. Weighing
    each micro-batch's mean terms equally (the loss / accumulation) gave the single row of a 5 + 1 split
    5/2 times its weight, and a lone last micro-batch half its gradient."""
    model, tok = tiny_lora(device, bf16=False)
    cfg, ids = TrainConfig(), token_ids(tok, resolve_domains().tokens)
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", long_answer_rows()), tok)
    attach_base_topk(ds, model, cfg.stored_kl_top_k, progress=False)
    with torch.no_grad():  # LoRA B away from 0: every LoRA matrix gets a gradient, and the KL terms one too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    model.train()
    kwargs = {**cfg.loss_kwargs(), **ACCUMULATED_LOSSES[loss]}
    weights = None
    if kwargs["answer_ce_rows"] == "correct":
        weights = torch.ones(model.get_output_embeddings().weight.shape[0], device=device)
        weights[sorted(ids.values())] = torch.tensor([0.5, 2.0, 1.5, 3.0], device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    step = train_module.TrainStep(model, optimizer, loss_kwargs=kwargs, confidence_ids=ids.values(),
                                  confident_ids=[ids[d.confident_token] for d in resolve_domains()],
                                  token_weights=weights, bf16=False, max_grad_norm=1e9)
    collate = ConfidenceCollator(tok.pad_token_id)
    rows = [ds[i] for i in range(len(ds))]

    def gradient(groups):
        step.add_group([collate(group) for group in groups])
        step.read()
        flat = torch.cat([p.grad.flatten() for p in step.params if p.grad is not None])
        optimizer.zero_grad(set_to_none=True)
        return flat

    one = gradient([rows])
    assert one.norm() > 0
    for split in ([rows[:4], rows[4:]], [rows[:1], rows[1:]], [rows[2:3], rows[:2], rows[3:]]):
        torch.testing.assert_close(gradient(split), one, **tolerance(torch.float32))

    # What the step reads back (the logged loss and terms) is the one batch's, however it was split: the parts
    # summed, not a mean of the micro-batches' means (which logged placement 35% low in an audit's split).
    def reading(groups):
        step.add_group([collate(group) for group in groups])
        values = step.read()
        optimizer.zero_grad(set_to_none=True)
        return values

    whole = reading([rows])
    for split in ([rows[:1], rows[1:]], [rows[:4], rows[4:]]):
        parts = reading(split)
        assert parts.loss == pytest.approx(whole.loss, rel=1e-5) and len(parts.losses) == 2
        assert parts.terms == pytest.approx(whole.terms, rel=1e-5, abs=1e-7)
    step.add(collate(rows))  # a step of one batch is the batch's own loss
    assert step.read().grad_norm == pytest.approx(one.norm().item(), rel=1e-5)
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="read"):
        step.add(collate(rows))
        step.add(collate(rows))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_a_cuda_step_synchronizes_only_where_it_reads(tmp_path, cuda_device, compiled):
    """On CUDA, torch's sync debug mode sees no synchronizing call in a step's micro-batches and optimizer update
    but transformers' check of the mask as each forward starts: the host queues the rest of the step without
    waiting for the card."""
    from conftok.compiling import compile_layers, compiler_available

    if compiled and not compiler_available()[0]:
        pytest.skip(compiler_available()[1])
    model, step, batches, twins, _, _ = setup(tmp_path, cuda_device, bf16=True)
    if compiled:
        compile_layers(model)
        step.compiled = True
    model.train()
    syncs = {}
    for name, micro in (("unpadded", twins), ("padded", batches)):
        micro = [{k: v.pin_memory() for k, v in b.items()} for b in micro]  # as train's loader pins them
        for _ in range(2):  # the compile, the indices' copy: before the count
            step.add_group(micro)
            step.read()
            step.apply()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step.add_group(micro)
                torch.cuda.set_sync_debug_mode(0)
                step.read()  # the one read, by design
                torch.cuda.set_sync_debug_mode("warn")
                step.apply()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs[name] = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert all(where.split(":")[0].endswith("masking_utils.py") for found in syncs.values() for where in found), syncs
