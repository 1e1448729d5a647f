"""conftok.merged.merged_lora: generation with the LoRA update folded into copies of the weights."""

import logging

import pytest
import torch
from conftest import OpCounter, make_model, make_tokenizer, record_merges, tolerance

from conftok import merged as merged_module
from conftok.evaluate import evaluate
from conftok.merged import merged_lora
from conftok.modeling import build_model
from conftok.token_rows import trainable_token_layers


def lora_model(device, bf16=False):
    """A tiny LoRA model whose adapter is not the identity (B initialised away from 0)."""
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), seed=5, device=device), tokenizer=tok, backend="hf", bf16=bf16,
                             lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, device=device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval(), tok


def snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def assert_untouched(model, before):
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for name, (param, value) in before.items():
        assert now[name] is param, f"{name} is another Parameter object"
        assert torch.equal(param, value), f"{name} changed"


@pytest.mark.parametrize("bf16", [False, True])
def test_merged_forward_equals_the_adapters_and_gives_the_weights_back_bit_for_bit(device, bf16):
    model, _ = lora_model(device, bf16=bf16)
    dtype = next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).dtype
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    before = snapshot(model)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with merged_lora(model, True) as merged:
            in_block = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert merged
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 100 * tolerance(dtype)["atol"]  # the adapter changes the outputs
    torch.testing.assert_close(in_block, unmerged, **tolerance(dtype))
    assert torch.equal(after, unmerged)
    assert_untouched(model, before)


def test_the_merge_is_computed_in_fp32_under_autocast(device):
    """Validation runs under bf16 autocast; the merged weight is still W + B @ A summed in fp32."""
    model, _ = lora_model(device)
    layer = merged_module._lora_layers(model)[0]
    base = layer.get_base_layer()
    expected = base.weight.detach().float() + layer.get_delta_weight("default").float()
    with torch.autocast(device.type, dtype=torch.bfloat16), merged_lora(model, True):
        assert torch.equal(base.weight, expected.to(base.weight.dtype))


def test_a_disabled_adapter_is_not_merged(device):
    """Inside model.disable_adapter() the base model is asked for: merging would bring the adapter back."""
    model, _ = lora_model(device)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
        with merged_lora(model, True) as merged:
            assert not merged
            assert torch.equal(model(input_ids=ids).logits, base)


def test_an_error_inside_the_block_still_restores_the_weights(device):
    model, _ = lora_model(device)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"), merged_lora(model, True):
        raise RuntimeError("inside")
    assert_untouched(model, before)
    assert not any(m.merged for m in merged_module._lora_layers(model))


def test_evaluate_merged_gives_the_unmerged_records(device, tmp_path, monkeypatch):
    """Validation's default (merge='auto') against merge=False: the same answers, tokens and p_confident."""
    model, tok = lora_model(device)
    rows = {"boolq": [{"question": f"is {w} a word", "passage": f"{w} is a word.", "answer": k % 2 == 0}
                      for k, w in enumerate(["apple", "stone", "river", "cloud", "tree", "sand"])]}
    before = snapshot(model)
    merges = record_merges(monkeypatch)
    plain = evaluate(model, tok, rows, merge=False, batch_size=4, max_new_tokens=6, progress=False)
    merged = evaluate(model, tok, rows, batch_size=4, max_new_tokens=6, progress=False)
    assert merges == [False, True]  # the default did merge: else this compares unmerged with unmerged
    assert_untouched(model, before)
    assert len(plain["records"]) == len(rows["boolq"])
    for a, b in zip(plain["records"], merged["records"], strict=True):
        assert (a["response"], a["token"]) == (b["response"], b["token"])
        assert b["p_confident"] == pytest.approx(a["p_confident"], abs=1e-5)


def test_auto_stays_unmerged_when_the_copies_do_not_fit_and_says_why(device, monkeypatch, caplog):
    model, _ = lora_model(device)
    monkeypatch.setattr(merged_module, "free_memory", lambda device: 1024.0)
    with caplog.at_level(logging.INFO, logger="conftok.merged"), merged_lora(model, "auto") as merged:
        assert not merged
        assert not any(m.merged for m in merged_module._lora_layers(model))
    assert "GiB free" in caplog.text
    with merged_lora(model, True) as merged:  # True does not ask about memory
        assert merged


def test_layers_it_cannot_merge_are_left_alone(device):
    model, _ = lora_model(device)
    with merged_lora(model, False) as merged:
        assert not merged
    with merged_lora(make_model(64, device=device), True) as merged:  # no LoRA at all
        assert not merged
    model.merge_adapter()  # PEFT's in-place merge already done
    try:
        assert merged_module._why_not(merged_module._lora_layers(model)) == "the adapter is merged already"
    finally:
        model.unmerge_adapter()
    with pytest.raises(ValueError, match="merge must be"), merged_lora(model, "yes"):
        pass


@pytest.mark.parametrize("tie", [True, False])
def test_the_new_token_rows_are_folded_in_once_and_the_outputs_are_peft_s_bit_for_bit(device, tie):
    """PEFT's trainable-token layer rebuilds the whole embedding (and an untied head) at every forward; inside
    the block each is a plain module holding one copy with the new rows. The rows are copied, not added, so with
    the LoRA update zero (B = 0: W + 0 is W) the logits equal PEFT's exactly, also for inputs holding the new
    tokens; on exit the wrappers and their weights come back."""
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), tie=tie, seed=5, device=device), tokenizer=tok, backend="hf",
                             bf16=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False,
                             device=device)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained rows: away from their initial values
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=gen).to(p.device))
    # PEFT wraps the head too when it is tied (its rows are the embedding's).
    assert [type(t.base_layer) for t in trainable_token_layers(model)] == [torch.nn.Embedding, torch.nn.Linear]
    new_ids = tok.convert_tokens_to_ids(["<C_READ>", "<U_MED>"])
    ids = torch.tensor([[7, 8, new_ids[0], 9, new_ids[1], 10]], device=device)
    inner = model.get_base_model()
    wrapped = {"embed": inner.get_input_embeddings(), "head": inner.get_output_embeddings()}
    before = snapshot(model)

    def copies_in_a_forward():
        with OpCounter() as ops:
            logits = model(input_ids=ids).logits
        return ops.count(torch.ops.aten.index_copy.default), logits

    with torch.no_grad():
        outside, unmerged = copies_in_a_forward()
        with merged_lora(model, True) as merged:
            assert merged
            assert type(inner.get_input_embeddings()) is torch.nn.Embedding
            inside, in_block = copies_in_a_forward()
    assert outside >= 1 and inside == 0
    assert torch.equal(in_block, unmerged)
    assert inner.get_input_embeddings() is wrapped["embed"] and inner.get_output_embeddings() is wrapped["head"]
    assert_untouched(model, before)
