"""The one-position loss equals the masked full-logits loss, and only the token is supervised."""

import pytest
import torch
from conftest import approx, feature_rows, long_answer_rows, make_model, make_tokenizer, to_device, tolerance, write_jsonl

from conftok.data import IGNORE_INDEX, ConfidenceCollator, ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.loss import confidence_token_loss, masked_lm_loss, p_confident, position_ids_from_mask
from conftok.tokens import add_confidence_tokens


def _batch(tokenizer, model, tmp_path, n=5, chat=True, rows=None):
    add_confidence_tokens(tokenizer, model, resolve_domains().tokens)
    path = write_jsonl(tmp_path / "t.jsonl", rows or feature_rows(n, seed=3))
    ds = ConfidenceDataset(path, tokenizer)
    return to_device(ConfidenceCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))]), model.device)


def _full_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    return masked_lm_loss(logits, batch["labels"])


class TestGradientMasking:
    @pytest.mark.parametrize("chat", [True, False])
    def test_one_position_loss_equals_masked_full_loss(self, tmp_path, chat, device):
        tok = make_tokenizer(chat_template=chat)
        model = make_model(len(tok), seed=1, device=device)
        batch = _batch(tok, model, tmp_path, chat=chat)
        lengths = batch["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1  # odd lengths: padding is exercised
        one, _ = confidence_token_loss(model, batch)
        full = _full_loss(model, batch)
        assert one.item() == approx(full.item(), model.dtype)

    def test_equal_on_qwen2_with_untied_head(self, tmp_path, tokenizer, device):
        model = make_model(len(tokenizer), tie=False, arch="qwen2", seed=2, device=device)
        batch = _batch(tokenizer, model, tmp_path)
        one, _ = confidence_token_loss(model, batch)
        assert one.item() == approx(_full_loss(model, batch).item(), model.dtype)

    def test_labels_supervise_only_the_token(self, tokenizer, tiny_model, tmp_path):
        batch = _batch(tokenizer, tiny_model, tmp_path)
        token_ids = set(add_confidence_tokens(tokenizer, tiny_model, resolve_domains().tokens).values())
        labels = batch["labels"]
        assert (labels[:, :-1] == IGNORE_INDEX).all()
        assert all(int(t) in token_ids for t in labels[:, -1])
        assert torch.equal(labels[:, -1], batch["input_ids"][:, -1])

    def test_no_gradient_reaches_prompt_or_answer_positions(self, tokenizer, tiny_model, tmp_path):
        """confidence_token_loss never feeds the token it supervises (its input embeddings stop one short), and
        no gradient reaches a padding position's input."""
        batch = _batch(tokenizer, tiny_model, tmp_path)
        mask = batch["attention_mask"]
        assert (mask == 0).any()  # left padding to check
        fed = []

        def keep(module, args, output):
            output.retain_grad()
            fed.append(output)

        handle = tiny_model.get_input_embeddings().register_forward_hook(keep)
        try:
            confidence_token_loss(tiny_model, batch)[0].backward()
        finally:
            handle.remove()
        (embeds,) = fed
        assert embeds.shape[1] == batch["input_ids"].shape[1] - 1  # the token itself is input nowhere
        assert embeds.grad[mask[:, :-1] == 0].abs().sum() == 0  # padding gets nothing
        assert (embeds.grad[mask[:, :-1] == 1].abs().sum(-1) > 0).all()  # every real position does
        # Full-logits check: labels at prompt/answer positions are ignored, so perturbing the
        # logits there does not change the loss.
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)).logits.detach().requires_grad_(True)
        masked_lm_loss(logits, batch["labels"]).backward()
        grad_positions = (logits.grad.abs().sum(-1) > 0)
        assert grad_positions[:, -2].all() and grad_positions.sum() == len(logits)

    def test_one_position_gradients_match_full_loss(self, tokenizer, tmp_path, device):
        model = make_model(len(tokenizer), seed=4, device=device)
        batch = _batch(tokenizer, model, tmp_path)
        confidence_token_loss(model, batch)[0].backward()
        one = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        _full_loss(model, batch).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(one[name], p.grad, **tolerance(p.dtype), msg=name)

    def test_rejects_batches_with_other_supervised_positions(self, tokenizer, tiny_model, tmp_path):
        batch = _batch(tokenizer, tiny_model, tmp_path)
        batch["labels"][0, -2] = 5
        with pytest.raises(AssertionError, match="last position only"):
            confidence_token_loss(tiny_model, batch)


class TestProbabilityExtraction:
    def test_two_token_softmax_equals_ratio_over_full_vocab(self, device):
        logits = torch.randn(3, 50, device=device)
        p = p_confident(logits, 7, 11)
        full = torch.softmax(logits, -1)
        assert torch.allclose(p, full[:, 7] / (full[:, 7] + full[:, 11]), atol=1e-6)

    def test_hand_values(self):
        logits = torch.zeros(2, 4)
        logits[1, 0] = torch.log(torch.tensor(3.0))  # p(C) = 3 p(U) -> 0.75
        assert p_confident(logits, 0, 1).tolist() == pytest.approx([0.5, 0.75])

    def test_left_padding_does_not_change_p(self, tokenizer, tiny_model):
        from conftok.loss import confidence_logits

        ids = add_confidence_tokens(tokenizer, tiny_model, resolve_domains().tokens)
        # The new rows start as copies of one row (p = 0.5 whatever the input): make C's its own, so p is read
        # from the hidden state that padding or wrong positions would change.
        head = tiny_model.get_output_embeddings().weight
        with torch.no_grad():
            head[ids["<C_READ>"]] += torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0)).to(head)
        seq = tokenizer("Is the sky blue? Yes", add_special_tokens=False)["input_ids"]
        device = tiny_model.device
        alone = confidence_logits(tiny_model, torch.tensor([seq], device=device),
                                  torch.ones(1, len(seq), dtype=torch.long, device=device))
        pad = tokenizer.pad_token_id
        padded = torch.tensor([[pad] * 3 + seq], device=device)
        mask = torch.tensor([[0] * 3 + [1] * len(seq)], device=device)
        with_pad = confidence_logits(tiny_model, padded, mask)
        a = p_confident(alone, ids["<C_READ>"], ids["<U_READ>"])
        b = p_confident(with_pad, ids["<C_READ>"], ids["<U_READ>"])
        assert abs(a.item() - 0.5) > 0.05
        assert a.item() == approx(b.item(), tiny_model.dtype)
        torch.testing.assert_close(with_pad.float(), alone.float(), **tolerance(tiny_model.dtype))


def _long_answer_rows(seed=3):
    return long_answer_rows(seed)


def _brute_force_terms(model, batch, conf_ids, base_model=None):
    """Placement and KL from full logits, row by row, position by position (the slow, obvious way); the KL
    leaves the confidence tokens out."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=position_ids_from_mask(mask)).logits.float()
    base = None
    if base_model is not None:
        with torch.no_grad(), base_model.disable_adapter():
            base = base_model(input_ids=batch["input_ids"], attention_mask=mask,
                              position_ids=position_ids_from_mask(mask)).logits.float()
    placement, kl, n = 0.0, 0.0, 0
    for b in range(len(logits)):
        for t in range(1, logits.shape[1]):
            if not batch["answer_mask"][b, t]:
                continue
            p = torch.softmax(logits[b, t - 1], -1)  # the position that predicts answer token t
            placement = placement - torch.log(1 - p[conf_ids].sum())
            if base is not None:  # over the other tokens, each distribution renormalised there
                others = [v for v in range(logits.shape[-1]) if v not in conf_ids]
                q = torch.softmax(base[b, t - 1, others], -1)
                kl = kl + (q * (q.log() - torch.softmax(logits[b, t - 1, others], -1).log())).sum()
            n += 1
    return placement / n, kl / n


class TestAnswerTerms:
    """The placement and KL terms of training_loss, on the positions that predict the answer."""

    def test_answer_mask_marks_exactly_the_answer(self, tokenizer, tiny_model, tmp_path):
        ds_rows = _long_answer_rows()
        batch = _batch(tokenizer, tiny_model, tmp_path, rows=ds_rows)
        for row, answer_mask, ids, mask in zip(ds_rows, batch["answer_mask"], batch["input_ids"], batch["attention_mask"]):
            assert answer_mask[-1] == 0 and answer_mask[mask == 0].sum() == 0
            answer = tokenizer.decode(ids[answer_mask.bool()])
            assert answer.strip() == row["tagged_response"].rsplit("<", 1)[0].strip()

    def test_zero_weights_equal_the_token_loss(self, tokenizer, tiny_model, tmp_path):
        from conftok.loss import training_loss

        batch = _batch(tokenizer, tiny_model, tmp_path)
        terms = training_loss(tiny_model, batch)
        one, logits = confidence_token_loss(tiny_model, batch)
        assert terms.loss.item() == terms.token.item() == one.item()
        assert terms.placement.item() == terms.kl.item() == 0.0
        assert torch.equal(terms.logits, logits)

    @pytest.mark.parametrize("chat", [True, False])
    def test_placement_equals_brute_force(self, tmp_path, chat, device):
        from conftok.loss import training_loss

        tok = make_tokenizer(chat_template=chat)
        model = make_model(len(tok), seed=5, device=device)
        batch = _batch(tok, model, tmp_path, chat=chat, rows=_long_answer_rows())
        conf_ids = sorted(add_confidence_tokens(tok, model, resolve_domains().tokens).values())
        assert len(set(batch["answer_mask"].sum(1).tolist())) > 1  # answers of different lengths
        terms = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=0.5)
        placement, _ = _brute_force_terms(model, batch, conf_ids)
        assert terms.placement.item() == approx(placement.item(), model.dtype)
        assert terms.token.item() == approx(confidence_token_loss(model, batch)[0].item(), model.dtype)
        assert terms.loss.item() == approx(terms.token.item() + 0.5 * placement.item(), model.dtype)

    def test_placement_step_lowers_the_tokens_inside_answers_only(self, tokenizer, tmp_path, device):
        """A gradient step on the placement term lowers p(confidence token) at the answer positions (which
        positions it reads, the token's own left out, is the brute-force test's, above)."""
        from conftok.loss import training_loss

        model = make_model(len(tokenizer), seed=6, device=device)
        batch = _batch(tokenizer, model, tmp_path, rows=_long_answer_rows())
        conf_ids = sorted(add_confidence_tokens(tokenizer, model, resolve_domains().tokens).values())
        with torch.no_grad():  # make the tokens likely everywhere, as the collapsed adapter did
            model.lm_head.weight[conf_ids] += 2 * model.lm_head.weight.mean(0)
        before = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=1.0)
        before.placement.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        after = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=1.0)
        assert after.placement.item() < 0.9 * before.placement.item()

    def test_kl_is_zero_before_training_and_equals_brute_force_after(self, tmp_path, device):
        from conftok.loss import training_loss
        from conftok.modeling import build_model

        tok = make_tokenizer()
        model, tok = build_model(make_model(len(tok), seed=7), tokenizer=tok, backend="hf", bf16=False,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, device=device)
        path = write_jsonl(tmp_path / "t.jsonl", _long_answer_rows(seed=8))
        ds = ConfidenceDataset(path, tok)
        batch = to_device(ConfidenceCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))]), device)
        conf_ids = sorted(add_confidence_tokens(tok, model, resolve_domains().tokens).values())
        model.eval()
        before = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=1.0, kl_weight=1.0)
        assert before.kl.item() == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0, token rows as the base's
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        after = training_loss(model, batch, confidence_ids=conf_ids, placement_weight=1.0, kl_weight=2.0)
        placement, kl = _brute_force_terms(model, batch, conf_ids, base_model=model)
        assert after.kl.item() > 1e-3
        assert after.kl.item() == pytest.approx(kl.item(), rel=1e-4)
        assert after.placement.item() == pytest.approx(placement.item(), rel=1e-4)
        assert after.loss.item() == pytest.approx(after.token.item() + placement.item() + 2.0 * kl.item(), rel=1e-4)
        after.loss.backward()  # the base forward is gradient-free; the tuned one is not
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    def test_errors(self, tokenizer, tiny_model, tmp_path):
        from conftok.loss import training_loss

        batch = _batch(tokenizer, tiny_model, tmp_path)
        with pytest.raises(ValueError, match=">= 0"):
            training_loss(tiny_model, batch, confidence_ids=[1], placement_weight=-1.0)
        with pytest.raises(ValueError, match="confidence token ids"):
            training_loss(tiny_model, batch, placement_weight=1.0)
        del batch["answer_mask"]
        with pytest.raises(KeyError, match="answer_mask"):
            training_loss(tiny_model, batch, confidence_ids=[1], placement_weight=1.0)

    def test_short_row_beside_a_long_answer_stays_finite(self, device):
        """The kept columns reach into a short row's left padding (fully masked queries there);
        the terms ignore those columns and nothing NaN reaches the loss or the gradients."""
        from conftok.loss import training_loss
        from conftok.modeling import build_model

        tok = make_tokenizer()
        model, tok = build_model(make_model(len(tok), seed=7), tokenizer=tok, backend="hf", bf16=False, lora_r=4,
                                 lora_alpha=8, gradient_checkpointing=False, device=device)
        ids = sorted(add_confidence_tokens(tok, model, resolve_domains().tokens).values())
        examples = []
        for prompt, answer in (([5], [6]), ([5, 6, 7], [8] * 30)):
            input_ids = torch.tensor(prompt + answer + [ids[0]])
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[-1] = ids[0]
            answer_mask = torch.zeros_like(input_ids)
            answer_mask[len(prompt):-1] = 1
            examples.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                             "answer_mask": answer_mask})
        batch = to_device(ConfidenceCollator(tok.pad_token_id)(examples), device)
        assert batch["attention_mask"][0].sum() < 31  # row 0 is shorter than the 31 kept columns
        model.train()
        terms = training_loss(model, batch, confidence_ids=ids, placement_weight=1.0, kl_weight=1.0)
        terms.loss.backward()
        assert all(torch.isfinite(t) for t in (terms.loss, terms.placement, terms.kl))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_batches_cover_every_row_once_within_the_budget(seed):
    from conftok.loss import token_budget_batches

    gen = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(20, 700, (int(torch.randint(1, 90, (1,), generator=gen)),), generator=gen).tolist())
    batch = int(torch.randint(1, 65, (1,), generator=gen))
    slices = token_budget_batches(lengths, batch)
    assert [i for start, stop in slices for i in range(start, stop)] == list(range(len(lengths)))
    budget = batch * sum(lengths) / len(lengths)
    for start, stop in slices:
        assert 1 <= stop - start <= batch
        assert stop - start == 1 or (stop - start) * lengths[stop - 1] <= budget  # padded tokens: rows x the longest


def test_token_budget_batches_keep_long_rows_from_padding_short_ones():
    from conftok.loss import token_budget_batches

    assert token_budget_batches([100] * 8 + [1000], 16) == [(0, 8), (8, 9)]  # 1,800 padded tokens, not 9,000
    assert token_budget_batches([50] * 10, 4) == [(0, 4), (4, 8), (8, 10)]  # equal lengths: batch_size rows
    assert token_budget_batches([], 4) == []
