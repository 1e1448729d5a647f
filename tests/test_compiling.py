"""Regional compilation (conftok.compiling, TrainConfig.torch_compile): each decoder layer compiled, the
loss and gradients those of the eager model, validation uncompiled, the config's limits.

Compiling costs tens of seconds on a 2-core CPU (inductor builds C++), so the checks share compiles:
one model compiled per test, one or two shapes each."""

from __future__ import annotations

import pytest
import torch

from conftest import (feature_rows, make_model, make_tokenizer, pair_probabilities, record_merges, set_close_pair,
                      to_device, write_jsonl)
from conftok.compiling import compile_layers, compiler_available, decoder_layers, layers_compiled, uncompiled_layers

needs_compiler = pytest.mark.skipif(not compiler_available()[0], reason=compiler_available()[1] or "no compiler")
# A test whose model stays on the CPU whatever the suite's device: inductor's C++ backend, not triton.
needs_cpu_compiler = pytest.mark.skipif(not compiler_available("cpu")[0], reason=compiler_available("cpu")[1] or "no compiler")


def _lora_model(tok, device, seed=3, layers_dropout=0.0):
    from conftok.modeling import build_model

    model, tok = build_model(make_model(len(tok), seed=seed, device=device), tokenizer=tok, backend="hf", bf16=False,
                             lora_r=4, lora_alpha=8, lora_dropout=layers_dropout, gradient_checkpointing=False,
                             device=device)
    return model, tok


def _batch(tok, device, rows=4, seed=0):
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ds = ConfidenceDataset(write_jsonl(Path(tmp) / "t.jsonl", feature_rows(rows, seed=seed)), tok,
                               domains=resolve_domains())
        batch = ConfidenceCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    return to_device(batch, device)


def _loss_and_grads(model, batch, ids):
    from conftok.loss import training_loss

    model.zero_grad(set_to_none=True)
    terms = training_loss(model, batch, confidence_ids=sorted(ids.values()), placement_weight=1.0)
    terms.loss.backward()
    return terms.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_decoder_layers_finds_the_stack_under_peft(device):
    tok = make_tokenizer()
    model, _ = _lora_model(tok, device)
    layers = decoder_layers(model)
    assert layers is model.get_base_model().model.layers and len(layers) == 2
    with pytest.raises(ValueError, match="no stack of decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    assert not layers_compiled(model) and not layers_compiled(torch.nn.Linear(2, 2))


@needs_compiler
def test_compiled_layers_give_the_eager_loss_and_gradients(device):
    """The default guard's loss and every LoRA and token-row gradient, eager against compiled, on a
    left-padded batch (fp32, dropout off); uncompiled_layers brings the eager forward back for the
    block, also when it raises, and the compiled one after."""
    from conftok.domains import resolve_domains
    from conftok.tokens import add_confidence_tokens

    tok = make_tokenizer()
    model, tok = _lora_model(tok, device)
    ids = add_confidence_tokens(tok, model, resolve_domains().tokens)
    batch = _batch(tok, device)
    assert (batch["attention_mask"] == 0).any()  # left padding: the masked-query rows are in the test
    model.train()
    eager_loss, eager_grads = _loss_and_grads(model, batch, ids)

    assert compile_layers(model) == 2 and layers_compiled(model)
    import torch._dynamo

    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    assert limit >= 64  # the layers' variants (mask or none, first layer, static then dynamic) stay compiled
    compiled_loss, compiled_grads = _loss_and_grads(model, batch, ids)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and any("lora_A" in n for n in compiled_grads)
    for name, g in compiled_grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)

    compiled_impls = [layer._compiled_call_impl for layer in decoder_layers(model)]
    with pytest.raises(KeyError):
        with uncompiled_layers(model):
            assert not layers_compiled(model)
            raise KeyError("inside the block")
    assert [layer._compiled_call_impl for layer in decoder_layers(model)] == compiled_impls
    assert compile_layers(model) == 2  # again: the compiled layers are kept, not wrapped twice
    assert [layer._compiled_call_impl for layer in decoder_layers(model)] == compiled_impls


@needs_compiler
def test_train_with_torch_compile(tmp_path):
    """train(torch_compile=True): bf16 autocast, gradient checkpointing (each compiled layer recomputed in the
    backward) and the default guards over batches of two lengths,
    a validation in between (layers uncompiled for generation), every step finite, the adapter written,
    and the layers compiled when it returns."""
    from conftok import TrainConfig, train

    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", feature_rows(16, seed=2))
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "code alpha alpha", "answer": True}] * 4)
    cfg = TrainConfig(model_name="tiny", train_data=data, output_dir=str(tmp_path / "out"), backend="hf", max_steps=3,
                      batch_size=8, eval_steps=2, val_sources={"boolq": val}, bf16=True, gradient_checkpointing=True,
                      progress=False, lora_r=4, lora_alpha=8, stored_kl_top_k=8, torch_compile=True)
    model = make_model(len(tok))
    result = train(cfg, model=model, tokenizer=make_tokenizer())
    assert result.global_step == 3 and (result.final_dir / "adapter_model.safetensors").is_file()
    assert layers_compiled(model)


@needs_compiler
def test_train_with_compiled_layers_and_a_compiled_decode_step(tmp_path, monkeypatch):
    """train(torch_compile=True, eval_static_cache=True) on a bf16 model, as on CUDA (the decode step's compile
    forced on the CPU): the compiled layers train, each validation runs them uncompiled and generates through
    transformers' compiled decode step (a graph is built in the first), and after the first validation nothing
    compiles again, in training or in the two validations after it."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    import importlib

    from torch.profiler import ProfilerActivity, profile

    from conftok import TrainConfig, train

    train_module = importlib.import_module("conftok.train")  # the module (conftok.train is also the function)
    graphs_after, regions = [], []  # dynamo's graph count when each validation ends; compiled code run in each
    evaluate = train_module.evaluate

    def counting_evaluate(*args, **kwargs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = evaluate(*args, **kwargs)
        graphs_after.append(counters["stats"]["unique_graphs"])
        # The layers run uncompiled in a validation: compiled code run there is the decode step.
        regions.append(sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region")))
        return result

    monkeypatch.setattr(train_module, "evaluate", counting_evaluate)
    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", feature_rows(16, seed=2))
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "code alpha alpha", "answer": True}] * 4)
    cfg = TrainConfig(model_name="tiny", train_data=data, output_dir=str(tmp_path / "out"), backend="hf", max_steps=6,
                      batch_size=8, eval_steps=2, val_sources={"boolq": val}, bf16=True, gradient_checkpointing=False,
                      progress=False, lora_r=4, lora_alpha=8, stored_kl_top_k=8, torch_compile=True,
                      eval_static_cache=True)
    model = make_model(len(tok)).to(torch.bfloat16)
    config = CompileConfig()
    config._compile_all_devices = True
    model.generation_config.compile_config = config
    result = train(cfg, model=model, tokenizer=make_tokenizer())
    assert result.global_step == 6 and len(graphs_after) >= 3
    assert all(n > 0 for n in regions), regions
    assert layers_compiled(model)
    assert graphs_after[1:] == [graphs_after[0]] * (len(graphs_after) - 1)
    assert counters["stats"]["unique_graphs"] == graphs_after[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(backend="unsloth"), "torch_compile=True needs backend 'hf'"),
    (dict(padding_free=True), "torch_compile=True and padding_free=True"),
    (dict(quantization="4bit"), "torch_compile=True needs quantization 'none'"),
])
def test_torch_compile_config_limits(overrides, message):
    from conftok.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(torch_compile=True, **overrides)


def test_padded_attention_guard_always():
    from contextlib import nullcontext

    from conftok.loss import padded_attention_guard

    assert isinstance(padded_attention_guard(torch.ones(2, 3, dtype=torch.long), always=True), nullcontext)  # CPU
    if torch.cuda.is_available():
        assert not isinstance(padded_attention_guard(torch.ones(2, 3, dtype=torch.long, device="cuda"), always=True),
                              nullcontext)


def test_torch_compile_must_be_true_false_or_auto():
    from conftok.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="torch_compile must be true, false or 'auto', got 'yes'"):
        TrainConfig(torch_compile="yes")
    assert TrainConfig().torch_compile == "auto"
    TrainConfig(torch_compile="auto", backend="unsloth", quantization="4bit")  # auto just stays off there


def test_compiler_available_answers_for_the_device_asked(monkeypatch):
    """Triton for CUDA, a C++ compiler for the CPU, whatever the machine has besides: a CPU model's compile on a
    GPU box needs the C++ compiler, which the answer for CUDA said nothing about."""
    import shutil
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails
    assert compiler_available("cuda") == (False, "torch.compile on CUDA needs triton (pip install triton)")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compiler_available(torch.device("cpu"))[1].startswith("torch.compile on the CPU needs a C++ compiler")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compiler_available("cpu") == (True, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compiler_available()[0] is False and compiler_available("cpu") == (True, "")


@pytest.mark.parametrize("overrides, device, hf_backend, compiler, expected", [
    (dict(), "cuda", True, (True, ""), (True, "on (auto)")),
    (dict(), "cpu", True, (True, ""), (False, "the model is on cpu")),
    (dict(), "cuda", False, (True, ""), (False, "unsloth backend")),
    (dict(quantization="4bit"), "cuda", True, (True, ""), (False, "4bit quantization")),
    (dict(padding_free=True), "cuda", True, (True, ""), (False, "padding_free")),
    (dict(), "cuda", True, (False, "torch.compile on CUDA needs triton"), (False, "needs triton")),
    (dict(torch_compile=False), "cuda", True, (True, ""), (False, "off (torch_compile=false)")),
    (dict(torch_compile=True), "cpu", True, (True, ""), (True, "on (torch_compile=true)")),
])
@pytest.mark.auto_compile
def test_decide_torch_compile(monkeypatch, overrides, device, hf_backend, compiler, expected):
    """'auto' compiles where it was measured to pay (a model on CUDA, hf, unquantized, padded batches,
    triton there) and says why not elsewhere; true and false are kept."""
    import importlib

    from conftok.config import TrainConfig

    train_module = importlib.import_module("conftok.train")  # conftok.train is also the function
    monkeypatch.setattr(train_module, "compiler_available", lambda device=None: compiler)
    compiled, why = train_module.decide_torch_compile(TrainConfig(**overrides), torch.device(device), hf_backend)
    assert compiled is expected[0] and expected[1] in why


@needs_compiler
@pytest.mark.parametrize("merge", [True, False])
def test_validation_with_a_static_cache_compiles_one_decode_step(device, merge, monkeypatch):
    """evaluate(static_cache=True) as it runs on CUDA, where transformers compiles the decode step (CUDA graphs
    there), forced here on the CPU (CompileConfig._compile_all_devices): the LoRA merged into the
    weights or not (where the merged copies do not fit), two domains of different prompt lengths, validated
    twice. One compiled graph serves all of it, with no graph break (transformers compiles with fullgraph=False,
    which splits the step silently; one cache length for every domain; unmerged, every generate call's token-rows block sets the same forward objects, which the graph
    guards on: new ones made 4 graphs here), and the records are the eager dynamic cache's with the adapter
    unmerged (fp32)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from conftok.demo_data import make_boolq_rows, make_medqa_rows
    from conftok.evaluate import evaluate, static_cache_length

    tok = make_tokenizer()
    model, tok = _lora_model(tok, device)
    with torch.no_grad():  # a trained adapter: merged or not must matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    rows = {"boolq": make_boolq_rows(5, seed=2), "medqa": make_medqa_rows(5, seed=2)}
    # The second domain's longest prompt past 256 tokens: alone, it would take a longer cache than the first's.
    rows["medqa"][0]["question"] = " ".join([rows["medqa"][0]["question"]] * 8)
    kwargs = dict(batch_size=2, max_new_tokens=4, progress=False, beta=1)
    reference = evaluate(model, tok, rows, merge=False, **kwargs)["records"]

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own switch for compiling generate off CUDA (its tests use it)
    model.get_base_model().generation_config.compile_config = config
    before, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    merges = record_merges(monkeypatch)
    for _ in range(2):
        records = evaluate(model, tok, rows, merge=merge, static_cache=True, **kwargs)["records"]
        assert [r["response"] for r in records] == [r["response"] for r in reference]
        assert [r["token"] for r in records] == [r["token"] for r in reference]
        torch.testing.assert_close([r["p_confident"] for r in records], [r["p_confident"] for r in reference],
                                   rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    assert merges == [merge, merge]  # merged where asked: the compiled step ran on the merged copies
    from conftok.prompts import encode_prompt
    from conftok.domains import resolve_domains

    domains = resolve_domains()
    lengths = {name: static_cache_length([encode_prompt(tok, domains.for_dataset(name).build_question(r))
                                          for r in rs], 6) for name, rs in rows.items()}
    assert len(set(lengths.values())) == 2, lengths  # alone, the domains would take caches of two lengths


@needs_cpu_compiler
def test_a_compiled_decode_step_reads_p_confident_in_float32():
    """A bf16 model whose C and U logits are large and close (bf16 rounds them in steps of 0.125): with a static
    KV cache and transformers' compiled decode step (forced on the CPU), p_confident is still the float32
    product of the hidden state and the head's two rows, in one graph for two calls."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from conftok.domains import resolve_domains
    from conftok.evaluate import generate
    from conftok.prompts import encode_prompt
    from conftok.tokens import add_confidence_tokens

    domains = resolve_domains()
    tok = make_tokenizer()
    add_confidence_tokens(tok, None, domains.tokens)
    model = make_model(len(tok), tie=False)
    c, u = tok.convert_tokens_to_ids(["<C_READ>", "<U_READ>"])
    set_close_pair(model.lm_head.weight, (c, u))
    model = model.to(torch.bfloat16)
    config = CompileConfig()
    config._compile_all_devices = True
    model.generation_config.compile_config = config
    rows = [{"question": "is the sky blue", "passage": "The sky is blue."}, {"question": "is water dry", "passage": "No."}]
    prompts = [encode_prompt(tok, domains.by_name("read").build_question(row)) for row in rows]
    before = counters["stats"]["unique_graphs"]
    for _ in range(2):
        gens = generate(model, tok, prompts, stop_tokens=domains.tokens, max_new_tokens=3, batch_size=2,
                        progress=False, score_ids=(c, u), static_cache=True)
        exact, _ = pair_probabilities(model, prompts, gens, (c, u))
        assert [g.p_confident for g in gens] == [pytest.approx(p, abs=2e-3) for p in exact]
    assert counters["stats"]["unique_graphs"] - before == 1
