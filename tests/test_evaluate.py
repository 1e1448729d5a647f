"""Validation logic: generation, parsing, expected tokens, token accuracy, p_confident."""

import json
import math
import sys

import pytest
import torch
from conftest import approx, make_model, make_tokenizer, pair_probabilities, set_close_pair
from transformers import LlamaConfig, LlamaForCausalLM

from conftok import metrics as M
from conftok.calibration import calibration_error
from conftok.domains import resolve_domains
from conftok.evaluate import evaluate, generate, load_rows, summarize_domain
from conftok.loss import confidence_logits, p_confident
from conftok.prompts import encode_prompt
from conftok.tagging import tag_rows, write_tagged
from conftok.data import read_tagged_rows
from conftok.tokens import add_confidence_tokens

DOMAINS = resolve_domains()


class ScriptedLM(LlamaForCausalLM):
    """A tiny Llama whose next token is forced by the last input token through a lookup table
    (`script`: last id -> next id), so generation is predictable while the real model code,
    KV cache and generate() run unchanged."""

    script: dict[int, int] = {}

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if input_ids is not None:
            last = input_ids[:, -1].tolist()
            for row, tok in enumerate(last):
                if tok in self.script:
                    out.logits[row, -1, self.script[tok]] += 1000.0
        return out


def scripted(tokenizer, device="cpu"):
    """A ScriptedLM on ``device`` with an empty script, its vocabulary the tokenizer's (tokens added)."""
    add_confidence_tokens(tokenizer, None, DOMAINS.tokens)
    torch.manual_seed(0)
    model = ScriptedLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.script = {}
    return model.to(device)


BOOLQ = [
    {"id": "b1", "question": "is the barn red", "passage": "The barn is red.", "answer": True},
    {"id": "b2", "question": "is the barn blue", "passage": "The barn is red.", "answer": False},
    {"id": "b3", "question": "is the river long", "passage": "The river is long.", "answer": True},
]


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def answering(tok, device):
    """``answering(("Yes", "<C_READ>"))``: a scripted model on the suite's device giving that answer."""
    return lambda answers: model_answering(tok, answers, device)


def model_answering(tok, answers, device="cpu"):
    """The model answers each prompt (by its last-but-... unique id) -- we script on the
    generation-prompt's last token, which all prompts share, so one answer for all."""
    model = scripted(tok, device)
    start = encode_prompt(tok, "x")[-1]  # last id of every generation prompt ("\n" after assistant)
    ids = tok(answers[0], add_special_tokens=False)["input_ids"]
    chain = [start] + ids + [tok.convert_tokens_to_ids(answers[1])] if answers[1] else [start] + ids
    for a, b in zip(chain, chain[1:]):
        model.script[a] = b
    if not answers[1]:
        model.script[ids[-1]] = tok.convert_tokens_to_ids("<|im_end|>")
    return model


def first_token_probability(model, tok, prompt, token_id):
    """The probability of ``token_id`` right after ``prompt`` among the tokens other than the confidence tokens
    (generation bars those at the first step), from one forward over the prompt."""
    with torch.no_grad():
        logits = confidence_logits(model, torch.tensor([prompt], device=model.device),
                                   torch.ones(1, len(prompt), dtype=torch.long, device=model.device))[0].float()
    logits[tok.convert_tokens_to_ids(list(DOMAINS.tokens))] = -math.inf
    return torch.softmax(logits, -1)[token_id].item()


class TestValidationLogic:
    def test_answer_yes_with_confident_token(self, tok, answering):
        model = answering(("Yes", "<C_READ>"))
        result = evaluate(model, tok, {"boolq": BOOLQ}, beta=2, batch_size=2, progress=False)
        recs = result["records"]
        assert [r["response"] for r in recs] == ["Yes"] * 3
        assert [r["answer"] for r in recs] == ["yes"] * 3
        assert [r["correct"] for r in recs] == [True, False, True]
        assert [r["expected_token"] for r in recs] == ["<C_READ>", "<U_READ>", "<C_READ>"]
        assert [r["token"] for r in recs] == ["<C_READ>"] * 3
        assert [r["token_correct"] for r in recs] == [True, False, True]
        figures = result["domains"]["read"]
        assert figures["token_accuracy"] == pytest.approx(2 / 3)
        assert figures["answer_accuracy"] == pytest.approx(2 / 3)
        assert figures["token_rate"] == 1.0 and figures["unparsed"] == 0 and figures["n"] == 3
        conf = [r["p_confident"] for r in recs]
        assert figures["calibration_error"] == pytest.approx(calibration_error(conf, [1, 0, 1], beta=2))
        assert result["metrics"][M.VAL_ACCURACY] == pytest.approx(2 / 3)  # one domain: mean = its value
        assert result["metrics"][M.domain_key("read", "token_accuracy")] == pytest.approx(2 / 3)

    def test_p_confident_is_read_after_the_answer(self, tok, answering):
        model = answering(("Yes", "<C_READ>"))
        result = evaluate(model, tok, {"boolq": BOOLQ[:1]}, beta=1, progress=False)
        context = encode_prompt(tok, DOMAINS.by_name("read").build_question(BOOLQ[0])) + \
            tok("Yes", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = confidence_logits(model, torch.tensor([context], device=model.device),
                                       torch.ones(1, len(context), dtype=torch.long, device=model.device))
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        # Generation's cached step against one forward over the whole context: two computations.
        assert result["records"][0]["p_confident"] == approx(p_confident(logits, c, u).item(), model.dtype)

    def test_p_answer_is_the_first_answer_tokens_probability_after_the_prompt(self, tok, device):
        # An unscripted random model: unsaturated probabilities that differ from row to row, in one padded batch.
        model = scripted(tok, device)
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        gens = generate(model, tok, prompts, stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=3,
                        progress=False, score_ids=(c, u))
        seen = [first_token_probability(model, tok, prompt, gen.answer_ids[0]) for prompt, gen in zip(prompts, gens)]
        assert [gen.p_answer for gen in gens] == [approx(p, model.dtype) for p in seen]
        assert max(seen) < 0.5 and len({round(p, 6) for p in seen}) == len(seen)

    def test_p_answer_leaves_out_the_confidence_tokens_the_first_step_cannot_pick(self, tok, device):
        # A trained token can outscore every answer token at the first step, where generation bars it: its
        # probability is no answer's competitor there, so p_answer is taken among the tokens that step could pick.
        model = scripted(tok, device)
        model.script[encode_prompt(tok, "x")[-1]] = tok.convert_tokens_to_ids("<C_READ>")
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        gens = generate(model, tok, prompts, stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=3,
                        progress=False, score_ids=(c, u))
        for prompt, gen in zip(prompts, gens, strict=True):
            assert gen.answer_ids and gen.answer_ids[0] != c  # barred at the first step
            assert gen.p_answer == approx(first_token_probability(model, tok, prompt, gen.answer_ids[0]), model.dtype)
            assert gen.p_answer > 1e-3  # among all tokens, <C_READ>'s +1000 leaves it ~0

    def test_static_cache_gives_the_dynamic_caches_generations(self, tok, device):
        """static_cache=True: one cache shape for every batch (a short batch filled with copies of its last
        row, their outputs dropped); the answers, tokens, p_confident and p_answer are the dynamic cache's.
        On CUDA transformers compiles its decode step (make test-gpu); here it decodes eagerly."""
        from conftok.evaluate import static_cache_length

        model = scripted(tok, device)
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        assert len(prompts) % 2  # batches of 2: the last one is short and filled
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        kwargs = dict(stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=2, progress=False, score_ids=(c, u))
        dynamic = generate(model, tok, prompts, **kwargs)
        static = generate(model, tok, prompts, static_cache=True, **kwargs)
        assert len(static) == len(prompts)
        for a, b in zip(static, dynamic, strict=True):
            assert (a.text, a.answer_ids, a.stop_token, a.finished) == (b.text, b.answer_ids, b.stop_token, b.finished)
            assert a.p_confident == approx(b.p_confident, model.dtype) and a.p_answer == approx(b.p_answer, model.dtype)
        assert static_cache_length(prompts, 4) % 256 == 0 and static_cache_length(prompts, 4) >= max(map(len, prompts)) + 4
        assert static_cache_length([[1] * 253], 3) == 256 and static_cache_length([[1] * 254], 3) == 512
        records = [evaluate(model, tok, {"boolq": BOOLQ}, beta=1, batch_size=2, max_new_tokens=3, progress=False,
                            static_cache=static)["records"] for static in (False, True)]
        assert [r["response"] for r in records[0]] == [r["response"] for r in records[1]]
        assert [r["p_confident"] for r in records[1]] == approx([r["p_confident"] for r in records[0]], model.dtype)

    def test_token_batches_give_the_row_batches_generations(self, tok, device, caplog):
        """batching="tokens", "padding" and "auto" group the rows otherwise (plan_batches); every row's answer,
        token, p_confident and p_answer are what batches of batch_size rows give. With a static cache "tokens"
        keeps batches of batch_size rows (one shape) and says so; an unknown batching is an error."""
        import logging

        from conftok.evaluate import plan_batches

        model = scripted(tok, device)
        rows = [dict(r, passage=r["passage"] * m) for m in (1, 1, 6) for r in BOOLQ]  # short ones and a long tail
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in rows]
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        kwargs = dict(stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=2, progress=False, score_ids=(c, u))
        assert plan_batches(list(map(len, prompts)), 2, "tokens") != plan_batches(list(map(len, prompts)), 2, "rows")
        by_rows = generate(model, tok, prompts, batching="rows", **kwargs)
        for batching in ("tokens", "padding", "auto"):
            for a, b in zip(generate(model, tok, prompts, batching=batching, **kwargs), by_rows, strict=True):
                assert (a.text, a.answer_ids, a.stop_token, a.finished) == (
                    b.text, b.answer_ids, b.stop_token, b.finished)
                assert a.p_confident == approx(b.p_confident, model.dtype)
                assert a.p_answer == approx(b.p_answer, model.dtype)
        records = [evaluate(model, tok, {"boolq": rows}, beta=1, batch_size=2, max_new_tokens=3, progress=False,
                            batching=batching)["records"] for batching in ("rows", "tokens", "padding")]
        assert [r["response"] for r in records[0]] == [r["response"] for r in records[1]] == [
            r["response"] for r in records[2]]
        with caplog.at_level(logging.INFO, logger="conftok.evaluate"):
            static = generate(model, tok, prompts, batching="tokens", static_cache=True, **kwargs)
        assert "one cache shape" in caplog.text and [g.text for g in static] == [g.text for g in by_rows]
        with pytest.raises(ValueError, match="batching must be 'auto' or one of"):
            generate(model, tok, prompts, batching="bytes", **kwargs)

    def test_a_float32_model_under_bf16_autocast_validates_with_the_dynamic_cache(self, tok, device, caplog):
        """A model object passed as it was (float32) and trained with bf16 autocast: a static cache would take
        float32 keys (rotary tables) and bf16 values and stop (index_copy_: Float and BFloat16). It falls back to
        the dynamic cache and says why; the records are the dynamic cache's."""
        import logging

        model = scripted(tok, device)
        assert next(model.parameters()).dtype == torch.float32
        with torch.autocast(device.type, dtype=torch.bfloat16):
            dynamic = evaluate(model, tok, {"boolq": BOOLQ}, beta=1, batch_size=2, max_new_tokens=3, progress=False)
            with caplog.at_level(logging.INFO, logger="conftok.evaluate"):
                static = evaluate(model, tok, {"boolq": BOOLQ}, beta=1, batch_size=2, max_new_tokens=3,
                                  progress=False, static_cache=True)
        assert "static KV cache off" in caplog.text and "float32 under bfloat16 autocast" in caplog.text
        assert [r["response"] for r in static["records"]] == [r["response"] for r in dynamic["records"]]
        assert [r["p_confident"] for r in static["records"]] == [r["p_confident"] for r in dynamic["records"]]
        # The same model in bf16 weights takes the static cache (no reason to refuse it).
        from conftok.evaluate import static_cache_problem

        with torch.autocast(device.type, dtype=torch.bfloat16):
            assert static_cache_problem(model.to(torch.bfloat16)) is None
        assert static_cache_problem(model) is None  # no autocast: one dtype

    def test_a_cut_answer_keeps_the_budget_and_is_scored_from_the_tokens_step(self, tok, device, monkeypatch):
        # "Yes Yes Yes ..." never stops: every row is cut at max_new_tokens, tagging's budget, and is not finished.
        # Its p_confident is read from the token's step, one decode step past the answer (no second forward over
        # the prompt), and equals a forward over the whole prompt + answer; that step's own token is dropped.
        model = scripted(tok, device)
        start = encode_prompt(tok, "x")[-1]
        yes = tok("Yes", add_special_tokens=False)["input_ids"][-1]
        model.script.update({start: yes, yes: yes})

        def no_second_forward(*args, **kwargs):
            raise AssertionError("a cut answer was scored by a second forward over the prompt")

        monkeypatch.setattr(sys.modules["conftok.evaluate"], "score_confidence", no_second_forward)
        result = evaluate(model, tok, {"boolq": BOOLQ[:2]}, beta=1, max_new_tokens=3, progress=False)
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        for row, record in zip(BOOLQ[:2], result["records"], strict=True):
            assert record["token"] is None
            answer = [yes] * 3  # the answer's budget
            assert tok(record["response"], add_special_tokens=False)["input_ids"] == answer
            context = encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) + answer
            with torch.no_grad():
                logits = confidence_logits(model, torch.tensor([context], device=model.device),
                                           torch.ones(1, len(context), dtype=torch.long, device=model.device))
            assert record["p_confident"] == approx(p_confident(logits, c, u).item(), model.dtype)

    def test_a_generate_that_stops_short_leaves_no_row_unscored(self, tok, device):
        # A backend whose generate returns fewer steps than asked: the cut rows have no step after their
        # answer, and generate scores them by a forward over prompt + answer instead.
        model = scripted(tok, device)
        start = encode_prompt(tok, "x")[-1]
        yes = tok("Yes", add_special_tokens=False)["input_ids"][-1]
        model.script.update({start: yes, yes: yes})
        full_generate = model.generate
        model.generate = lambda **kw: full_generate(**{**kw, "max_new_tokens": kw["max_new_tokens"] - 1})
        result = evaluate(model, tok, {"boolq": BOOLQ[:2]}, beta=1, max_new_tokens=3, progress=False)
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        for row, record in zip(BOOLQ[:2], result["records"], strict=True):
            context = encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) + [yes] * 3
            with torch.no_grad():
                logits = confidence_logits(model, torch.tensor([context], device=model.device),
                                           torch.ones(1, len(context), dtype=torch.long, device=model.device))
            assert record["p_confident"] == approx(p_confident(logits, c, u).item(), model.dtype)

    def test_an_answer_of_the_whole_budget_still_shows_its_token(self, tok, answering):
        # Tagging trains a cut answer's token after max_new_tokens answer ids; validation gives it that step.
        # One budget less, the same answer is cut there and scored where its token would go.
        ids = tok("No it is not", add_special_tokens=False)["input_ids"]
        assert len(set(ids)) == len(ids) > 1
        model = answering(("No it is not", "<C_READ>"))
        whole = evaluate(model, tok, {"boolq": BOOLQ[:1]}, beta=1, max_new_tokens=len(ids), progress=False)
        assert whole["records"][0]["token"] == "<C_READ>" and whole["records"][0]["response"] == "No it is not"
        cut = evaluate(model, tok, {"boolq": BOOLQ[:1]}, beta=1, max_new_tokens=len(ids) - 1, progress=False)
        record = cut["records"][0]
        assert record["token"] is None
        assert tok(record["response"], add_special_tokens=False)["input_ids"] == ids[:-1]
        context = encode_prompt(tok, DOMAINS.by_name("read").build_question(BOOLQ[0])) + ids[:-1]
        with torch.no_grad():
            logits = confidence_logits(model, torch.tensor([context], device=model.device),
                                       torch.ones(1, len(context), dtype=torch.long, device=model.device))
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        assert record["p_confident"] == approx(p_confident(logits, c, u).item(), model.dtype)

    def test_generation_is_greedy_whatever_the_models_generation_config(self, tok, device):
        # transformers fills what a generate call leaves unset from model.generation_config (Qwen2.5-Instruct's
        # has a repetition penalty): tagging and validation must still take the model's argmax.
        add_confidence_tokens(tok, None, DOMAINS.tokens)
        model = make_model(len(tok), device=device)
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        kwargs = dict(stop_tokens=DOMAINS.tokens, max_new_tokens=6, batch_size=3, progress=False)
        plain = [g.answer_ids for g in generate(model, tok, prompts, **kwargs)]
        ids = torch.tensor([prompts[0]], device=model.device)
        before = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        model.generation_config.repetition_penalty = 5.0
        after = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        assert not torch.equal(before, after)  # the setting does change a call that leaves it unset
        assert [g.answer_ids for g in generate(model, tok, prompts, **kwargs)] == plain

    def test_gradient_checkpointing_comes_back_as_it_was_after_a_generate_that_turns_it_off(self, tok, device):
        """unsloth's generate turns every layer's checkpointing off and back on only for a model it found in training
        mode, which evaluate's is not: a training run's later steps would run without it (out of memory where it
        was needed). evaluate puts the flags back."""
        from conftok.modeling import build_model

        model, tok = build_model(make_model(len(tok), device=device), tokenizer=tok, backend="hf", bf16=False,
                                 lora_r=4, lora_alpha=8, gradient_checkpointing=True, device=device)
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers
        real = model.generate

        def generate_as_unsloth(*args, **kwargs):
            for m in model.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = False
            return real(*args, **kwargs)

        model.generate = generate_as_unsloth
        model.train()
        evaluate(model, tok, {"boolq": BOOLQ[:2]}, max_new_tokens=2, batch_size=2, progress=False, merge=False)
        assert model.training and all(m.gradient_checkpointing for m in layers)

    @pytest.mark.parametrize("static_cache", [False, True])
    def test_p_confident_is_read_in_float32_under_bf16(self, tok, static_cache):
        # Large, close C and U logits in a bf16 model: the head's bf16 output is rounded in steps of 0.125 at
        # 16-32, which moves p(C) / (p(C) + p(U)) by up to 0.03. p_confident is the float32 product of the hidden
        # state the head got and its two rows, with a static KV cache too (a speed setting must not change it).
        add_confidence_tokens(tok, None, DOMAINS.tokens)
        model = make_model(len(tok), tie=False)
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        set_close_pair(model.lm_head.weight, (c, u))
        model = model.to(torch.bfloat16)
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        gens = generate(model, tok, prompts, stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=1,
                        progress=False, score_ids=(c, u), static_cache=static_cache)
        assert "forward" not in model.lm_head.__dict__  # the head as it was
        exact, rounded = pair_probabilities(model, prompts, gens, (c, u))
        assert [g.p_confident for g in gens] == [pytest.approx(p, abs=2e-3) for p in exact]
        assert max(abs(a - b) for a, b in zip(rounded, exact)) > 4e-3  # what reading the rounded logits gives
        with torch.inference_mode():  # no autograd for the head's rows there: the rounded logits, no error
            again = generate(model, tok, prompts, stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=1,
                             progress=False, score_ids=(c, u), static_cache=static_cache)
        assert [g.p_confident for g in again] == [pytest.approx(p, abs=1e-6) for p in rounded]

    def test_p_confident_of_a_soft_capped_model_is_the_capped_float32_pair(self, tok):
        # Gemma 2 caps its logits after the head (30 tanh(z / 30)): p_confident is read from the capped float32
        # products, not from the capped rounded logits.
        from transformers import Gemma2Config, Gemma2ForCausalLM

        add_confidence_tokens(tok, None, DOMAINS.tokens)
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, final_logit_softcapping=30.0,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        set_close_pair(model.lm_head.weight, (c, u), seed=0)
        model = model.to(torch.bfloat16)
        prompts = [encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) for row in BOOLQ]
        gens = generate(model, tok, prompts, stop_tokens=DOMAINS.tokens, max_new_tokens=3, batch_size=1,
                        progress=False, score_ids=(c, u))
        exact, rounded = pair_probabilities(model, prompts, gens, (c, u), cap=30.0)
        assert [g.p_confident for g in gens] == [pytest.approx(p, abs=2e-3) for p in exact]
        assert max(abs(a - b) for a, b in zip(rounded, exact)) > 3e-3  # what reading the rounded logits gives

    def test_a_domains_figures_cover_all_its_data_sets(self, tok, answering):
        # A domain may list several data sets; each is validated in turn, and the domain's figures (and the
        # overall ones, and the reliability bins) are over all of them, not the last one's alone.
        domains = resolve_domains([{"name": "read", "datasets": ["boolq", "boolq_hard"], "task": "yes_no",
                                    "confident_token": "<C_READ>", "unconfident_token": "<U_READ>"},
                                   *[d for d in DOMAINS if d.name != "read"]])
        model = answering(("Yes", "<C_READ>"))  # right on every BOOLQ[0] row, wrong on every BOOLQ[1] row
        result = evaluate(model, tok, {"boolq": [BOOLQ[0]] * 3, "boolq_hard": [BOOLQ[1]]}, domains=domains, beta=2,
                          progress=False)
        figures = result["domains"]["read"]
        assert figures["n"] == 4 and figures["token_accuracy"] == figures["answer_accuracy"] == 0.75
        assert result["metrics"][M.VAL_ACCURACY] == 0.75
        assert sum(b["count"] for b in result["reliability"]["read"]) == 4
        assert figures == summarize_domain(result["records"], beta=2)

    def test_no_token_emitted_counts_as_wrong_but_p_is_still_read(self, tok, answering):
        model = answering(("Yes", None))
        result = evaluate(model, tok, {"boolq": BOOLQ}, beta=3, progress=False)
        recs = result["records"]
        assert len(recs) == len(BOOLQ) and all(r["token"] is None and not r["token_correct"] for r in recs)
        # read where the token would go: right after the answer, where the turn closed instead
        c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
        answer = tok("Yes", add_special_tokens=False)["input_ids"]
        for row, record in zip(BOOLQ, recs, strict=True):
            context = encode_prompt(tok, DOMAINS.by_name("read").build_question(row)) + answer
            with torch.no_grad():
                logits = confidence_logits(model, torch.tensor([context], device=model.device),
                                           torch.ones(1, len(context), dtype=torch.long, device=model.device))
            assert record["p_confident"] == approx(p_confident(logits, c, u).item(), model.dtype)
            assert abs(record["p_confident"] - 0.5) > 1e-3
        assert result["domains"]["read"]["token_rate"] == 0.0
        assert result["domains"]["read"]["token_accuracy"] == 0.0

    def test_another_domains_token_is_counted_as_wrong_domain(self, tok, answering):
        result = evaluate(answering(("Yes", "<C_MED>")), tok, {"boolq": BOOLQ}, beta=3, progress=False)
        assert [r["token"] for r in result["records"]] == ["<C_MED>"] * len(BOOLQ)
        figures = result["domains"]["read"]
        assert figures["wrong_domain_token_rate"] == 1.0 and figures["token_accuracy"] == 0.0
        right = evaluate(answering(("Yes", "<C_READ>")), tok, {"boolq": BOOLQ}, beta=3, progress=False)
        assert right["domains"]["read"]["wrong_domain_token_rate"] == 0.0

    def test_unparseable_answer_is_incorrect_and_counted(self, tok, answering):
        model = answering(("river", "<U_READ>"))
        result = evaluate(model, tok, {"boolq": BOOLQ}, beta=3, progress=False)
        figures = result["domains"]["read"]
        assert figures["unparsed"] == 3 and figures["answer_accuracy"] == 0.0
        assert figures["token_accuracy"] == 1.0  # U is the right token for a wrong answer
        assert math.isnan(figures["auroc"])  # one class only

    def test_overall_is_mean_over_domains(self):
        per_domain = {"read": {"token_accuracy": 0.8, "calibration_error": 0.1, "brier": 0.2, "auroc": 0.7,
                               "answer_accuracy": 0.5, "token_rate": 1.0},
                      "med": {"token_accuracy": 0.4, "calibration_error": 0.3, "brier": 0.2, "auroc": float("nan"),
                              "answer_accuracy": 0.5, "token_rate": 1.0}}
        from conftok.evaluate import flatten_metrics

        flat = flatten_metrics(per_domain)
        assert flat[M.VAL_ACCURACY] == pytest.approx(0.6)
        assert flat[M.VAL_CALIBRATION_ERROR] == pytest.approx(0.2)
        assert flat[M.VAL_AUROC] == pytest.approx(0.7)  # NaN domains are left out of the mean

    def test_summarize_by_hand(self):
        recs = [
            {"p_confident": 0.9, "correct": True, "token_correct": True, "token": "<C_MED>", "answer": "A"},
            {"p_confident": 0.2, "correct": False, "token_correct": True, "token": "<U_MED>", "answer": "B"},
            {"p_confident": 0.6, "correct": False, "token_correct": False, "token": None, "answer": None},
            {"p_confident": 0.7, "correct": True, "token_correct": False, "token": "<U_MED>", "answer": "C"},
        ]
        s = summarize_domain(recs, beta=2, p="1")
        assert s["token_accuracy"] == 0.5 and s["token_rate"] == 0.75 and s["unparsed"] == 1
        # sorted conf: .2(0) .6(0) | .7(1) .9(1): bins |0.4-0| and |0.8-1| -> 0.5*0.4 + 0.5*0.2 = 0.3
        assert s["calibration_error"] == pytest.approx(0.3)
        assert s["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.09) / 4)
        assert s["auroc"] == pytest.approx(1.0)

    def test_multiple_choice_domain(self, tok, answering):
        model = answering(("(B)", "<U_MED>"))
        rows = [{"id": "m1", "question": "Which?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "B"},
                {"id": "m2", "question": "Which?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer": "C"}]
        result = evaluate(model, tok, {"medqa": rows}, beta=2, progress=False)
        assert [r["answer"] for r in result["records"]] == ["B", "B"]
        assert [r["token_correct"] for r in result["records"]] == [False, True]

    def test_unknown_dataset_is_an_error(self, tok, answering):
        model = answering(("Yes", "<C_READ>"))
        with pytest.raises(KeyError, match="unknown dataset 'squad'"):
            evaluate(model, tok, {"squad": BOOLQ}, progress=False)

    def test_missing_field_names_the_mapping(self):
        with pytest.raises(ValueError, match="lacks field"):
            DOMAINS.by_name("med").build_question({"question": "Q", "answer": "A"})

    def test_field_mapping_for_other_layouts(self):
        from conftok.domains import Domain

        d = Domain("read", ("boolq",), "<C_READ>", "<U_READ>", "yes_no", fields={"question": "query", "answer": "label"})
        row = {"query": "is it red", "passage": "It is red.", "label": 1}
        assert "Question: is it red?" in d.build_question(row) and d.gold_answer(row) == "yes"

    def test_load_rows_local_formats(self, tmp_path):
        (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in BOOLQ) + "\n")
        assert load_rows(tmp_path / "v.jsonl", limit=2) == BOOLQ[:2]
        (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
        with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
            load_rows(tmp_path / "bad.jsonl")
        with pytest.raises(FileNotFoundError):
            load_rows(tmp_path / "missing.jsonl")


    def test_load_rows_parquet(self, tmp_path):
        datasets = pytest.importorskip("datasets", reason="parquet files are read through datasets")

        datasets.Dataset.from_list(BOOLQ).to_parquet(str(tmp_path / "v.parquet"))
        assert [r["id"] for r in load_rows(str(tmp_path / "v.parquet"))] == ["b1", "b2", "b3"]

    def test_load_rows_from_the_hub_goes_through_datasets(self, monkeypatch):
        datasets = pytest.importorskip("datasets", reason="Hub sources are read through datasets")

        calls = []

        def fake_load_dataset(name, split):
            calls.append((name, split))
            return datasets.Dataset.from_list(BOOLQ)

        monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
        rows = load_rows("huyxdang/boolq-split", split="validation", limit=2)
        assert calls == [("huyxdang/boolq-split", "validation")] and [r["id"] for r in rows] == ["b1", "b2"]


class TestTagging:
    def test_tags_and_summary(self, tok, answering, tmp_path):
        model = answering(("Yes", None))
        tagged, summary = tag_rows(model, tok, {"boolq": BOOLQ}, progress=False)
        assert [t["tagged_response"] for t in tagged] == ["Yes <C_READ>", "Yes <U_READ>", "Yes <C_READ>"]
        assert tagged[0]["question"] == DOMAINS.by_name("read").build_question(BOOLQ[0])
        assert summary["domains"]["boolq"]["accuracy"] == pytest.approx(2 / 3)
        out = write_tagged(tagged, summary, tmp_path / "tagged" / "all.jsonl")
        rows = read_tagged_rows(out)  # what tagging writes, training reads
        assert [r.token for r in rows] == ["<C_READ>", "<U_READ>", "<C_READ>"]
        assert json.loads((tmp_path / "tagged" / "all.summary.json").read_text())["tagged"] == 3
        from conftok.tagging import summary_file

        assert [summary_file(name).name for name in ("t.jsonl", "t.v1", "t.v2")] == [
            "t.summary.json", "t.v1.summary.json", "t.v2.summary.json"]  # each output its own summary

    def test_the_summary_names_unparsed_and_empty_rows_and_is_strict_json(self, tmp_path):
        from conftok.tagging import collect_tagged

        def outcome(**flags):
            return {"tagged": None if flags.get("empty") else {"question": "q", "tagged_response": "x <U_READ>",
                                                               "dataset": "boolq"},
                    "empty": False, "trimmed": False, "unparsed": False, "correct": False, **flags}

        tagged, summary = collect_tagged({"boolq": [outcome(), outcome(unparsed=True), outcome(empty=True),
                                                    outcome(unparsed=True)],
                                          "medqa": [outcome(empty=True)]})
        assert summary["domains"]["boolq"]["unparsed_rows"] == [1, 3] and summary["domains"]["boolq"]["empty_rows"] == [2]
        write_tagged(tagged, summary, tmp_path / "t.jsonl")

        def refuse(constant):
            raise ValueError(f"not JSON: {constant}")

        written = json.loads((tmp_path / "t.summary.json").read_text(), parse_constant=refuse)
        assert written["domains"]["medqa"]["accuracy"] is None  # every response empty: no accuracy, null not NaN

    def test_cut_responses_are_trimmed_to_their_first_sentence(self):
        from conftok.tagging import complete_answer

        assert complete_answer("No, Elena does not. She sold", finished=False) == "No, Elena does not."
        assert complete_answer("No, Elena does not still have", finished=False) == "No, Elena does not still have"
        assert complete_answer("Yes. Because it is.", finished=True) == "Yes. Because it is."
        assert complete_answer("A. Aspirin\nB. Insulin\nC.", finished=False) == "A. Aspirin"  # a letter's period
        assert complete_answer("(C) Penicillin. It treats", finished=False) == "(C) Penicillin."

    @pytest.mark.parametrize("response, tagged, unparsed, trimmed", [
        # The options restated (SmolLM2 does this): no answer, as validation reads it; its first line alone
        # would read as A, right here, and was tagged "A. <C_MED>".
        ("A. aspirin\nB. insulin\nC. penicillin\nD.", "A. aspirin\nB. insulin\nC. penicillin\nD. <U_MED>", 1, 0),
        ("A. The answer is D", "A. The answer is D <C_MED>", 0, 0),  # no sentence end past "A.": kept (was "A.")
        ("A. aspirin. It eases the pain of", "A. aspirin. <C_MED>", 0, 1),  # the same answer trimmed
    ])
    def test_cut_responses_are_judged_whole_as_validation_judges_them(self, tok, monkeypatch, response, tagged,
                                                                      unparsed, trimmed):
        """A response cut at max_new_tokens is right or wrong by what validation reads in it, the whole response;
        it is trimmed to its first sentence only where that keeps the answer."""
        import importlib

        from conftok.evaluate import Generation

        tagging = importlib.import_module("conftok.tagging")
        monkeypatch.setattr(tagging, "generate", lambda model, tokenizer, prompts, **kw: [
            Generation(response, [], None, finished=False) for _ in prompts])
        rows = [{"question": "Which drug for a clot?", "options": {"A": "aspirin", "B": "insulin", "C": "penicillin",
                                                                   "D": "heparin"}, "answer": gold}
                for gold in ("A", "D")]
        outcomes = tagging.tag_dataset(None, tok, "medqa", rows, progress=False)
        gold_a = outcomes[0]
        assert gold_a["tagged"]["tagged_response"] == tagged
        assert (gold_a["unparsed"], gold_a["trimmed"]) == (bool(unparsed), bool(trimmed))
        validation = DOMAINS.for_dataset("medqa").parse_answer(response, rows[0])
        assert gold_a["correct"] == (validation == "A")


class TestPlanBatches:
    """conftok.evaluate.plan_batches: how generate groups its length-sorted prompts."""

    @staticmethod
    def brute_force(lengths, batch_size, batching, decode_steps):
        """The best plan by trying every split of the sorted prompts: its cost, as plan_batches compares them."""
        import itertools

        from conftok.evaluate import DECODE_STEP_POSITIONS, TOKEN_BATCH_ROWS

        sizes = sorted(lengths)
        max_rows = TOKEN_BATCH_ROWS * batch_size if batching == "tokens" else batch_size
        best = None
        for cuts in itertools.product([False, True], repeat=len(sizes) - 1):
            bounds = [0] + [k + 1 for k, cut in enumerate(cuts) if cut] + [len(sizes)]
            groups = [sizes[a:b] for a, b in zip(bounds, bounds[1:])]
            if all(len(g) <= max_rows and (len(g) == 1 or len(g) * g[-1] <= batch_size * sizes[-1]) for g in groups):
                cost = TestPlanBatches.cost(groups, batching, decode_steps * DECODE_STEP_POSITIONS)
                best = cost if best is None else min(best, cost)
        return best

    @staticmethod
    def cost(groups, batching, per_batch):
        positions = sum(len(g) * max(g) for g in groups)
        return (len(groups), positions) if batching == "tokens" else (positions + per_batch * len(groups), 0)

    def test_rows_are_runs_of_batch_size_in_length_order(self):
        from conftok.evaluate import plan_batches

        lengths = [5, 1, 9, 3, 7, 2, 8]
        assert plan_batches(lengths, 3) == [[1, 5, 3], [0, 4, 6], [2]]
        assert plan_batches([], 4) == [] and plan_batches([], 4, "tokens") == [] and plan_batches([], 4, "padding") == []

    @pytest.mark.parametrize("batching", ["tokens", "padding"])
    @pytest.mark.parametrize("seed", range(30))
    def test_the_plan_is_the_best_split_of_the_sorted_prompts(self, seed, batching):
        """"tokens": the fewest batches within the budget, then the least padding; "padding": the least prefill
        positions plus each batch's decode overhead, at most batch_size rows. Checked against every split."""
        import random

        from conftok.evaluate import DECODE_STEP_POSITIONS, TOKEN_BATCH_ROWS, plan_batches

        rng = random.Random(seed)
        lengths = [rng.choice([rng.randint(5, 40), rng.randint(40, 400)]) for _ in range(rng.randint(1, 11))]
        batch_size, steps = rng.randint(1, 4), rng.choice([1, 2, 17])
        plan = plan_batches(lengths, batch_size, batching, decode_steps=steps)
        flat = [i for batch in plan for i in batch]
        assert sorted(flat) == list(range(len(lengths)))  # every prompt once
        assert [lengths[i] for i in flat] == sorted(lengths)  # runs of the length order
        max_rows = TOKEN_BATCH_ROWS * batch_size if batching == "tokens" else batch_size
        for batch in plan:
            assert len(batch) <= max_rows
            assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= batch_size * max(lengths)
        groups = [[lengths[i] for i in b] for b in plan]
        cost = self.cost(groups, batching, steps * DECODE_STEP_POSITIONS)
        assert cost == self.brute_force(lengths, batch_size, batching, steps)
        rows = [[lengths[i] for i in b] for b in plan_batches(lengths, batch_size)]
        assert cost <= self.cost(rows, batching, steps * DECODE_STEP_POSITIONS)  # never worse than "rows"

    def test_short_prompts_share_a_batch_and_the_long_tail_gets_its_own(self):
        from conftok.evaluate import plan_batches

        lengths = [10] * 6 + [100, 100]
        assert [len(b) for b in plan_batches(lengths, 2)] == [2, 2, 2, 2]  # the last holds 10 and 100: 180 padded
        assert [sorted(lengths[i] for i in b) for b in plan_batches(lengths, 2, "tokens")] == [[10] * 6, [100, 100]]
        # "padding" keeps batch_size rows at most: 10 + 100 in one batch would pad 90 positions, more than a batch
        # of one decode step costs (40 positions), less than 17 steps' (680).
        assert [len(b) for b in plan_batches(lengths, 2, "padding", decode_steps=1)] == [2, 2, 2, 2]
        tail = [10, 10, 12, 100]
        assert [sorted(tail[i] for i in b) for b in plan_batches(tail, 2, "padding", decode_steps=1)] == [
            [10, 10], [12], [100]]
        assert [len(b) for b in plan_batches(tail, 2, "padding", decode_steps=17)] == [2, 2]

    def test_auto_is_padding_on_a_cpu_and_rows_elsewhere(self):
        from conftok.evaluate import resolve_batching

        assert resolve_batching("auto", "cpu") == "padding" and resolve_batching("auto", torch.device("cuda", 0)) == "rows"
        assert resolve_batching("auto", "meta") == "rows" and resolve_batching("tokens", "cpu") == "tokens"
        with pytest.raises(ValueError, match="batching must be 'auto' or one of"):
            resolve_batching("bytes", "cpu")

    def test_bad_arguments(self):
        from conftok.evaluate import plan_batches

        with pytest.raises(ValueError, match="batching must be one of"):
            plan_batches([1, 2], 2, "auto")  # resolved by generate, for its device
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            plan_batches([1, 2], 0)
