import pytest
import torch
from conftest import make_model

from conftok.domains import DEFAULT_DOMAINS, Domain, resolve_domains
from conftok.tokens import add_confidence_tokens, end_of_turn_token_id

TOKENS = resolve_domains().tokens


class TestSpecialTokens:
    def test_default_tokens(self):
        assert TOKENS == ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
        assert resolve_domains().for_dataset("boolq").name == "read"
        assert resolve_domains().for_dataset("medqa").tokens == ("<C_MED>", "<U_MED>")

    def test_without_tokens_adds_the_default_domains_tokens(self, tokenizer, tiny_model):
        """``add_confidence_tokens(tokenizer, model)``, as first specified: the default domains."""
        eot = end_of_turn_token_id(tokenizer)
        size, rows = len(tokenizer), tiny_model.get_input_embeddings().weight.shape[0]
        ids = add_confidence_tokens(tokenizer, tiny_model)
        assert list(ids) == ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"]
        assert sorted(ids.values()) == list(range(size, size + 4)) and len(tokenizer) == size + 4
        emb = tiny_model.get_input_embeddings().weight
        assert emb.shape[0] == rows + 4 and all(torch.equal(emb[i], emb[eot]) for i in ids.values())
        assert add_confidence_tokens(tokenizer, tiny_model) == ids  # and again: nothing changes
        with pytest.raises(TypeError, match="list of token strings"):
            add_confidence_tokens(tokenizer, tiny_model, "<C_READ>")

    def test_each_token_is_one_id_and_absorbs_the_space(self, tokenizer, tiny_model):
        ids = add_confidence_tokens(tokenizer, tiny_model, TOKENS)
        assert len(set(ids.values())) == 4
        yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
        for token, i in ids.items():
            assert tokenizer(f"Yes {token}", add_special_tokens=False)["input_ids"] == yes + [i]
            assert tokenizer(f"Yes{token}", add_special_tokens=False)["input_ids"] == yes + [i]
        # Without lstrip a lone space token would sit before the token (what we guard against).
        assert len(tokenizer("Yes <|im_end|>", add_special_tokens=False)["input_ids"]) == len(yes) + 2

    def test_lstrip_survives_save_and_reload(self, tokenizer, tiny_model, tmp_path):
        from transformers import AutoTokenizer

        ids = add_confidence_tokens(tokenizer, tiny_model, TOKENS)
        tokenizer.save_pretrained(tmp_path)
        again = AutoTokenizer.from_pretrained(tmp_path)
        yes = again("Yes", add_special_tokens=False)["input_ids"]
        assert again("Yes <U_MED>", add_special_tokens=False)["input_ids"] == yes + [ids["<U_MED>"]]

    def test_rows_start_from_end_of_turn_and_p_is_half(self, tokenizer, tiny_model):
        eot = end_of_turn_token_id(tokenizer)
        assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
        ids = add_confidence_tokens(tokenizer, tiny_model, TOKENS)
        emb = tiny_model.get_input_embeddings().weight
        for i in ids.values():
            assert torch.equal(emb[i], emb[eot])
        logits = tiny_model(torch.tensor([[5, 6, 7]], device=tiny_model.device)).logits[0, -1]
        assert torch.softmax(logits[[ids["<C_READ>"], ids["<U_READ>"]]], -1)[0].item() == pytest.approx(0.5)

    def test_untied_output_rows_are_initialised_too(self, tokenizer, device):
        model = make_model(len(tokenizer), tie=False, device=device)
        eot = end_of_turn_token_id(tokenizer)
        ids = add_confidence_tokens(tokenizer, model, TOKENS)
        head = model.get_output_embeddings().weight
        assert all(torch.equal(head[i], head[eot]) for i in ids.values())

    def test_mean_init(self, tokenizer, tiny_model):
        n = len(tokenizer)
        mean = tiny_model.get_input_embeddings().weight[:n].mean(0).detach().clone()
        ids = add_confidence_tokens(tokenizer, tiny_model, TOKENS, init="mean")
        emb = tiny_model.get_input_embeddings().weight
        assert torch.allclose(emb[ids["<C_MED>"]], mean, atol=1e-6)

    def test_idempotent(self, tokenizer, tiny_model):
        first = add_confidence_tokens(tokenizer, tiny_model, TOKENS)
        with torch.no_grad():
            tiny_model.get_input_embeddings().weight[first["<C_READ>"]] += 1.0  # as if trained
        snapshot = tiny_model.get_input_embeddings().weight.detach().clone()
        size = len(tokenizer)
        again = add_confidence_tokens(tokenizer, tiny_model, TOKENS)
        assert again == first and len(tokenizer) == size
        assert torch.equal(tiny_model.get_input_embeddings().weight, snapshot)

    def test_build_model_sets_the_rows_with_a_tokenizer_that_holds_the_tokens(self, tokenizer, device):
        """A tokenizer reused from an earlier build (a notebook's second ``train(cfg, model=..., tokenizer=...)``)
        already holds the tokens; the fresh base model's rows are still set, not left as whatever its spare rows
        held (Qwen2.5 has spare rows past its tokenizer)."""
        from conftok.modeling import build_model

        eot = end_of_turn_token_id(tokenizer)
        for seed in (1, 2):  # the second build gets the tokenizer the first one extended
            base = make_model(len(tokenizer) + 16, seed=seed, device=device)
            model, tokenizer = build_model(base, tokenizer=tokenizer, backend="hf", bf16=False, lora_r=4,
                                           gradient_checkpointing=False, device=device)
            emb = base.get_input_embeddings().weight
            ids = [tokenizer.convert_tokens_to_ids(t) for t in TOKENS]
            assert all(torch.equal(emb[i], emb[eot]) for i in ids), seed

    def test_never_shrinks_a_larger_matrix(self, tokenizer, device):
        rows = len(tokenizer) + 64  # Qwen2.5: more rows than tokens
        model = make_model(rows, device=device)
        ids = add_confidence_tokens(tokenizer, model, TOKENS)
        assert model.get_input_embeddings().weight.shape[0] == rows
        assert max(ids.values()) < rows

    def test_grows_a_smaller_matrix(self, tokenizer, device):
        model = make_model(len(tokenizer), device=device)
        add_confidence_tokens(tokenizer, model, TOKENS)
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
        assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)

    def test_custom_domain_by_configuration(self, tokenizer, tiny_model, tmp_path):
        law = {"name": "law", "datasets": ["lawqa"], "confident_token": "<C_LAW>", "unconfident_token": "<U_LAW>",
               "task": "multiple_choice"}
        path = tmp_path / "domains.yaml"
        import yaml

        path.write_text(yaml.safe_dump({"domains": [d.to_dict() for d in DEFAULT_DOMAINS] + [law]}))
        domains = resolve_domains(str(path))
        assert domains.for_dataset("lawqa").tokens == ("<C_LAW>", "<U_LAW>")
        ids = add_confidence_tokens(tokenizer, tiny_model, domains.tokens)
        assert len(ids) == 6 and "<U_LAW>" in tokenizer.get_vocab()

    def test_bad_domains_are_reported_together(self):
        with pytest.raises(ValueError, match="task must be one of.*") as e:
            Domain("Law", (), "C_LAW", "C_LAW", "essay")
        msg = str(e.value)
        assert "name must be" in msg and "datasets must" in msg and "confident_token" in msg
        with pytest.raises(ValueError, match="used by domains"):
            resolve_domains([DEFAULT_DOMAINS[0], Domain("other", ("x",), "<C_READ>", "<U_X>", "yes_no")])
        with pytest.raises(ValueError, match="unknown key"):
            resolve_domains([{"name": "x", "datasets": ["x"], "confident_token": "<C_X>",
                              "unconfident_token": "<U_X>", "task": "yes_no", "colour": "red"}])

    def test_real_smollm2_tokenizer(self, smollm2_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        ids = add_confidence_tokens(tok, None, TOKENS)
        yes = tok("Yes", add_special_tokens=False)["input_ids"]
        assert tok("Yes <C_READ>", add_special_tokens=False)["input_ids"] == yes + [ids["<C_READ>"]]
        assert tok.convert_ids_to_tokens(end_of_turn_token_id(tok)) == "<|im_end|>"
