"""The one-position loss equals the masked full-logits loss, and only the token is supervised."""

import pytest
import torch
from conftest import feature_rows, make_model, make_tokenizer, write_jsonl

from conftok.data import IGNORE_INDEX, ConfidenceCollator, ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.loss import confidence_token_loss, masked_lm_loss, p_confident, position_ids_from_mask
from conftok.tokens import add_confidence_tokens


def _batch(tokenizer, model, tmp_path, n=5, chat=True):
    add_confidence_tokens(tokenizer, model, resolve_domains().tokens)
    path = write_jsonl(tmp_path / "t.jsonl", feature_rows(n, seed=3))
    ds = ConfidenceDataset(path, tokenizer)
    return ConfidenceCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def _full_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    return masked_lm_loss(logits, batch["labels"])


class TestGradientMasking:
    @pytest.mark.parametrize("chat", [True, False])
    def test_one_position_loss_equals_masked_full_loss(self, tmp_path, chat):
        tok = make_tokenizer(chat_template=chat)
        model = make_model(len(tok), seed=1)
        batch = _batch(tok, model, tmp_path, chat=chat)
        lengths = batch["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1  # odd lengths: padding is exercised
        one, _ = confidence_token_loss(model, batch)
        full = _full_loss(model, batch)
        assert one.item() == pytest.approx(full.item(), abs=1e-5)

    def test_equal_on_qwen2_with_untied_head(self, tmp_path, tokenizer):
        model = make_model(len(tokenizer), tie=False, arch="qwen2", seed=2)
        batch = _batch(tokenizer, model, tmp_path)
        one, _ = confidence_token_loss(model, batch)
        assert one.item() == pytest.approx(_full_loss(model, batch).item(), abs=1e-5)

    def test_labels_supervise_only_the_token(self, tokenizer, tiny_model, tmp_path):
        batch = _batch(tokenizer, tiny_model, tmp_path)
        token_ids = set(add_confidence_tokens(tokenizer, tiny_model, resolve_domains().tokens).values())
        labels = batch["labels"]
        assert (labels[:, :-1] == IGNORE_INDEX).all()
        assert all(int(t) in token_ids for t in labels[:, -1])
        assert torch.equal(labels[:, -1], batch["input_ids"][:, -1])

    def test_no_gradient_reaches_prompt_or_answer_positions(self, tokenizer, tiny_model, tmp_path):
        """d loss / d input embedding is zero at every position after the supervised one's input,
        and the loss does not depend on the token's own input embedding (it is never fed)."""
        batch = _batch(tokenizer, tiny_model, tmp_path)
        embeds = tiny_model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        mask = batch["attention_mask"]
        out = tiny_model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1],
                         position_ids=position_ids_from_mask(mask[:, :-1]), logits_to_keep=1)
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], batch["labels"][:, -1])
        loss.backward()
        assert embeds.grad[:, -1].abs().sum() == 0  # the token itself is input nowhere
        assert embeds.grad[mask == 0].abs().sum() == 0  # padding gets nothing
        # Full-logits check: labels at prompt/answer positions are ignored, so perturbing the
        # logits there does not change the loss.
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)).logits.detach().requires_grad_(True)
        masked_lm_loss(logits, batch["labels"]).backward()
        grad_positions = (logits.grad.abs().sum(-1) > 0)
        assert grad_positions[:, -2].all() and grad_positions.sum() == len(logits)

    def test_one_position_gradients_match_full_loss(self, tokenizer, tmp_path):
        model = make_model(len(tokenizer), seed=4)
        batch = _batch(tokenizer, model, tmp_path)
        confidence_token_loss(model, batch)[0].backward()
        one = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        _full_loss(model, batch).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(one[name], p.grad, atol=1e-6), name

    def test_rejects_batches_with_other_supervised_positions(self, tokenizer, tiny_model, tmp_path):
        batch = _batch(tokenizer, tiny_model, tmp_path)
        batch["labels"][0, -2] = 5
        with pytest.raises(AssertionError, match="last position only"):
            confidence_token_loss(tiny_model, batch)


class TestProbabilityExtraction:
    def test_two_token_softmax_equals_ratio_over_full_vocab(self):
        logits = torch.randn(3, 50)
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
        seq = tokenizer("Is the sky blue? Yes", add_special_tokens=False)["input_ids"]
        alone = confidence_logits(tiny_model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
        pad = tokenizer.pad_token_id
        padded = torch.tensor([[pad] * 3 + seq])
        mask = torch.tensor([[0] * 3 + [1] * len(seq)])
        with_pad = confidence_logits(tiny_model, padded, mask)
        a = p_confident(alone, ids["<C_READ>"], ids["<U_READ>"])
        b = p_confident(with_pad, ids["<C_READ>"], ids["<U_READ>"])
        assert a.item() == pytest.approx(b.item(), abs=1e-5)
