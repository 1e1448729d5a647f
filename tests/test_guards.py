"""The cheaper guards of training_loss: answer cross-entropy (all rows or right answers only), the
stored top-k KL, and the class-weighted token loss; each against a brute-force computation."""

import contextlib
import math
import types

import pytest
import torch
from conftest import (feature_rows, logged_scalars, long_answer_rows, make_model, make_tokenizer, to_device,
                      write_jsonl)

from conftok.data import IGNORE_INDEX, ConfidenceCollator, ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.loss import attach_base_topk, base_topk, position_ids_from_mask, training_loss
from conftok.tokens import add_confidence_tokens


def _rows(seed=3):
    """Answers of 1 to several tokens, right (C) and wrong (U) ones."""
    return long_answer_rows(seed)


def _setup(tmp_path, device, *, lora=True, seed=7):
    from conftok.modeling import build_model

    tok = make_tokenizer()
    model = make_model(len(tok), seed=seed)
    if lora:
        model, tok = build_model(model, tokenizer=tok, backend="hf", bf16=False, lora_r=4, lora_alpha=8,
                                 lora_dropout=0.0, gradient_checkpointing=False, device=device)
    else:
        model = model.to(device)
    ids = add_confidence_tokens(tok, model, resolve_domains().tokens)
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", _rows()), tok)
    return model, tok, ds, ids


def _collate(ds, tok, device):
    return to_device(ConfidenceCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))]), device)


def _full_log_probs(model, batch):
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return torch.log_softmax(logits.float(), -1)


def _perturb(model, scale=0.3):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


class TestAnswerCrossEntropy:
    @pytest.mark.parametrize("rows", ["all", "correct"])
    def test_equals_brute_force(self, tmp_path, device, rows):
        model, tok, ds, ids = _setup(tmp_path, device, lora=False)
        batch = _collate(ds, tok, device)
        confident = [ids["<C_READ>"], ids["<C_MED>"]]
        terms = training_loss(model, batch, confident_ids=confident, answer_ce_weight=0.5, answer_ce_rows=rows)
        log_probs = _full_log_probs(model, batch)
        total, n = 0.0, 0
        for b in range(len(log_probs)):
            if rows == "correct" and int(batch["labels"][b, -1]) not in confident:
                continue
            for t in range(1, log_probs.shape[1]):
                if batch["answer_mask"][b, t]:  # position t - 1 predicts answer token t
                    total -= log_probs[b, t - 1, batch["input_ids"][b, t]].item()
                    n += 1
        assert n > 0
        assert terms.answer_ce.item() == pytest.approx(total / n, rel=1e-4)
        assert terms.loss.item() == pytest.approx(terms.token.item() + 0.5 * total / n, rel=1e-4)

    def test_correct_rows_only_see_right_answers(self, tmp_path, device):
        """With only wrong answers in the batch, the 'correct' variant has nothing to hold and no gradient."""
        model, tok, ds, ids = _setup(tmp_path, device, lora=False)
        batch = _collate(ds, tok, device)
        wrong = [b for b in range(len(batch["labels"])) if int(batch["labels"][b, -1]) in (ids["<U_READ>"], ids["<U_MED>"])]
        assert wrong
        sub = {k: v[wrong] for k, v in batch.items()}
        terms = training_loss(model, sub, confident_ids=[ids["<C_READ>"], ids["<C_MED>"]], answer_ce_weight=1.0,
                              answer_ce_rows="correct")
        assert terms.answer_ce.item() == 0.0
        every = training_loss(model, sub, answer_ce_weight=1.0, answer_ce_rows="all")
        assert every.answer_ce.item() > 0.0

    def test_needs_confident_ids_and_a_known_row_rule(self, tmp_path, device):
        model, tok, ds, _ = _setup(tmp_path, device, lora=False)
        batch = _collate(ds, tok, device)
        with pytest.raises(ValueError, match="confident_ids"):
            training_loss(model, batch, answer_ce_weight=1.0, answer_ce_rows="correct")
        with pytest.raises(ValueError, match="answer_ce_rows"):
            training_loss(model, batch, answer_ce_weight=1.0, answer_ce_rows="some")


class TestStoredKL:
    def test_full_vocabulary_top_k_equals_the_live_kl(self, tmp_path, device):
        """k = V keeps the whole base distribution: the stored KL is the live KL exactly; it is 0 before
        training; a small k gives a lower bound (coarsening never raises a KL)."""
        model, tok, ds, ids = _setup(tmp_path, device)
        conf = sorted(ids.values())
        vocab = model.get_output_embeddings().weight.shape[0]
        model.eval()
        attach_base_topk(ds, model, vocab, batch_size=4, progress=False)
        batch = _collate(ds, tok, device)
        # every token but the confidence tokens, which the reference leaves out
        assert batch["base_topk_ids"].shape == (len(ds), int(batch["answer_mask"].sum(1).max()), vocab - len(conf))
        assert not torch.isin(batch["base_topk_ids"], torch.tensor(conf, device=device)).any()
        before = training_loss(model, batch, confidence_ids=conf, stored_kl_weight=1.0)
        assert before.kl.item() == pytest.approx(0.0, abs=2e-3)  # fp16 storage of log-probabilities
        _perturb(model)
        live = training_loss(model, batch, confidence_ids=conf, kl_weight=1.0)
        stored = training_loss(model, batch, confidence_ids=conf, stored_kl_weight=1.0)
        assert live.kl.item() > 1e-2
        assert stored.kl.item() == pytest.approx(live.kl.item(), rel=2e-2, abs=2e-3)
        attach_base_topk(ds, model, 4, batch_size=4, progress=False)
        batch = _collate(ds, tok, device)
        small = training_loss(model, batch, confidence_ids=conf, stored_kl_weight=1.0)
        assert 0.0 < small.kl.item() < live.kl.item()
        # k = 4 against its definition, over the whole vocabulary here: each model's distribution at every position
        # that predicts an answer token, the confidence tokens left out and the rest renormalised; coarsened to the
        # base's stored top 4 and "anything else"; KL(base || tuned) there, the mean over those positions.
        with torch.no_grad():
            with model.disable_adapter():
                base_lp = _full_log_probs(model, batch)
            tuned_lp = _full_log_probs(model, batch)
        confidence = torch.tensor(conf, device=device)

        def without_confidence(lp):
            lp = lp.double().index_fill(-1, confidence, -torch.inf)
            return (lp - torch.logsumexp(lp, -1)).exp()

        total, n = 0.0, 0
        for b in range(len(base_lp)):
            positions = [t - 1 for t in range(1, base_lp.shape[1]) if batch["answer_mask"][b, t]]
            width = batch["base_topk_ids"].shape[1]  # left-padded like the answer positions
            for j, t in enumerate(positions):
                top = batch["base_topk_ids"][b, width - len(positions) + j]
                p, q = without_confidence(base_lp[b, t]), without_confidence(tuned_lp[b, t])
                p_top, q_top = p[top], q[top]
                p_rest, q_rest = 1 - p_top.sum(), 1 - q_top.sum()
                total += float((p_top * (p_top / q_top).log()).sum() + p_rest * (p_rest / q_rest).log())
                n += 1
        assert n == int(batch["answer_mask"].sum()) and total / n > 1e-3
        assert small.kl.item() == pytest.approx(total / n, rel=1e-2)  # fp16 storage of the base's log-probabilities

    def test_reference_is_the_base_model_with_the_adapter_off(self, tmp_path, device):
        """attach_base_topk after the adapter has moved still stores the base model's distribution."""
        model, tok, ds, ids = _setup(tmp_path, device)
        conf = sorted(ids.values())
        vocab = model.get_output_embeddings().weight.shape[0]
        _perturb(model)
        model.train()
        attach_base_topk(ds, model, vocab, batch_size=4, progress=False)
        assert model.training  # restored
        batch = _collate(ds, tok, device)
        model.eval()
        assert training_loss(model, batch, confidence_ids=conf, stored_kl_weight=1.0).kl.item() == pytest.approx(
            training_loss(model, batch, confidence_ids=conf, kl_weight=1.0).kl.item(), rel=2e-2, abs=2e-3)

    def test_gradient_flows_and_missing_reference_is_an_error(self, tmp_path, device):
        model, tok, ds, ids = _setup(tmp_path, device)
        conf = sorted(ids.values())
        attach_base_topk(ds, model, 8, batch_size=4, progress=False)
        _perturb(model)
        terms = training_loss(model, _collate(ds, tok, device), confidence_ids=conf, stored_kl_weight=1.0)
        terms.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        with pytest.raises(ValueError, match="confidence token ids"):
            training_loss(model, _collate(ds, tok, device), stored_kl_weight=1.0)
        ds.base_topk = None
        with pytest.raises(KeyError, match="attach_base_topk"):
            training_loss(model, _collate(ds, tok, device), confidence_ids=conf, stored_kl_weight=1.0)
        with pytest.raises(ValueError, match="not both"):
            training_loss(model, _collate(ds, tok, device), confidence_ids=conf, stored_kl_weight=1.0, kl_weight=1.0)


class FreeLogits(torch.nn.Module):
    """A "model" whose logits are a parameter (B, T, V); with its adapter disabled, the base logits it started from."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.base, self.logits, self.off = base, torch.nn.Parameter(base.clone()), False

    def forward(self, *, input_ids, logits_to_keep, **_):
        return types.SimpleNamespace(logits=(self.base if self.off else self.logits)[:, -logits_to_keep:])

    @contextlib.contextmanager
    def disable_adapter(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False


class TestKLLeavesTheConfidenceTokensOut:
    """The base model has no confidence tokens: its new rows are copies of <|im_end|>'s, so it gives each one
    end of turn's probability inside answers. The KL must not hold the tuned model to that mass."""

    CONF = [8, 9, 10, 11]  # of a vocabulary of 12; 8 is the row's token

    def _batch_and_base(self):
        base = torch.zeros(1, 3, 12)  # column 0 predicts answer token 1, column 1 answer token 2, column 2 the token
        base[0, 0, 3], base[0, 0, self.CONF] = 4.0, 3.0  # where the base might end its turn: P(confidence) 0.57
        base[0, 1, 5] = 6.0
        batch = {"input_ids": torch.tensor([[1, 3, 5, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
                 "labels": torch.tensor([[IGNORE_INDEX] * 3 + [8]]), "answer_mask": torch.tensor([[0, 1, 1, 0]])}
        return batch, base

    @pytest.mark.parametrize("kl", ["kl_weight", "stored_kl_weight"])
    def test_placement_drives_misplaced_tokens_to_zero_against_either_kl(self, kl):
        batch, base = self._batch_and_base()
        model = FreeLogits(base)
        if kl == "stored_kl_weight":
            with model.disable_adapter():
                batch["base_topk_ids"], logp = base_topk(model, batch, 32, self.CONF)
            batch["base_topk_logp"] = logp.half()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(400):
            terms = training_loss(model, batch, confidence_ids=self.CONF, placement_weight=1.0, **{kl: 1.0})
            optimizer.zero_grad()
            terms.loss.backward()
            optimizer.step()
        # Over the whole vocabulary the KL held it at half the base's 0.57 (0.28); placement alone gives ~1e-4.
        assert model.logits[0, 0].softmax(-1)[self.CONF].sum().item() < 0.01
        others = [v for v in range(12) if v not in self.CONF]  # the answer's distribution is still the base's
        assert model.logits[0, 0, others].softmax(-1).tolist() == pytest.approx(base[0, 0, others].softmax(-1).tolist(),
                                                                                rel=0.05)  # each, the small ones too

    def test_the_kl_is_that_of_the_other_tokens_renormalised(self):
        batch, base = self._batch_and_base()
        torch.manual_seed(0)
        model = FreeLogits(base)
        with torch.no_grad():
            model.logits.add_(torch.randn_like(base))
        others = [v for v in range(12) if v not in self.CONF]
        p, q = base[0, :2, others].log_softmax(-1), model.logits[0, :2, others].log_softmax(-1)
        expected = (p.exp() * (p - q)).sum(-1).mean().item()
        live = training_loss(model, batch, confidence_ids=self.CONF, kl_weight=1.0).kl.item()
        assert live == pytest.approx(expected, rel=1e-5)
        with torch.no_grad():
            model.logits[..., self.CONF] += 5.0  # the confidence tokens' own logits do not enter it
        assert training_loss(model, batch, confidence_ids=self.CONF, kl_weight=1.0).kl.item() == pytest.approx(expected,
                                                                                                           rel=1e-5)


def test_class_weights_scale_each_row_of_a_mean_over_the_rows(tmp_path, device):
    """Each row's cross-entropy times its class weight, divided by the rows: a batch's weights do not cancel
    (F.cross_entropy's weight= divides by the batch's summed weights: at batch 1 the weights did nothing, and
    C and U did not count equally over an epoch, 0.59 against 1 at batch 8 with 10% U)."""
    model, tok, ds, ids = _setup(tmp_path, device, lora=False)
    batch = _collate(ds, tok, device)
    weights = torch.ones(model.get_output_embeddings().weight.shape[0], device=device)
    weights[ids["<U_READ>"]] = 3.0
    terms = training_loss(model, batch, token_weights=weights)
    plain = training_loss(model, batch)
    per_row = torch.nn.functional.cross_entropy(plain.logits.float(), batch["labels"][:, -1], reduction="none")
    w = weights[batch["labels"][:, -1]]
    assert (w != 1).any() and (w == 1).any()
    assert terms.token.item() == pytest.approx((per_row * w).mean().item(), rel=1e-5)
    one = {k: v[:1] for k, v in batch.items()}  # a batch of one row: its weight counts
    target = one["labels"][0, -1]
    assert training_loss(model, one, token_weights=weights).token.item() == pytest.approx(
        weights[target].item() * training_loss(model, one).token.item(), rel=1e-5)


def test_class_weights_give_c_and_u_half_each_and_leave_a_one_class_domain_at_one(tmp_path):
    from conftok.train import _token_class_weights

    class Rows:  # what _token_class_weights reads of a dataset
        domains = resolve_domains()

        @staticmethod
        def token_counts():
            return {"<C_READ>": 9, "<U_READ>": 1, "<C_MED>": 4}  # medqa: every row confident

    tok = make_tokenizer()
    model = make_model(len(tok) + 4)
    ids = {t: len(tok) + k for k, t in enumerate(resolve_domains().tokens)}
    weights = _token_class_weights(Rows, ids, model, "cpu")
    assert weights[ids["<C_READ>"]].item() == pytest.approx(10 / 18) and weights[ids["<U_READ>"]].item() == 5.0
    assert 9 * weights[ids["<C_READ>"]].item() == pytest.approx(1 * weights[ids["<U_READ>"]].item())  # n / 2 each
    assert weights[ids["<C_MED>"]].item() == 1.0  # was 0.5: half a domain's weight against the others'


def test_train_runs_with_each_guard(tmp_path):
    """train() end to end with the stored KL, the answer CE on right answers and balanced classes."""
    from conftok import TrainConfig, train

    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", feature_rows(24, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "code alpha alpha", "answer": True}] * 4)
    for name, kwargs in {"stored": dict(kl_weight=0.0, stored_kl_weight=1.0, stored_kl_top_k=8),
                         "answer_ce": dict(kl_weight=0.0, answer_ce_weight=1.0, answer_ce_rows="correct",
                                           balance_token_classes=True)}.items():
        cfg = TrainConfig(model_name="tiny", train_data=data, output_dir=str(tmp_path / name), backend="hf",
                          max_steps=3, batch_size=8, eval_steps=None, val_sources={"boolq": val}, bf16=False,
                          gradient_checkpointing=False, progress=False, lora_r=4, lora_alpha=8, logging_steps=1,
                          **kwargs)
        result = train(cfg, model=make_model(len(tok)), tokenizer=make_tokenizer())
        assert result.global_step == 3 and (result.final_dir / "adapter_model.safetensors").is_file()
        # the guard took part: its term was logged, non-zero, and in the loss beside the token's
        logs = tmp_path / name / "logs"
        term = logged_scalars(logs, {"stored": "train/kl", "answer_ce": "train/answer_ce"}[name])
        assert [step for step, _ in term] == [1, 2, 3] and term[-1][1] > 0, term
        loss, token = logged_scalars(logs, "train/loss")[-1][1], logged_scalars(logs, "train/token_loss")[-1][1]
        assert loss > token, (loss, token)


def test_train_in_bf16_with_checkpointing_and_the_defaults(tmp_path):
    """train() as a GPU user runs it: bf16 autocast (LoRA inputs uncast), gradient checkpointing, the
    default guards, left-padded batches; every step finite, the adapter written."""
    from conftok import TrainConfig, train

    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", feature_rows(16, seed=2))
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "code alpha alpha", "answer": True}] * 4)
    cfg = TrainConfig(model_name="tiny", train_data=data, output_dir=str(tmp_path / "out"), backend="hf", max_steps=3,
                      batch_size=8, eval_steps=2, val_sources={"boolq": val}, bf16=True, gradient_checkpointing=True,
                      group_by_length=False, progress=False, lora_r=4, lora_alpha=8, stored_kl_top_k=8, logging_steps=1)
    result = train(cfg, model=make_model(len(tok)), tokenizer=make_tokenizer())
    assert result.global_step == 3 and (result.final_dir / "adapter_model.safetensors").is_file()
    logs = tmp_path / "out" / "logs"  # the default guards took part: placement and the stored KL
    for tag in ("train/placement_loss", "train/kl", "train/loss"):
        assert all(math.isfinite(v) for _, v in logged_scalars(logs, tag)), tag
    assert logged_scalars(logs, "train/placement_loss")[-1][1] > 0 and logged_scalars(logs, "train/kl")[-1][1] > 0


def test_padded_attention_guard_only_acts_on_padded_cuda_batches():
    from contextlib import nullcontext

    from conftok.loss import padded_attention_guard

    assert isinstance(padded_attention_guard(torch.tensor([[0, 1, 1], [1, 1, 1]])), nullcontext)  # CPU: no-op
    if torch.cuda.is_available():
        assert isinstance(padded_attention_guard(torch.ones(2, 3, dtype=torch.long, device="cuda")), nullcontext)
        assert not isinstance(padded_attention_guard(torch.tensor([[0, 1], [1, 1]], device="cuda")), nullcontext)


def test_checkpointed_backward_recomputes_with_the_forwards_attention_kernel(device):
    """A forward under SDPA's math kernel, its backward outside that context: each checkpointed layer is
    recomputed with the math kernel again (CHECKPOINTING_KWARGS), and the gradients are those of the
    same step without checkpointing. Before, torch.utils.checkpoint stopped with "Recomputed values ...
    have different metadata" (the CPU's flash kernel, like CUDA's fused ones, saves other tensors)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from conftok.modeling import build_model

    grads = {}
    for checkpointing in (True, False):
        tok = make_tokenizer()
        model, tok = build_model(make_model(len(tok), seed=3, device=device), tokenizer=tok, backend="hf", bf16=False,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=checkpointing,
                                 device=device)
        model.train()
        ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with sdpa_kernel([SDPBackend.MATH]):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).logits
        logits[:, -1].float().logsumexp(-1).mean().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_padded_bf16_batch_gives_finite_gradients_on_cuda(tmp_path, device):
    """Left-padded rows (fully masked padding queries) in bf16 with SDPA: forward and backward finite."""
    if torch.device(device).type != "cuda":
        pytest.skip("needs CUDA (make test-gpu)")
    from conftok.loss import padded_attention_guard
    from conftok.modeling import build_model

    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), seed=7), tokenizer=tok, backend="hf", bf16=True, lora_r=4,
                             lora_alpha=8, gradient_checkpointing=True, device=device)
    ids = add_confidence_tokens(tok, model, resolve_domains().tokens)
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", _rows()), tok)
    batch = _collate(ds, tok, device)
    assert (batch["attention_mask"] == 0).any()
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16), padded_attention_guard(batch["attention_mask"]):
        terms = training_loss(model, batch, confidence_ids=sorted(ids.values()), placement_weight=1.0, kl_weight=1.0)
    terms.loss.backward()  # outside the guard, as a user's own loop would: the recomputation keeps the math kernel
    assert torch.isfinite(terms.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_train_stops_on_a_non_finite_gradient_before_updating(tmp_path, monkeypatch):
    """A finite loss whose backward gives NaN stops the run naming the step; nothing is applied or saved."""
    from conftok import TrainConfig, train
    from conftok import modeling

    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", feature_rows(24, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "code alpha alpha", "answer": True}] * 4)
    cfg = TrainConfig(model_name="tiny", train_data=data, output_dir=str(tmp_path / "run"), backend="hf", max_steps=3,
                      batch_size=8, eval_steps=None, val_sources={"boolq": val}, bf16=False,
                      gradient_checkpointing=False, progress=False, lora_r=4, lora_alpha=8)
    real_build = modeling.build_model

    def poisoned_build(*args, **kwargs):
        model, tokenizer = real_build(*args, **kwargs)
        lora = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
        lora.register_hook(lambda grad: grad * float("nan"))
        return model, tokenizer

    import importlib

    monkeypatch.setattr(importlib.import_module("conftok.train"), "build_model", poisoned_build)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1"):
        train(cfg, model=make_model(len(tok)), tokenizer=make_tokenizer())
    assert not (tmp_path / "run" / "final").exists()


def test_an_answer_of_the_full_budget_still_gets_its_token(tokenizer):
    """Tagging cuts answers at max_new_tokens and trains the token after them: validation must give the
    token its own step after an answer that long, or such rows could never show a token."""
    from conftok.evaluate import evaluate

    add_confidence_tokens(tokenizer, None, resolve_domains().tokens)
    token_id = tokenizer.convert_tokens_to_ids("<C_READ>")
    budget = 4

    model = make_model(len(tokenizer))
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"][-1]
    prompt_len = {}

    def forward_hook(module, args, kwargs, out):
        ids = kwargs["input_ids"]
        key = int(kwargs["attention_mask"].shape[1]) if ids.shape[1] > 1 else None
        logits = torch.full_like(out.logits, -1e4)
        if key is not None:
            prompt_len["n"] = key
        generated = kwargs["attention_mask"].shape[1] - prompt_len["n"]  # tokens generated before this step
        logits[..., token_id if generated >= budget else yes] = 0.0
        out.logits = logits
        return out

    model.register_forward_hook(forward_hook, with_kwargs=True)
    result = evaluate(model, tokenizer, {"boolq": [{"question": "is it", "answer": True}]}, batch_size=1,
                      max_new_tokens=budget, progress=False)
    record = result["records"][0]
    assert record["token"] == "<C_READ>"
    assert record["response"].split() == ["yes"] * budget  # the whole budget, then the token
