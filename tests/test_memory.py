"""gradient_checkpointing='auto': the memory estimate, the decision, and how build_model and train use it."""

import argparse

import pytest
import torch
from conftest import feature_rows, make_model, make_tokenizer, write_jsonl

from conftok import memory
from conftok.config import ConfigError, TrainConfig
from conftok.memory import (ACTIVATION_BYTES_PER_HIDDEN, GPU_ACTIVATION_BYTES_PER_HIDDEN, decide_gradient_checkpointing,
                            estimate_training_memory)
from conftok.modeling import build_model, enable_gradient_checkpointing

GB = 1e9
# Qwen2.5-7B's shape: 7.6e9 parameters, hidden 3584, 28 layers; LoRA r=16 on all seven projections.
QWEN7B = dict(n_params=7.6e9, hidden=3584, layers=28)
QWEN7B_LORA = 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))


class TestEstimate:
    def test_parts_by_hand(self):
        parts = estimate_training_memory(1000, 8, 2, batch=3, seq_len=5, trainable_params=10, vocab_size=100,
                                         kept_positions=2)
        per_layer = ACTIVATION_BYTES_PER_HIDDEN * 8 * 15  # 16-bit: bytes per hidden unit x hidden x tokens
        assert parts["weights"] == 2000
        assert parts["trainable"] == 160
        assert parts["logits"] == 3 * 4 * 3 * 2 * 100
        assert parts["activations_off"] == 2 * per_layer
        assert parts["activations_on"] == 2 * 2 * 8 * 15 + per_layer
        assert parts["total_off"] == 2000 + 160 + 7200 + 2 * per_layer

    def test_fp32_doubles_activations_and_eager_attention_adds_scores(self):
        base = estimate_training_memory(1e6, 64, 2, 4, 100)
        fp32 = estimate_training_memory(1e6, 64, 2, 4, 100, activation_bytes=4)
        assert fp32["activations_off"] == 2 * base["activations_off"]
        eager = estimate_training_memory(1e6, 64, 2, 4, 100, eager_attention_heads=4)
        assert eager["activations_off"] - base["activations_off"] == 2 * (4 + 2) * 4 * 4 * 100 ** 2

    def test_matches_the_measurements_it_was_fitted_to(self):
        # bench/gpu.py, bf16, batch 8, its longest measured batch 351 tokens, checkpointing off: 38.4 GiB on an H100
        # (fused SDPA), 42.4 GiB on an H200 (the math kernel for padded batches, whose scores the estimate adds), with
        # 4.4 GB of token-row matrices PEFT rebuilt then (no longer made). The CUDA estimate lies 10-25% above.
        peft_rows = 4.4 * GB
        for measured_gib, heads in ((38.4, 0), (42.4, 28)):
            qwen = estimate_training_memory(**QWEN7B, batch=8, seq_len=351, trainable_params=QWEN7B_LORA,
                                            vocab_size=152064, eager_attention_heads=heads,
                                            bytes_per_hidden=GPU_ACTIVATION_BYTES_PER_HIDDEN)
            assert 1.10 <= (qwen["total_off"] + peft_rows) / (measured_gib * 2**30) <= 1.25
        # 2-core CPU, SmolLM2-135M bf16, batch 8 x 768: 15.0 GiB resident without (about 1 GiB of it the
        # Python process itself), 3.4 GiB with.
        smol = estimate_training_memory(134.5e6, 576, 30, 8, 768, vocab_size=49152)
        assert 14.0 * 2**30 <= smol["total_off"] <= 15.5 * 2**30


class TestDecide:
    def test_7b_on_an_h100_and_an_h200(self):
        kwargs = dict(**QWEN7B, batch=8, trainable_params=QWEN7B_LORA, vocab_size=152064, eager_attention_heads=28,
                      bytes_per_hidden=GPU_ACTIVATION_BYTES_PER_HIDDEN)  # CUDA, padded batches: the math kernel
        off, reason = decide_gradient_checkpointing(**kwargs, seq_len=351, free_bytes=79 * GB, where="cuda:0")
        assert off is False
        assert reason.startswith("off: ") and "79.0 GB free on cuda:0" in reason and "batch 8 x 351 tokens" in reason
        # The real rows' longest (814 tokens) does not fit 80 GB without checkpointing, but fits an H200's 139 GB free
        # (the CPU's constant, which served CUDA until 2026-11-28, turned checkpointing on there: 1.5x slower steps).
        on, reason = decide_gradient_checkpointing(**kwargs, seq_len=814, free_bytes=79 * GB)
        assert on is True and reason.startswith("on: ") and "with checkpointing" in reason
        assert "does not fit either" not in reason
        assert decide_gradient_checkpointing(**kwargs, seq_len=814, free_bytes=139 * GB)[0] is False
        assert decide_gradient_checkpointing(**{**kwargs, "bytes_per_hidden": ACTIVATION_BYTES_PER_HIDDEN}, seq_len=814,
                                             free_bytes=139 * GB)[0] is True

    def test_margin_is_the_boundary(self):
        need = estimate_training_memory(**QWEN7B, batch=8, seq_len=320)["total_off"]
        assert decide_gradient_checkpointing(**QWEN7B, batch=8, seq_len=320, free_bytes=need / 0.8)[0] is False
        assert decide_gradient_checkpointing(**QWEN7B, batch=8, seq_len=320, free_bytes=need / 0.8 - 1)[0] is True
        assert decide_gradient_checkpointing(**QWEN7B, batch=8, seq_len=320, free_bytes=need, margin=1.0)[0] is False
        with pytest.raises(ValueError, match="margin"):
            decide_gradient_checkpointing(**QWEN7B, batch=8, seq_len=320, free_bytes=need, margin=1.5)

    def test_unknown_or_hopeless(self):
        on, reason = decide_gradient_checkpointing(**QWEN7B, batch=8, seq_len=320, free_bytes=None)
        assert on is True and "unknown" in reason
        on, reason = decide_gradient_checkpointing(**QWEN7B, batch=64, seq_len=2048, free_bytes=79 * GB)
        assert on is True and "does not fit either" in reason


def test_free_memory_on_the_cpu_is_available_ram(monkeypatch):
    free = memory.free_memory(torch.device("cpu"))
    assert free is not None and 0 < free
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert free <= total_kb * 1024
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "psutil"
                        else real_import(name, *a, **k))
    assert memory.free_memory(torch.device("cpu")) == pytest.approx(free, rel=0.2)  # /proc/meminfo


def _tiny():
    tokenizer = make_tokenizer()
    return make_model(len(tokenizer)), tokenizer


@pytest.mark.parametrize("free, expected", [(1e12, False), (1e3, True)])
def test_build_model_auto(monkeypatch, capsys, free, expected):
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    model, tokenizer = _tiny()
    peft_model, _ = build_model(model, tokenizer=tokenizer, backend="hf", bf16=False, device="cpu",
                                gradient_checkpointing="auto", batch_size=4, seq_len=100)
    assert peft_model.get_base_model().is_gradient_checkpointing is expected
    line = capsys.readouterr().out
    assert line.startswith(f"Gradient checkpointing (auto) {'on' if expected else 'off'}: ")
    assert "batch 4 x 100 tokens, 2 layers, hidden 64" in line


def test_build_model_rejects_other_values():
    model, tokenizer = _tiny()
    with pytest.raises(ValueError, match="'yes'"):
        build_model(model, tokenizer=tokenizer, backend="hf", gradient_checkpointing="yes")


def test_auto_counts_lora_before_wrapping_and_trainable_after(monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "decide_gradient_checkpointing",
                        lambda *a, **k: seen.append((a, k)) or (False, "off: test"))
    monkeypatch.setattr(memory, "free_memory", lambda device: 1e9)
    model, tokenizer = _tiny()
    memory.auto_gradient_checkpointing(model, batch_size=2, seq_len=10, lora_r=4, target_modules=("q_proj", "v_proj"))
    # q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads of 16), 2 layers: r x (in + out) each.
    assert seen[-1][1]["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    params = sum(p.numel() for p in model.parameters())
    assert seen[-1][0][:5] == (params, 64, 2, 2, 10)
    assert seen[-1][0][5] == 1e9 + params * 4  # free memory plus the fp32 weights already resident
    peft_model, _ = build_model(model, tokenizer=tokenizer, backend="hf", bf16=False, device="cpu",
                                gradient_checkpointing=False, lora_r=4)
    memory.auto_gradient_checkpointing(peft_model, batch_size=2, seq_len=10)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert seen[-1][1]["trainable_params"] == trainable > 0
    assert seen[-1][1]["bytes_per_hidden"] == ACTIVATION_BYTES_PER_HIDDEN  # the CPU's constant here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_uses_the_gpu_constant_on_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "decide_gradient_checkpointing",
                        lambda *a, **k: seen.append(k) or (False, "off: test"))
    model, _ = _tiny()
    memory.auto_gradient_checkpointing(model.to("cuda"), batch_size=2, seq_len=10, lora_r=4, target_modules=("q_proj",))
    assert seen[-1]["bytes_per_hidden"] == GPU_ACTIVATION_BYTES_PER_HIDDEN


def test_enable_after_wrapping_recomputes_and_matches(monkeypatch):
    """What train() does for 'auto' on the hf backend equals building with checkpointing on."""
    from test_modeling import TRAIN_CASES, batch_of

    from conftok.loss import confidence_token_loss

    grads = {}
    for how in ("build", "after"):
        model, tokenizer = _tiny()
        model, tokenizer = build_model(model, tokenizer=tokenizer, backend="hf", bf16=False, device="cpu",
                                       lora_dropout=0.0, gradient_checkpointing=how == "build")
        if how == "after":
            assert not model.get_base_model().is_gradient_checkpointing
            enable_gradient_checkpointing(model)
        assert model.get_base_model().is_gradient_checkpointing
        mlp = model.get_base_model().model.layers[0].mlp
        count, forward = [], mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda *a, **k: count.append(1) or forward(*a, **k))
        model.train()
        loss, _ = confidence_token_loss(model, batch_of(tokenizer, TRAIN_CASES))
        loss.backward()
        assert len(count) == 2  # forward, then again in backward
        grads[how] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads["build"].keys() == grads["after"].keys() and grads["build"]
    for name, g in grads["build"].items():
        torch.testing.assert_close(g, grads["after"][name], msg=name)


@pytest.mark.parametrize("free, expected", [(1e12, False), (1e3, True)])
def test_train_decides_from_the_longest_row(tmp_path, monkeypatch, capsys, free, expected):
    import importlib

    train_module = importlib.import_module("conftok.train")  # `conftok.train` the attribute is the function
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    enabled = []
    monkeypatch.setattr(train_module, "enable_gradient_checkpointing", lambda model: enabled.append(model))
    model, tokenizer = _tiny()
    path = write_jsonl(tmp_path / "train.jsonl", feature_rows(8, seed=0))
    cfg = TrainConfig(model_name="tiny", train_data=path, output_dir=str(tmp_path / "run"), backend="hf",
                      batch_size=4, max_steps=1, eval_steps=None, bf16=False, calib_beta=2, eval_batch_size=4,
                      max_new_tokens=2, progress=False, placement_weight=0.0, kl_weight=0.0)
    assert cfg.gradient_checkpointing == "auto"  # the default
    val = {"boolq": [{"id": "b0", "question": "is it red", "answer": True}]}
    train_module.train(cfg, model=model, tokenizer=tokenizer, val_sets=val)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Gradient checkpointing (auto)")]
    assert len(lines) == 1  # decided once, after the rows were read, not also in build_model
    from conftok.data import ConfidenceDataset

    longest = max(ConfidenceDataset(path, tokenizer).lengths())
    assert f"batch 4 x {longest} tokens" in lines[0]
    assert len(enabled) == int(expected)


class TestConfigAndFlags:
    def test_config_values(self):
        for value in (True, False, "auto"):
            assert TrainConfig(gradient_checkpointing=value).gradient_checkpointing == value
        with pytest.raises(ConfigError, match="gradient_checkpointing must be true, false or 'auto', got 'on'"):
            TrainConfig(gradient_checkpointing="on")
        with pytest.raises(ConfigError, match="got 1"):
            TrainConfig(gradient_checkpointing=1)

    @pytest.mark.parametrize("argv, expected", [
        ([], "auto"), (["--gradient_checkpointing"], True), (["--no-gradient_checkpointing"], False),
        (["--gradient_checkpointing", "auto"], "auto"), (["--gradient_checkpointing", "true"], True),
        (["--gradient_checkpointing", "False"], False), (["--gradient_checkpointing=off"], False),
    ])
    def test_flag(self, argv, expected):
        from ray_jobs.common import add_config_flags, config_from_args

        parser = argparse.ArgumentParser()
        add_config_flags(parser)
        assert config_from_args(parser.parse_args(argv)).gradient_checkpointing == expected

    def test_bad_flag_value(self, capsys):
        from ray_jobs.common import add_config_flags

        parser = argparse.ArgumentParser()
        add_config_flags(parser)
        with pytest.raises(SystemExit):
            parser.parse_args(["--gradient_checkpointing", "sometimes"])
        assert "expected auto, true or false, got 'sometimes'" in capsys.readouterr().err


@pytest.mark.parametrize("device, compiled, padding_free, expected", [
    ("cuda", False, False, True),  # eager on CUDA: padded batches (nearly all) run SDPA's math kernel
    ("cuda", True, False, True),  # compiled layers: the math kernel for every batch
    ("cuda", False, True, False),  # padding-free: flash-attention, no scores kept
    ("cpu", False, False, False),
    ("cpu", True, False, True),
])
def test_the_memory_estimate_counts_attention_scores_where_the_math_kernel_runs(device, compiled, padding_free,
                                                                               expected):
    """train's gradient_checkpointing="auto" counts (batch, heads, T, T) scores wherever training runs the math
    kernel; eager layers on CUDA were left out, though length-grouped batches are nearly all padded (an H100
    at 2 x 1800 tokens: 66.4 GB estimated against 86.8 GB with the scores)."""
    import importlib

    train_module = importlib.import_module("conftok.train")
    cfg = TrainConfig(padding_free=padding_free)
    assert train_module.math_attention(cfg, torch.device(device), compiled) is expected
