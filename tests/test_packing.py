"""Padding-free batches: the collator's bookkeeping, the kept positions, and the same losses and
gradients as the left-padded path (on the CPU through SDPA/eager attention, which transformers 5.17
keeps apart per packed row from position_ids; with flash-attention on a GPU)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer

from conftok import packing
from conftok.data import IGNORE_INDEX, ConfidenceCollator
from conftok.domains import resolve_domains
from conftok.loss import confidence_token_loss, training_loss
from conftok.modeling import build_model
from conftok.packing import PackedConfidenceCollator, packed_logits, packed_token_loss, packed_training_loss
from conftok.prompts import encode_example
from conftok.tokens import add_confidence_tokens, token_ids

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
CASES = [  # prompts and answers of different lengths, so the padded batch has real padding
    ("Is the sky blue?", "Yes", "<C_READ>"),
    ("Passage: the river runs north through the valley past the old mill. Question: does it run north?", "Yes it does",
     "<U_READ>"),
    ("Which drug is best? A. Aspirin B. Insulin C. Penicillin D. Heparin", "C", "<C_MED>"),
    ("code alpha?", "No no no no no", "<U_READ>"),
]


def example(ids, answer_length):
    input_ids = torch.tensor(ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[-1] = ids[-1]
    answer_mask = torch.zeros_like(input_ids)
    answer_mask[-1 - answer_length:-1] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "answer_mask": answer_mask}


def examples_of(tokenizer, cases=CASES):
    ids = token_ids(tokenizer, resolve_domains().tokens)
    out = []
    for question, answer, token in cases:
        prompt, answer_ids, _ = encode_example(tokenizer, question, answer, ids[token], 512)
        out.append(example(prompt + answer_ids + [ids[token]], len(answer_ids)))
    return out


class TestCollator:
    def test_hand_example(self):
        """The docstring's example: rows of 3 and 2 tokens."""
        batch = PackedConfidenceCollator(pad_token_id=0)([example([5, 6, 7], 1), example([8, 9], 1)])
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
        assert batch["packed_index"].tolist() == [0, 1, 3]
        assert batch["packed_position_ids"].tolist() == [[0, 1, 0]]
        assert batch["cu_seq_lens"].tolist() == [0, 2, 3] and batch["cu_seq_lens"].dtype == torch.int32
        assert int(batch["max_length"]) == 2

    def test_flattened_rows_are_the_inputs_without_their_token(self):
        tokenizer = make_tokenizer()
        add_confidence_tokens(tokenizer, None, resolve_domains().tokens)
        examples = examples_of(tokenizer)
        batch = PackedConfidenceCollator(tokenizer.pad_token_id)(examples)
        padded = ConfidenceCollator(tokenizer.pad_token_id)(examples)
        for key, value in padded.items():  # the padded batch is all there, unchanged
            assert torch.equal(batch[key], value)
        flat = batch["input_ids"][:, :-1].reshape(-1)[batch["packed_index"]]
        assert flat.tolist() == [t for e in examples for t in e["input_ids"][:-1].tolist()]
        lengths = [len(e["input_ids"]) - 1 for e in examples]
        assert batch["packed_position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
        assert batch["cu_seq_lens"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        assert int(batch["max_length"]) == max(lengths)


class RecordingModel:
    """Logits whose value at flat position p is p (all vocabulary entries), and the call's arguments."""

    def __init__(self, vocab=3):
        self.vocab, self.calls = vocab, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        keep = kwargs["logits_to_keep"]
        return SimpleNamespace(logits=keep.float()[None, :, None].expand(1, len(keep), self.vocab))


class TestKeptPositions:
    def batch(self):
        # Inputs (without the token) of 4, 1 and 3 tokens: flat positions 0-3, 4, 5-7.
        return PackedConfidenceCollator(0)([example([1, 2, 3, 4, 9], 1), example([5, 9], 0), example([6, 7, 8, 9], 2)])

    def test_last_position_of_each_row(self):
        model, batch = RecordingModel(), self.batch()
        logits = packed_logits(model, batch, batch["input_ids"][:, :-1], 1)
        assert logits.shape == (3, 1, 3)
        assert logits[:, 0, 0].tolist() == [3, 4, 7]
        call = model.calls[0]
        assert call["attention_mask"] is None and call["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
        assert call["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0, 1, 2]]
        assert call["cu_seq_lens_q"].tolist() == [0, 4, 5, 8] and call["max_length_q"] == 4

    def test_answer_positions_and_short_rows(self):
        model, batch = RecordingModel(), self.batch()
        logits = packed_logits(model, batch, batch["input_ids"][:, :-1], 3)
        assert model.calls[0]["logits_to_keep"].tolist() == [1, 2, 3, 4, 4, 4, 5, 6, 7]
        # Row 1 has one input token: its two leading columns do not exist (padding in the padded path).
        assert logits[..., 0].tolist() == [[1, 2, 3], [0, 0, 4], [5, 6, 7]]

    def test_rejects_an_input_that_is_not_the_batch(self):
        batch = self.batch()
        with pytest.raises(ValueError, match="not the batch's input"):
            packed_logits(RecordingModel(), batch, batch["input_ids"], 1)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def peft_model(request):
    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=1)
    base.config._attn_implementation = request.param
    model, tokenizer = build_model(base, tokenizer=tokenizer, backend="hf", bf16=False, device="cpu",
                                   gradient_checkpointing=False, lora_dropout=0.0)
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapter (and the KL term) matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model, tokenizer


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class TestSameAsPadded:
    def test_token_loss(self, peft_model):
        model, tokenizer = peft_model
        examples = examples_of(tokenizer)
        padded = ConfidenceCollator(tokenizer.pad_token_id)(examples)
        packed = PackedConfidenceCollator(tokenizer.pad_token_id)(examples)
        assert padded["attention_mask"].min() == 0  # there is padding to skip
        loss, logits = confidence_token_loss(model, padded)
        packed_loss, packed_row_logits = packed_token_loss(model, packed)
        torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_row_logits, logits, atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("weights", [{}, {"placement_weight": 1.0}, {"placement_weight": 1.0, "kl_weight": 1.0}])
    def test_training_loss_terms_and_gradients(self, peft_model, weights):
        model, tokenizer = peft_model
        examples = examples_of(tokenizer)
        confidence_ids = sorted(token_ids(tokenizer, resolve_domains().tokens).values())
        results = {}
        for name, collate, loss_fn in [("padded", ConfidenceCollator, training_loss),
                                       ("packed", PackedConfidenceCollator, packed_training_loss)]:
            model.zero_grad()
            terms = loss_fn(model, collate(tokenizer.pad_token_id)(examples), confidence_ids=confidence_ids, **weights)
            terms.loss.backward()
            results[name] = (terms, _grads(model))
        (padded, padded_grads), (packed, packed_grads) = results["padded"], results["packed"]
        for field in ("loss", "token", "placement", "kl"):
            torch.testing.assert_close(getattr(packed, field), getattr(padded, field), atol=1e-5, rtol=1e-5, msg=field)
        if weights:
            assert padded.placement > 0
        if "kl_weight" in weights:
            assert padded.kl > 0
        assert packed_grads.keys() == padded_grads.keys() and padded_grads
        for name, g in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)

    def test_rows_do_not_see_each_other(self, peft_model):
        """A row's token loss is the same packed alone or packed after other rows."""
        model, tokenizer = peft_model
        examples = examples_of(tokenizer)
        collate = PackedConfidenceCollator(tokenizer.pad_token_id)
        _, together = packed_token_loss(model, collate(examples))
        _, alone = packed_token_loss(model, collate(examples[-1:]))
        torch.testing.assert_close(together[-1:], alone, atol=1e-4, rtol=1e-4)


class TestCheck:
    @pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash_attn is installed here")
    def test_without_flash_attn(self):
        with pytest.raises(ValueError, match="needs flash-attention 2, which is not installed"):
            packing.check_padding_free()

    def test_model_without_flash_attention(self, monkeypatch):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a))
        packing.check_padding_free()  # flash_attn "importable", no model to check
        model = make_model(64)
        model.config._attn_implementation = "sdpa"
        with pytest.raises(ValueError, match="attn_implementation='flash_attention_2', got 'sdpa'"):
            packing.check_padding_free(model)

    def test_a_float32_model_without_bf16_autocast(self):
        """flash-attention computes in fp16/bf16 only: said before the first step, not by its kernel there."""
        model = make_model(64)
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="padding_free=True needs bf16=True"):
            packing.check_padding_free(model, bf16=False)
        if HAS_FLASH_ATTN:
            packing.check_padding_free(model.to(torch.bfloat16), bf16=False)  # bf16 weights: fine


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH_ATTN or not torch.cuda.is_available(), reason="needs flash_attn and a CUDA GPU")
def test_flash_attention_packed_equals_padded():
    """The real thing: flash-attention's varlen kernel on the flattened batch, bf16 on CUDA."""
    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=1).to(torch.bfloat16)
    base.config._attn_implementation = "flash_attention_2"
    model, tokenizer = build_model(base, tokenizer=tokenizer, backend="hf", bf16=True, device="cuda",
                                   gradient_checkpointing=False, lora_dropout=0.0)
    packing.check_padding_free(model)
    examples = examples_of(tokenizer)
    confidence_ids = sorted(token_ids(tokenizer, resolve_domains().tokens).values())
    kwargs = dict(confidence_ids=confidence_ids, placement_weight=1.0, kl_weight=1.0)
    to = lambda b: {k: v.to("cuda") for k, v in b.items()}
    padded = training_loss(model, to(ConfidenceCollator(tokenizer.pad_token_id)(examples)), **kwargs)
    packed = packed_training_loss(model, to(PackedConfidenceCollator(tokenizer.pad_token_id)(examples)), **kwargs)
    for field in ("loss", "token", "placement", "kl"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), atol=2e-2, rtol=2e-2, msg=field)


class TestTrain:
    def config(self, tmp_path, name, **kwargs):
        from conftest import feature_rows, write_jsonl

        from conftok import TrainConfig

        rows = feature_rows(24, seed=5)
        for i, row in enumerate(rows):  # lengths that differ, so the padded batches hold padding
            row["question"] = " ".join(["code red farm"] * (i % 5)) + " " + row["question"]
        return TrainConfig(model_name="tiny", train_data=write_jsonl(tmp_path / "train.jsonl", rows),
                           output_dir=str(tmp_path / name), backend="hf", batch_size=4, max_steps=4, eval_steps=None,
                           learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, bf16=False,
                           gradient_checkpointing=False, group_by_length=False, calib_beta=2, eval_batch_size=4,
                           max_new_tokens=2, progress=False, **kwargs)

    def test_padding_free_trains_the_same_adapter(self, tmp_path, monkeypatch):
        """train(padding_free=True) on the CPU through SDPA (the flash-attention check waved through)
        ends on the padded run's adapter: same batches, same losses, same steps."""
        import importlib

        from safetensors.torch import load_file

        train_module = importlib.import_module("conftok.train")
        monkeypatch.setattr(train_module, "check_padding_free", lambda model=None, bf16=True: None)
        val = {"boolq": [{"id": "b0", "question": "is it red", "answer": True}]}
        adapters = {}
        for padding_free in (False, True):
            tokenizer = make_tokenizer()
            model = make_model(len(tokenizer), seed=0)
            model.config._attn_implementation = "sdpa"
            cfg = self.config(tmp_path, f"run-{padding_free}", padding_free=padding_free)
            result = train_module.train(cfg, model=model, tokenizer=tokenizer, val_sets=val)
            adapters[padding_free] = load_file(str(result.final_dir / "adapter_model.safetensors"))
        a, b = adapters[False], adapters[True]
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    @pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash_attn is installed here")
    def test_without_flash_attn_fails_before_loading(self, tmp_path):
        from conftok import train

        cfg = self.config(tmp_path, "run", padding_free=True)
        with pytest.raises(ValueError, match="needs flash-attention 2"):
            train(cfg)  # model_name 'tiny' does not exist: the check comes first

    def test_a_static_cache_is_refused_where_auto_resolves_to_unsloth(self, tmp_path, monkeypatch):
        import dataclasses
        import importlib

        train_module = importlib.import_module("conftok.train")
        monkeypatch.setattr(train_module, "resolve_backend", lambda backend: "unsloth")  # a CUDA box with unsloth
        cfg = dataclasses.replace(self.config(tmp_path, "run"), backend="auto", eval_static_cache=True)
        with pytest.raises(ValueError, match="eval_static_cache=True needs the hf backend"):
            train_module.train(cfg)  # model_name 'tiny' does not exist: the check comes first

    def test_config(self, tmp_path):
        from conftok import ConfigError, TrainConfig

        assert TrainConfig().padding_free is False
        with pytest.raises(ConfigError, match="padding_free=True needs backend 'hf'"):
            TrainConfig(padding_free=True, backend="unsloth")
        # unsloth's generate replaces a static cache with a dynamic one: asked for, it is refused the same way
        with pytest.raises(ConfigError, match="eval_static_cache=True needs backend 'hf'"):
            TrainConfig(eval_static_cache=True, backend="unsloth")
