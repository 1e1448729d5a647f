"""Tests for conftok.export / ``python -m ray_jobs.export``: the merged model directory, loaded in a
fresh process with plain transformers (neither conftok nor PEFT imported), answers and scores like
the adapter; it stops at the confidence token; it is written atomically; and what loading the
adapter with plain PEFT takes.

The adapter comes from a 2-layer model (conftest) taught a few steps with the full LM loss on
answer + token, so that its greedy answers end with a confidence token (an untrained random model
stops at once or never emits one, and the stop would go untested).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from test_modeling import EVAL_CASES, TRAIN_CASES, batch_of, save_base

from conftok import export_merged
from conftok.data import IGNORE_INDEX
from conftok.domains import resolve_domains
from conftok.evaluate import generate, score_confidence
from conftok.loss import masked_lm_loss, position_ids_from_mask
from conftok.modeling import METADATA_FILE, build_model, load_adapter, save_adapter
from conftok.prompts import encode_prompt
from conftok.tokens import token_ids

DOMAINS = resolve_domains()
TOKENS = DOMAINS.tokens  # <C_READ>, <U_READ>, <C_MED>, <U_MED>
QUESTIONS = [q for q, _, _ in TRAIN_CASES + EVAL_CASES]
MAX_NEW = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # hidden-64 models gain nothing from threads on a busy 2-core box
    yield
    torch.set_num_threads(before)


def teach(model, batch, steps=30, lr=1e-2):
    """Full LM loss on answer + token (prompt masked): the model learns to answer, then emit a token."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = torch.where(batch["answer_mask"].bool(), batch["input_ids"], batch["labels"])
    assert (labels != IGNORE_INDEX).sum() > len(labels)  # more than the token alone
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits  # (B, T, V)
        masked_lm_loss(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def trained(request, tmp_path_factory, device):
    """A base model directory, an adapter trained on it on the suite's device, and its fp32
    export (merged on that device; the plain loads below run on the CPU)."""
    tmp = tmp_path_factory.mktemp("tied" if request.param else "untied")
    base = save_base(tmp, tie=request.param)
    model, tokenizer = build_model(base, backend="hf", bf16=False, gradient_checkpointing=False, device=device)
    teach(model, batch_of(tokenizer, TRAIN_CASES))
    adapter = save_adapter(model, tokenizer, tmp / "adapter")
    out = export_merged(adapter, tmp / "exported", dtype="fp32", device=device)
    return {"tie": request.param, "base": base, "adapter": adapter, "exported": out, "tmp": tmp, "device": device}


@torch.no_grad()
def adapter_answers(adapter, device):
    """What conftok reads from the adapter: prompt ids, greedy answer ids + the token it stopped
    at, and p_confident for both domains right after the answer."""
    model, tokenizer, domains = load_adapter(adapter, device=device)
    ids = token_ids(tokenizer, domains.tokens)
    prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    gens = generate(model, tokenizer, prompts, stop_tokens=domains.tokens, max_new_tokens=MAX_NEW, progress=False)
    rows = []
    for prompt, g in zip(prompts, gens):
        p = [score_confidence(model, tokenizer, [prompt + g.answer_ids], ids[c], ids[u])[0]
             for c, u in (d.tokens for d in domains)]
        rows.append({"prompt": prompt, "answer": g.answer_ids, "token": g.stop_token, "p_confident": p})
    return rows, ids


# Runs in a fresh interpreter, outside the repository: transformers only.
PLAIN = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_dir, questions, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(out_dir)
model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
pairs = [tokenizer.convert_tokens_to_ids(p) for p in (["<C_READ>", "<U_READ>"], ["<C_MED>", "<U_MED>"])]
stops = model.generation_config.eos_token_id
stops = stops if isinstance(stops, list) else [stops]
rows = []
with torch.no_grad():
    for question in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        n = prompt["input_ids"].shape[1]
        generated = model.generate(**prompt, max_new_tokens=max_new, do_sample=False)[0, n:].tolist()
        # The same request stopping at the base's eos only: what a generation config without the
        # confidence tokens among its eos ids would do.
        runs_on = model.generate(**prompt, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=model.config.eos_token_id)[0, n:].tolist()
        answer = generated[:-1] if generated and generated[-1] in stops else generated
        logits = model(torch.tensor([prompt["input_ids"][0].tolist() + answer])).logits[0, -1]
        rows.append({"prompt": prompt["input_ids"][0].tolist(), "generated": generated, "runs_on": runs_on,
                     "p_confident": [torch.softmax(logits[pair], -1)[0].item() for pair in pairs]})
print(json.dumps({"rows": rows, "dtype": str(model.dtype), "class": type(model).__name__,
                  "imported": {name: name in sys.modules for name in ("conftok", "peft")}}))
"""


def run_plain(code, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


class TestExportedModel:
    def test_fresh_process_without_conftok_or_peft_matches_the_adapter(self, trained):
        expected, ids = adapter_answers(trained["adapter"], trained["device"])
        # Every question's greedy answer ends with a confidence token before MAX_NEW: the stop is tested.
        assert all(r["token"] in TOKENS and 0 < len(r["answer"]) < MAX_NEW - 1 for r in expected), expected

        there = run_plain(PLAIN, str(trained["exported"]), json.dumps(QUESTIONS), str(MAX_NEW), cwd=trained["tmp"])

        assert there["imported"] == {"conftok": False, "peft": False}
        assert there["dtype"] == "torch.float32" and there["class"] == "LlamaForCausalLM"
        for want, got in zip(expected, there["rows"], strict=True):
            assert got["prompt"] == want["prompt"]  # AutoTokenizer + chat template: the same ids
            # Same greedy answer, and plain generate stops at the token (generation_config.json) ...
            assert got["generated"] == want["answer"] + [ids[want["token"]]]
            # ... which it would run past with the base's eos alone.
            assert got["runs_on"][:len(got["generated"])] == got["generated"]
            assert len(got["runs_on"]) > len(got["generated"])
            assert max(abs(a - b) for a, b in zip(got["p_confident"], want["p_confident"])) <= 1e-4
        # p_confident is not trivially 0.5 or saturated somewhere: the comparison has teeth.
        assert any(0.01 < p < 0.99 and abs(p - 0.5) > 1e-3 for r in expected for p in r["p_confident"])

    def test_directory_holds_merged_weights_tokens_and_stop_ids(self, trained):
        out, adapter = trained["exported"], trained["adapter"]
        files = sorted(p.name for p in out.iterdir())
        assert "model.safetensors" in files and "tokenizer.json" in files and METADATA_FILE in files
        assert "adapter_config.json" not in files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp siblings

        ids = json.loads((out / METADATA_FILE).read_text())["token_ids"]
        assert list(ids) == TOKENS
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == max(ids.values()) + 1 == 404  # grown to the tokenizer
        assert config["tie_word_embeddings"] is trained["tie"]
        gen = json.loads((out / "generation_config.json").read_text())
        eos = config["eos_token_id"]
        assert gen["eos_token_id"] == [eos, *ids.values()]  # <|im_end|> is eos and end of turn here
        assert gen["begin_suppress_tokens"] == list(ids.values())

        with safe_open(out / "model.safetensors", "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        assert not [k for k in weights if "lora" in k or "trainable_tokens" in k]
        assert ("lm_head.weight" in weights) is not trained["tie"]  # tied: one matrix saved
        # The trained rows of the new tokens are in the matrices, input and output alike.
        new = list(ids.values())
        embed_rows = next(t for k, t in stored.items() if "embed_tokens" in k and "trainable_tokens" in k)
        assert torch.equal(weights["model.embed_tokens.weight"][new], embed_rows)
        if not trained["tie"]:
            head_rows = next(t for k, t in stored.items() if "lm_head" in k and "trainable_tokens" in k)
            assert torch.equal(weights["lm_head.weight"][new], head_rows)
            assert not torch.equal(head_rows, embed_rows)
        # The old rows are the base's: the tokens' rows are all that changed in the matrices.
        with safe_open(trained["base"] / "model.safetensors", "pt") as f:
            base_embed = f.get_tensor("model.embed_tokens.weight")
        assert torch.equal(weights["model.embed_tokens.weight"][:base_embed.shape[0]], base_embed)
        # LoRA was merged: a projection differs from the base's.
        with safe_open(trained["base"] / "model.safetensors", "pt") as f:
            base_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], base_q)


class TestPlainPeft:
    def test_adapter_needs_the_embeddings_grown_to_the_tokenizer(self, trained):
        """What the README shows: plain PEFT on the plain base fails; grown to the tokenizer, it
        loads and computes what conftok.load_adapter does."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = str(trained["adapter"])
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        base = AutoModelForCausalLM.from_pretrained(trained["base"])
        with pytest.raises(IndexError, match="index 400 is out of bounds for dimension 0 with size 400"):
            PeftModel.from_pretrained(base, adapter)

        base = AutoModelForCausalLM.from_pretrained(trained["base"])
        assert len(tokenizer) == 404 > base.get_input_embeddings().weight.shape[0] == 400
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # never shrink (Qwen2.5 has spare rows)
            base.resize_token_embeddings(len(tokenizer))
        plain = PeftModel.from_pretrained(base, adapter).eval()

        ours, _, _ = load_adapter(trained["adapter"], device="cpu")
        x = torch.tensor([encode_prompt(tokenizer, QUESTIONS[0]) + tokenizer.convert_tokens_to_ids(TOKENS)])
        with torch.no_grad():
            assert torch.allclose(plain(x).logits, ours(x).logits, atol=1e-6, rtol=0)

        # The README's generate call: the answer's budget plus the token's step, stopping at a token and never
        # opening with one (begin_suppress_tokens, as conftok's generation and the export's generation_config)
        from conftok.predict import predict

        stop = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(TOKENS)]
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            out = plain.generate(**prompt, max_new_tokens=17, do_sample=False, eos_token_id=stop,
                                 begin_suppress_tokens=stop[1:])
            text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
            expected = predict(ours, tokenizer, question, "boolq")
            assert text == expected.response + (expected.token or ""), question


class TestExportFiles:
    def test_failure_leaves_nothing_and_existing_output_is_kept(self, trained, tmp_path, monkeypatch):
        from conftok import export

        def fail(directory):
            assert (directory / "model.safetensors").is_file()  # the weights were written when it fails
            raise OSError("disk full")

        monkeypatch.setattr(export, "_make_readable", fail)
        with pytest.raises(OSError, match="disk full"):
            export_merged(trained["adapter"], tmp_path / "out", dtype="fp32")
        assert list(tmp_path.iterdir()) == []  # no out/, no temporary directory

        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        with pytest.raises(OSError, match="disk full"):
            export_merged(trained["adapter"], tmp_path / "out", dtype="fp32", overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

    def test_existing_output_needs_overwrite(self, trained, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export_merged(trained["adapter"], out, dtype="fp32")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        export_merged(trained["adapter"], out, dtype="fp32", overwrite=True)
        assert "model.safetensors" in {p.name for p in out.iterdir()} and not (out / "keep.txt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        (tmp_path / "empty").mkdir()
        export_merged(trained["adapter"], tmp_path / "empty", dtype="fp32")  # an empty directory is fine

    def test_refuses_bad_arguments(self, trained, tmp_path):
        with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'int8'"):
            export_merged(trained["adapter"], tmp_path / "out", dtype="int8")
        with pytest.raises(ValueError, match="inside the adapter directory"):
            export_merged(trained["adapter"], trained["adapter"] / "merged", dtype="fp32")
        assert not (trained["adapter"] / "merged").exists() and not (tmp_path / "out").exists()


class TestExportInputs:
    def test_refuses_an_out_dir_that_holds_the_adapter_or_the_base(self, trained, tmp_path):
        # --overwrite would otherwise replace the adapter's (or the base's) parent directory, deleting it.
        for held in (trained["adapter"], trained["base"]):
            with pytest.raises(ValueError, match="holds the .* directory .*writing there would delete it"):
                export_merged(trained["adapter"], held.parent, dtype="fp32", overwrite=True,
                              base_model=trained["base"])
        assert (trained["adapter"] / "adapter_model.safetensors").is_file()
        assert (trained["base"] / "model.safetensors").is_file()
        with pytest.raises(ValueError, match="inside the base model directory"):
            export_merged(trained["adapter"], trained["base"] / "merged", dtype="fp32", base_model=trained["base"])

    def test_decodes_greedily_whatever_the_base_generation_config_says(self, trained, tmp_path):
        """A base shipping Qwen2.5-Instruct's sampling settings: the export decodes as conftok did."""
        from transformers import AutoModelForCausalLM, GenerationConfig

        base = tmp_path / "base"
        shutil.copytree(trained["base"], base)
        qwen = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
        GenerationConfig(**json.loads((base / "generation_config.json").read_text()), **qwen).save_pretrained(base)
        out = export_merged(trained["adapter"], tmp_path / "out", dtype="fp32", base_model=base)
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen["do_sample"] is False and gen["repetition_penalty"] == 1.0 and gen["num_beams"] == 1
        assert not {"temperature", "top_p", "top_k"} & set(gen)
        # A plain generate() with only do_sample=False (the README's call) gives conftok's greedy answers.
        model, tokenizer, domains = load_adapter(trained["adapter"], base_model=base, device="cpu")
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
        gens = generate(model, tokenizer, prompts, stop_tokens=domains.tokens, max_new_tokens=MAX_NEW, progress=False)
        with torch.no_grad():
            for prompt, g in zip(prompts, gens):
                x = torch.tensor([prompt])
                ids = plain.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW + 1,
                                     do_sample=False)[0, len(prompt):].tolist()
                assert ids[:len(g.answer_ids)] == g.answer_ids

    def test_a_bf16_model_object_is_merged_in_fp32(self, trained, tmp_path):
        from transformers import AutoModelForCausalLM

        key = "model.layers.0.self_attn.q_proj.weight"
        with safe_open(trained["base"] / "model.safetensors", "pt") as f:
            base_q = f.get_tensor(key)
        with safe_open(trained["exported"] / "model.safetensors", "pt") as f:
            delta = f.get_tensor(key) - base_q  # the LoRA update, merged in fp32 from the fp32 base
        obj = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.bfloat16)
        out = export_merged(trained["adapter"], tmp_path / "out", dtype="fp32", base_model=obj)
        with safe_open(out / "model.safetensors", "pt") as f:
            merged_q = f.get_tensor(key)
        assert merged_q.dtype == torch.float32
        # The bf16 base's weights plus the update, not rounded to bf16 afterwards (that would be ~4e-4 off).
        assert (merged_q - (base_q.bfloat16().float() + delta)).abs().max() < 1e-5


class TestCommand:
    @pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
    def test_dtypes(self, trained, tmp_path, capsys, dtype, torch_dtype):
        from ray_jobs.export import main

        assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "m"), "--dtype", dtype]) == 0
        assert f"-> {tmp_path / 'm'} ({dtype}" in capsys.readouterr().out
        with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
        assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == str(torch_dtype).split(".")[1]

    def test_errors_exit_2_with_the_reason(self, trained, tmp_path, capsys):
        from ray_jobs.export import main

        assert main(["--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
        assert "no adapter_config.json" in capsys.readouterr().err
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "x").write_text("")
        assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "m")]) == 2
        assert "already exists and is not empty" in capsys.readouterr().err
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "n"), "--dtype", "int8"])
        assert e.value.code == 2 and "--dtype: invalid choice: 'int8'" in capsys.readouterr().err
        with pytest.raises(SystemExit) as e:  # torch's own device-string error, a traceback, before
            main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "n"), "--device", "gpu"])
        assert e.value.code == 2 and "--device: invalid choice: 'gpu'" in capsys.readouterr().err
        if not torch.cuda.is_available():  # an AssertionError from torch, a traceback, before
            capsys.readouterr()
            assert main(["--adapter", str(trained["adapter"]), "--out", str(tmp_path / "n"), "--device", "cuda"]) == 2
            assert "--device cuda: no CUDA GPU here" in capsys.readouterr().err
        assert not (tmp_path / "n").exists()
