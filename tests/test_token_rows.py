"""conftok.token_rows: the new tokens' rows computed alone give PEFT's outputs and gradients."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import OpCounter, make_model, make_tokenizer, pair_probabilities, set_close_pair, tolerance

from conftok.modeling import build_model
from conftok.token_rows import TokenRowsOnly, trainable_token_layers


def trained_model(device, tie: bool):
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), tie=tie, seed=5, device=device), tokenizer=tok, backend="hf",
                             bf16=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False,
                             device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the rows and the LoRA update away from their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))
    new_ids = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"])
    ids = torch.tensor([[7, 8, new_ids[0], 9, new_ids[3], 10], [new_ids[1], 11, 12, 13, new_ids[1], new_ids[2]]],
                       device=device)
    return model, tok, ids, new_ids


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().square().mean() + logits[..., -4:].float().sum()).backward()  # the new columns weigh in too
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False])
def test_outputs_and_gradients_are_peft_s_without_rebuilding_the_matrix(device, tie):
    """The embedding's output is PEFT's bit for bit, so every logit but the new tokens' columns is too; those
    columns and every gradient (the rows', LoRA's) agree to the dtype's tolerance. Inside the block no
    ``index_copy`` of a whole matrix runs and no index list is copied to the device (after the first forward,
    which copies each layer's indices once); outside it, PEFT's forward runs again."""
    model, _, ids, new_ids = trained_model(device, tie)
    model.train()
    assert [type(t.base_layer) for t in trainable_token_layers(model)] == [torch.nn.Embedding, torch.nn.Linear]
    rows = TokenRowsOnly(model)
    assert len(rows.layers) == 2
    embed = model.get_base_model().get_input_embeddings()

    peft_logits, peft_grads = forward_backward(model, ids)
    with torch.no_grad():
        peft_embedded = embed(ids)
    with rows:
        forward_backward(model, ids)  # the first forward copies the indices to the device once
        with OpCounter() as ops:
            logits, grads = forward_backward(model, ids)
        with torch.no_grad():
            embedded = embed(ids)
    assert ops.count(torch.ops.aten.index_copy.default) == 0 and ops.lifted == 0, (ops.calls, ops.lifted)
    assert torch.equal(embedded, peft_embedded)
    others = [i for i in range(logits.shape[-1]) if i not in new_ids]
    assert torch.equal(logits[..., others], peft_logits[..., others])
    torch.testing.assert_close(logits, peft_logits, **tolerance(torch.float32))
    assert grads.keys() == peft_grads.keys() and any("trainable_tokens_delta" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, peft_grads[name], **tolerance(torch.float32), msg=name)

    with OpCounter() as outside:  # the block left: PEFT's forward, which rebuilds the matrix
        forward_backward(model, ids)
    assert outside.count(torch.ops.aten.index_copy.default) >= 1
    assert all("forward" not in layer.__dict__ for layer in rows.layers)


def test_a_disabled_adapter_runs_peft_s_own_forward_inside_the_block(device):
    """``model.disable_adapter()`` (the live KL's base pass, the stored KL's reference) gives the base model's
    rows inside the block as outside it; the block nests."""
    model, _, ids, _ = trained_model(device, tie=False)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        tuned = model(input_ids=ids).logits
        rows = TokenRowsOnly(model)
        with rows, rows:
            with model.disable_adapter():
                assert torch.equal(model(input_ids=ids).logits, base)
            inner = model(input_ids=ids).logits
        assert all("forward" not in layer.__dict__ for layer in rows.layers)
    assert not torch.equal(base, tuned)
    torch.testing.assert_close(inner, tuned, **tolerance(torch.float32))


def test_a_training_step_makes_nothing_the_size_of_the_vocabulary_matrix(device, tmp_path):
    """The loss keeps logits at the last positions (a non-contiguous slice of the hidden states, which needs a
    gradient) and the head's weight needs none: the product must stay one 2-D product. torch's matmul runs that
    3-D case as a batched product with the weight copied for every row (seen: 2.5 GB a step for a 7B head at
    batch 8). In a whole step no op makes a tensor as large as the vocabulary matrix; PEFT's forward makes
    several."""
    from conftest import feature_rows, write_jsonl

    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.loss import training_loss

    model, tok, _, new_ids = trained_model(device, tie=False)
    ds = ConfidenceDataset(write_jsonl(tmp_path / "t.jsonl", feature_rows(4)), tok)
    batch = {k: v.to(device) for k, v in ConfidenceCollator(tok.pad_token_id)([ds[i] for i in range(4)]).items()}
    model.train()
    vocab_matrix = max(layer.base_layer.weight.numel() for layer in trainable_token_layers(model))
    sizes = {}
    for name, block in (("peft", lambda: nullcontext()), ("rows", lambda: TokenRowsOnly(model))):
        with block():
            training_loss(model, batch, confidence_ids=new_ids, placement_weight=1.0).loss.backward()
            with OpCounter() as ops:
                training_loss(model, batch, confidence_ids=new_ids, placement_weight=1.0).loss.backward()
        sizes[name] = (ops.largest, ops.largest_read)
        model.zero_grad(set_to_none=True)
    assert sizes["peft"][0] >= vocab_matrix > sizes["rows"][0], (sizes, vocab_matrix)
    assert sizes["rows"][1] <= vocab_matrix, (sizes, vocab_matrix)  # the matrix itself, not a copy per row


def test_unmerged_generation_computes_the_rows_alone_with_peft_s_records(device, monkeypatch):
    """Validation that does not merge (merge=False here; for users, quantized layers or too little free memory)
    generates with the rows computed alone: no decode step rebuilds the embedding or head matrix, and the
    records are those of PEFT's own forward."""
    import importlib

    from conftok.evaluate import evaluate

    evaluate_module = importlib.import_module("conftok.evaluate")  # the module: conftok.evaluate is the function

    model, tok, _, _ = trained_model(device, tie=False)
    model.eval()
    rows = {"boolq": [{"question": f"is {w} a word", "passage": f"{w} is a word.", "answer": k % 2 == 0}
                      for k, w in enumerate(["apple", "stone", "river", "cloud", "tree", "sand"])]}
    runs = {}
    for name in ("peft", "rows"):
        with monkeypatch.context() as patch:
            if name == "peft":
                patch.setattr(evaluate_module, "TokenRowsOnly", lambda model: nullcontext())
            with OpCounter() as ops:
                result = evaluate(model, tok, rows, merge=False, batch_size=4, max_new_tokens=6, progress=False)
        runs[name] = (ops.count(torch.ops.aten.index_copy.default), result["records"])
    assert runs["peft"][0] >= 2 * 7  # PEFT: the embedding and the head rebuilt at every forward (7 steps a batch)
    assert runs["rows"][0] == 0
    for a, b in zip(runs["peft"][1], runs["rows"][1], strict=True):
        assert (a["response"], a["token"]) == (b["response"], b["token"])
        assert b["p_confident"] == pytest.approx(a["p_confident"], abs=1e-5)
    assert not any("forward" in layer.__dict__ for layer in trainable_token_layers(model))  # PEFT's forward back


def test_blocks_of_two_instances_nest(device):
    """generate opens its own block; called inside another (a training step's), leaving it keeps the outer
    block's forward on the layers, and leaving the outer one gives PEFT's back."""
    model, _, ids, _ = trained_model(device, tie=False)
    layers = trainable_token_layers(model)
    outer, inner = TokenRowsOnly(model), TokenRowsOnly(model)
    with outer:
        mine = [layer.__dict__["forward"] for layer in layers]
        with inner:
            # the same objects: one per layer, whichever block sets it (a compiled decode step guards on it)
            assert all(layer.__dict__["forward"] is f for layer, f in zip(layers, mine))
        assert [layer.__dict__["forward"] for layer in layers] == mine
        model(input_ids=ids)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_an_unsloth_shaped_forward_still_gives_the_float32_pair(device):
    """unsloth's CausalLM forward casts the logits back to bf16 after the head, and for a batch of one row and one
    token takes ``torch.mv(lm_head.weight, h)`` without calling the head module. p_confident is still the float32
    product of the hidden state and the trained rows: generate takes the pair the head's forward kept at each step
    where the logits hold it rounded, and gives a one-row batch (``conftok.predict``, a last batch of one) a copy
    of its row, so every step calls the head."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from conftok.domains import resolve_domains
    from conftok.evaluate import generate, head_skipped_for_one_row
    from conftok.prompts import encode_prompt

    model, tok, _, new_ids = trained_model(device, tie=False)
    c, u = new_ids[:2]
    (delta,) = [p for n, p in model.named_parameters() if "lm_head" in n and "trainable_tokens_delta" in n]
    set_close_pair(delta, (0, 1), scale=6.0)  # the trained rows of C and U, the first two new tokens
    model = model.to(torch.bfloat16).eval()
    base = model.get_base_model()

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, logits_to_keep=0, **kwargs):
        weight = self.lm_head.weight  # read at every call, as unsloth does
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        h = out.last_hidden_state
        if h.shape[0] == 1 and h.shape[1] == 1:
            logits = torch.mv(weight, h.ravel()).view(1, 1, -1)
        else:
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return CausalLMOutputWithPast(logits=logits.to(self.dtype), past_key_values=out.past_key_values)

    forward.__module__ = "unsloth.models.llama"
    base.__class__ = type("FastLlamaForCausalLM", (type(base),), {"forward": forward})
    assert head_skipped_for_one_row(model)
    domains = resolve_domains()
    prompts = [encode_prompt(tok, domains.by_name("read").build_question({"question": f"is {w} a word",
                                                                          "passage": f"{w} is a word."}))
               for w in ("apple", "stone", "river")]
    for batch_size in (1, 3):
        gens = generate(model, tok, prompts, stop_tokens=domains.tokens, max_new_tokens=4, batch_size=batch_size,
                        progress=False, score_ids=(c, u))
        exact, rounded = pair_probabilities(base, prompts, gens, (c, u))  # rounded: the forward's bf16 logits
        assert [g.p_confident for g in gens] == [pytest.approx(p, abs=2e-3) for p in exact], batch_size
        assert max(abs(a - b) for a, b in zip(rounded, exact)) > 4e-3  # what the rounded logits would give
