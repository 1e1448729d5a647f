"""Tests for conftok.modeling: backends, quantization errors, the LoRA configuration, trainable
confidence-token rows, adapter save and reload in a fresh process, and the unsloth backend on CPU.

Models are the 2-layer hidden-64 ones from conftest. The fresh-process checks run
``python -c`` in a subprocess: the reload must not lean on anything this process holds, and
unsloth must be imported before transformers/peft in the process that uses it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OpCounter, approx, feature_rows, make_model, make_tokenizer, to_device, tolerance, write_jsonl
from safetensors import safe_open

from conftok import modeling
from conftok.data import IGNORE_INDEX, ConfidenceCollator
from conftok.domains import resolve_domains
from conftok.loss import LoraInputsUncast, confidence_logits, confidence_token_loss, p_confident
from conftok.modeling import (
    BACKENDS,
    DEFAULT_TARGET_MODULES,
    METADATA_FILE,
    QUANTIZATIONS,
    build_model,
    model_device,
    resolve_backend,
    save_adapter,
)
from conftok.prompts import encode_example, encode_prompt
from conftok.tokens import end_of_turn_token_id, token_ids

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TOKENS = resolve_domains().tokens  # <C_READ>, <U_READ>, <C_MED>, <U_MED>
HIDDEN = 64

# (question, answer, token). The one-position loss drops the token from the input, so a token's
# INPUT row only gets a gradient where the token is in the context (an earlier turn, a few-shot
# prompt): these contexts hold all four tokens, so every new row can be seen to train.
TRAIN_CASES = [
    ("Earlier: Yes <C_READ> and No <U_READ>. Is the sky blue?", "Yes", "<C_READ>"),
    ("Earlier: A <C_MED> then B <U_MED>. Which drug is best?", "C", "<U_MED>"),
    ("Question: code beta red farm?", "No", "<U_READ>"),
    ("The patient has a fever. A. Aspirin B. Insulin", "A", "<C_MED>"),
]
EVAL_CASES = [
    ("Is the sky blue?", "Yes", "<C_READ>"),
    ("Question: code alpha green town?", "No", "<U_READ>"),
    ("Which drug is best? A. Aspirin B. Insulin C. Penicillin", "B", "<C_MED>"),
]


# ---- helpers (also imported by the fresh-process scripts below) ------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hidden-64 models gain nothing from threads, and on a busy shared 2-core box OpenMP's
    waiting threads made each tiny forward ~100x slower (0.7 s against 5 ms measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch_of(tokenizer, cases, device="cpu"):
    """A left-padded training batch of prompt + answer + token rows (token last), on ``device``."""
    ids = token_ids(tokenizer, TOKENS)
    examples = []
    for question, answer, token in cases:
        prompt, answer_ids, _ = encode_example(tokenizer, question, answer, ids[token], 512)
        input_ids = torch.tensor(prompt + answer_ids + [ids[token]])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-1] = ids[token]
        answer_mask = torch.zeros_like(input_ids)
        answer_mask[len(prompt):-1] = 1
        examples.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                         "answer_mask": answer_mask})
    return to_device(ConfidenceCollator(tokenizer.pad_token_id)(examples), device)


def train_steps(model, batch, steps=2, lr=5e-2):
    """AdamW without weight decay: a parameter with zero gradient stays exactly where it is."""
    batch = to_device(batch, model_device(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, _ = confidence_token_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def effective_rows(model):
    """(input, output) embedding matrices (V, H) as the PEFT model computes them, deltas included;
    copied to the CPU, where saved tensors are compared with them."""
    inner = model.get_base_model()
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    vocab, hidden = embed.weight.shape
    device = embed.weight.device
    rows = embed(torch.arange(vocab, device=device))  # (V, H)
    head_rows = head(torch.eye(hidden, device=device, dtype=head.weight.dtype)).T  # (V, H)
    return rows.cpu().clone(), head_rows.cpu().clone()


@torch.no_grad()
def measure(model, tokenizer, cases=EVAL_CASES, max_new_tokens=6):
    """p_confident at each case's token position, the ids of those inputs, greedy continuations
    of the bare prompts, and the ids of "Yes <C_READ>"."""
    domains = resolve_domains()
    ids = token_ids(tokenizer, TOKENS)
    model.eval()
    device = model_device(model)
    batch = batch_of(tokenizer, cases, device)
    logits = confidence_logits(model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])  # (B, V)
    p = [p_confident(logits[i], *(ids[t] for t in domains.for_token(token).tokens)).item()
         for i, (_, _, token) in enumerate(cases)]
    prompts = []
    for question, _, _ in cases:
        prompt = torch.tensor(encode_prompt(tokenizer, question))
        prompts.append({"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "labels": prompt})
    prompts = to_device(ConfidenceCollator(tokenizer.pad_token_id)(prompts), device)
    out = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                         do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id)
    return {
        "p_confident": p,
        "input_ids": batch["input_ids"].tolist(),
        "generated": out[:, prompts["input_ids"].shape[1]:].tolist(),
        "yes_c_read": tokenizer("Yes <C_READ>", add_special_tokens=False)["input_ids"],
    }


def run_python(code: str, *args: str, timeout: int = 300, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (tests/ importable; ``env`` added to this one's);
    return the JSON of its last line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_base(tmp_path, tie=True, name="base") -> Path:
    """A tiny base model and its tokenizer saved as a normal HF directory."""
    path = tmp_path / name
    tokenizer = make_tokenizer()
    make_model(len(tokenizer), tie=tie).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def built(tie=True, arch="llama", extra_rows=0, **kwargs):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer) + extra_rows, tie=tie, arch=arch)
    kwargs.setdefault("bf16", False)
    return build_model(model, tokenizer=tokenizer, backend="hf", **kwargs)


# ---- building -------------------------------------------------------------------------------


class TestModelBuilder:
    @pytest.mark.parametrize("tie", [True, False])
    def test_trainable_token_indices_form(self, tie, device):
        model, tokenizer = built(tie=tie, device=device)
        ids = list(token_ids(tokenizer, TOKENS).values())
        indices = model.peft_config["default"].trainable_token_indices
        indices = indices if isinstance(indices, dict) else {"embed_tokens": indices}
        # The list form would leave an untied lm_head's rows untrained: dict with both then.
        assert indices == ({"embed_tokens": ids} if tie else {"embed_tokens": ids, "lm_head": ids})
        deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
        assert all(p.requires_grad and p.shape == (len(ids), HIDDEN) for p in deltas.values())
        assert len(deltas) == (1 if tie else 2)

    @pytest.mark.parametrize("tie", [True, False])
    def test_step_trains_new_rows_only(self, tie, device):
        model, tokenizer = built(tie=tie, device=device)
        new = sorted(token_ids(tokenizer, TOKENS).values())
        old = [i for i in range(len(tokenizer)) if i not in new]
        embed0, head0 = effective_rows(model)
        params0 = {n: p.detach().clone() for n, p in model.named_parameters()}

        train_steps(model, batch_of(tokenizer, TRAIN_CASES), steps=2)

        embed1, head1 = effective_rows(model)
        # Every new token's input and output rows moved; no other vocabulary row did.
        assert all(not torch.equal(embed0[i], embed1[i]) for i in new)
        assert all(not torch.equal(head0[i], head1[i]) for i in new)
        assert torch.equal(embed0[old], embed1[old]) and torch.equal(head0[old], head1[old])
        if tie:
            assert torch.equal(embed1, head1)  # still one matrix
        # TRL-style: every trained parameter changed (LoRA A too: 2 steps), every frozen one did not.
        for name, p in model.named_parameters():
            changed = not torch.equal(params0[name], p.detach())
            assert changed == p.requires_grad, f"{name}: requires_grad={p.requires_grad}, changed={changed}"

    def test_lora_config_carries_arguments(self, device):
        model, _ = built(lora_r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "v_proj"), device=device)
        config = model.peft_config["default"]
        assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
        assert set(config.target_modules) == {"q_proj", "v_proj"}
        wrapped = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
                   if ".lora_A." in name}
        assert wrapped == {"q_proj", "v_proj"}
        assert all(p.shape[0] == 4 for n, p in model.named_parameters() if ".lora_A." in n)

    def test_default_targets_all_projections(self, device):
        assert set(DEFAULT_TARGET_MODULES) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"}
        model, _ = built(device=device)
        lora_a = [name for name, _ in model.named_parameters() if ".lora_A." in name]
        assert len(lora_a) == 2 * len(DEFAULT_TARGET_MODULES)  # 2 layers
        assert {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in lora_a} == set(DEFAULT_TARGET_MODULES)
        # Frozen: everything but LoRA matrices and the new rows.
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)

    def test_missing_target_modules(self, caplog, device):
        with pytest.raises(ValueError, match="c_attn"):
            built(target_modules=("c_attn",), device=device)
        model, _ = built(target_modules=("q_proj", "c_attn"), device=device)
        assert set(model.peft_config["default"].target_modules) == {"q_proj"}
        assert "c_attn" in caplog.text

    def test_gradient_checkpointing_recomputes_and_matches(self, monkeypatch, device):
        """On by default (each layer runs again in backward), off when asked; same gradients."""
        grads, calls = {}, {}
        for checkpointing in (True, False):
            kwargs = {} if checkpointing else {"gradient_checkpointing": False}
            model, tokenizer = built(lora_dropout=0.0, device=device, **kwargs)
            assert model.get_base_model().is_gradient_checkpointing is checkpointing
            mlp = model.get_base_model().model.layers[0].mlp
            count = []
            forward = mlp.forward
            monkeypatch.setattr(mlp, "forward", lambda *a, **k: count.append(1) or forward(*a, **k))
            model.train()
            train_steps(model, batch_of(tokenizer, TRAIN_CASES), steps=1, lr=1e-3)  # LoRA B != 0 next
            count.clear()
            model.train()
            loss, _ = confidence_token_loss(model, batch_of(tokenizer, TRAIN_CASES, device))
            loss.backward()
            calls[checkpointing] = len(count)
            grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert calls == {True: 2, False: 1}
        assert grads[True].keys() == grads[False].keys()
        for name, g in grads[True].items():
            torch.testing.assert_close(g, grads[False][name], **tolerance(g.dtype), msg=name)

    @pytest.mark.parametrize("quantization", ["8bit", "4bit"])
    def test_quantization_without_bitsandbytes(self, monkeypatch, quantization):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
        tokenizer = make_tokenizer()
        size = len(tokenizer)
        with pytest.raises(ImportError, match="bitsandbytes") as err:
            build_model(make_model(size), tokenizer=tokenizer, backend="hf", quantization=quantization)
        assert quantization in str(err.value)
        assert len(tokenizer) == size  # raised before anything was changed

    @pytest.mark.parametrize("kwargs, allowed", [({"quantization": "int4"}, QUANTIZATIONS),
                                                 ({"backend": "vllm"}, BACKENDS)])
    def test_unknown_choice_lists_allowed(self, kwargs, allowed):
        tokenizer = make_tokenizer()
        for target in ("some/model", make_model(len(tokenizer))):
            with pytest.raises(ValueError) as err:
                build_model(target, tokenizer=tokenizer, **{"backend": "hf", **kwargs})
            message = str(err.value)
            assert repr(next(iter(kwargs.values()))) in message
            assert all(repr(choice) in message for choice in allowed)

    def test_unsloth_backend_refuses_a_model_object(self):
        tokenizer = make_tokenizer()
        with pytest.raises(ValueError, match="model name or path"):
            build_model(make_model(len(tokenizer)), tokenizer=tokenizer, backend="unsloth")

    def test_resolve_backend(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_backend("auto") == "hf"
        assert resolve_backend("hf") == "hf"
        monkeypatch.setattr(modeling, "_unsloth_available", lambda: True)
        assert resolve_backend("auto") == "hf"  # unsloth without CUDA: still hf
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_backend("auto") == "unsloth"
        monkeypatch.setattr(modeling, "_unsloth_available", lambda: False)
        assert resolve_backend("auto") == "hf"
        with pytest.raises(ImportError, match="unsloth"):
            resolve_backend("unsloth")
        with pytest.raises(ValueError, match="'auto'"):
            resolve_backend("fast")

    @pytest.mark.parametrize("extra_rows, expected_rows", [(64, 404 + 60), (2, 404), (0, 404)])
    def test_embedding_never_shrinks(self, extra_rows, expected_rows, device):
        """Qwen2.5 pads its matrix past the tokenizer: new ids land in the spare rows, nothing is
        cut; a matrix with too few rows grows exactly to the new tokenizer length."""
        tokenizer = make_tokenizer()
        assert len(tokenizer) == 400  # the fixture's vocabulary; 4 tokens take it to 404
        base = make_model(len(tokenizer) + extra_rows, tie=False, arch="qwen2", device=device)
        embed_before = base.get_input_embeddings().weight.detach().cpu().clone()
        head_before = base.get_output_embeddings().weight.detach().cpu().clone()
        model, tokenizer = build_model(base, tokenizer=tokenizer, backend="hf", bf16=False, device=device)
        embed, head = effective_rows(model)
        assert embed.shape == head.shape == (expected_rows, HIDDEN)
        new = sorted(token_ids(tokenizer, TOKENS).values())
        assert new == [400, 401, 402, 403] and max(new) < expected_rows
        eot = end_of_turn_token_id(tokenizer)
        assert torch.equal(embed[new], embed_before[eot].expand(4, -1))  # spare rows re-initialised
        assert torch.equal(head[new], head_before[eot].expand(4, -1))
        kept = [i for i in range(min(expected_rows, len(embed_before))) if i not in new]
        assert torch.equal(embed[kept], embed_before[kept]) and torch.equal(head[kept], head_before[kept])


# ---- 8-bit and 4-bit bases (bitsandbytes) on CUDA --------------------------------------------


def check_quantized_training(tmp_path, device, quantization):
    """Load a tiny untied base in ``quantization`` on ``device`` and train: the linear layers are
    bitsandbytes layers, LoRA and the new rows train and nothing else moves, the model generates,
    and the adapter holds the new rows only."""
    import bitsandbytes as bnb

    model, tokenizer = build_model(save_base(tmp_path, tie=False), backend="hf", quantization=quantization,
                                   bf16=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, device=device)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit)
    assert model_device(model) == torch.device(device)
    new = sorted(token_ids(tokenizer, TOKENS).values())
    embed0, head0 = effective_rows(model)
    trained0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen0 = q_proj.weight.detach().clone()

    train_steps(model, batch_of(tokenizer, TRAIN_CASES, device), steps=2)

    embed1, head1 = effective_rows(model)
    changed = lambda a, b: [i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])]  # noqa: E731
    assert changed(embed0, embed1) == new and changed(head0, head1) == new
    assert all(not torch.equal(trained0[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(q_proj.weight.detach(), frozen0)  # the quantized weights stay frozen
    measured = measure(model, tokenizer)
    assert all(0.0 < p < 1.0 for p in measured["p_confident"]) and len(measured["generated"]) == len(EVAL_CASES)
    out = save_adapter(model, tokenizer, tmp_path / "adapter")
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        rows = {key: f.get_slice(key).get_shape()[0] for key in f.keys()}
    assert max(rows.values()) < len(tokenizer), "a whole embedding matrix was saved"
    assert sum("trainable_tokens" in key for key in rows) == 2  # embed_tokens and lm_head rows


@pytest.mark.gpu
class TestQuantizedOnCuda:
    @pytest.mark.parametrize("quantization", ["8bit", "4bit"])
    def test_quantized_base_trains_lora_and_token_rows(self, tmp_path, cuda_device, quantization):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'conftok[gpu]')")
        check_quantized_training(tmp_path, cuda_device, quantization)


# ---- saving and reloading -------------------------------------------------------------------

RELOAD = """
import json, sys
from conftok.modeling import load_adapter
from test_modeling import measure
model, tokenizer, domains = load_adapter(sys.argv[1], device=sys.argv[2])
result = measure(model, tokenizer)
result["lazy"] = {name: name in sys.modules for name in ("unsloth", "bitsandbytes")}
print(json.dumps(result))
"""


class TestAdapterRoundTrip:
    @pytest.mark.parametrize("tie", [True, False])
    def test_safetensors_holds_new_rows_only(self, tmp_path, tie, device):
        model, tokenizer = built(tie=tie, device=device)
        train_steps(model, batch_of(tokenizer, TRAIN_CASES), steps=1)
        out = save_adapter(model, tokenizer, tmp_path / "adapter")
        save_adapter(model, tokenizer, out)  # replacing an adapter leaves no temporary siblings
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

        files = {p.name for p in out.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", METADATA_FILE} <= files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
        saved = {}
        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            for key in f.keys():
                saved[key] = f.get_tensor(key)
        vocab_rows = model.get_base_model().get_input_embeddings().weight.shape[0]
        assert all(t.shape[0] < vocab_rows for t in saved.values()), "a whole embedding matrix was saved"
        rows = {k: t for k, t in saved.items() if "trainable_tokens" in k}
        expected = {"embed_tokens"} if tie else {"embed_tokens", "lm_head"}
        assert {next(m for m in expected if m in k) for k in rows} == expected and len(rows) == len(expected)
        # PEFT stores the rows themselves (not a difference to the base rows): the trained rows.
        embed, head = effective_rows(model)
        new = list(token_ids(tokenizer, TOKENS).values())
        for key, tensor in rows.items():
            assert tensor.shape == (len(TOKENS), HIDDEN)
            assert torch.equal(tensor, (embed if "embed_tokens" in key else head)[new])
        meta = json.loads((out / METADATA_FILE).read_text())
        assert meta["token_ids"] == token_ids(tokenizer, TOKENS)

    @pytest.mark.parametrize("tie", [True, False])
    def test_fresh_process_reload_matches(self, tmp_path, tie, device):
        base = save_base(tmp_path, tie=tie)
        model, tokenizer = build_model(base, backend="hf", bf16=False, device=device)  # base found again by path
        train_steps(model, batch_of(tokenizer, TRAIN_CASES), steps=3)
        adapter = save_adapter(model, tokenizer, tmp_path / "adapter")
        here = measure(model, tokenizer)
        assert max(abs(p - 0.5) for p in here["p_confident"]) > 1e-3, "training did not move p_confident"

        there = run_python(RELOAD, str(adapter), str(device))

        assert there["input_ids"] == here["input_ids"]
        assert there["p_confident"] == approx(here["p_confident"], torch.float32)
        assert there["generated"] == here["generated"]
        yes = tokenizer("Yes", add_special_tokens=False)["input_ids"]
        assert len(yes) == 1
        assert there["yes_c_read"] == yes + [tokenizer.convert_tokens_to_ids("<C_READ>")]  # lstrip survived
        assert there["lazy"] == {"unsloth": False, "bitsandbytes": False}


# ---- unsloth, on the CPU (its fallback) and on CUDA ----------------------------------------

UNSLOTH = """
import json, sys
import unsloth  # first: it patches transformers and peft when imported
import torch
from conftok.loss import confidence_token_loss, training_loss
from conftok.modeling import build_model, load_adapter, model_device, save_adapter
from conftok.tokens import token_ids
from test_modeling import TOKENS, TRAIN_CASES, batch_of, effective_rows, measure, train_steps

bf16 = sys.argv[4] == "bf16"
result = {}
for tie, base in (("tied", sys.argv[1]), ("untied", sys.argv[2])):
    model, tokenizer = build_model(base, backend="unsloth", bf16=bf16, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    inner = model.get_base_model()
    device = model_device(model)  # where unsloth put it: CUDA when it has it
    new = sorted(token_ids(tokenizer, TOKENS).values())
    batch = batch_of(tokenizer, TRAIN_CASES, device)
    model.train()
    guarded = training_loss(model, batch, confidence_ids=new, placement_weight=1.0, kl_weight=1.0)
    guards = {"kl": guarded.kl.item(), "placement": guarded.placement.item(), "token": guarded.token.item()}
    loss, logits = confidence_token_loss(model, batch)
    loss.backward()
    grads = {n.split(".token_adapter")[0].rsplit(".", 1)[-1]: p.grad.abs().sum(-1).tolist()
             for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    model.zero_grad()
    embed0, head0 = effective_rows(model)
    train_steps(model, batch, steps=1)
    embed1, head1 = effective_rows(model)
    changed = lambda a, b: [i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])]
    adapter = save_adapter(model, tokenizer, sys.argv[3] + "/" + tie)
    here = measure(model, tokenizer)
    reloaded, reloaded_tokenizer, _ = load_adapter(adapter, device=device, bf16=bf16)
    there = measure(reloaded, reloaded_tokenizer)
    result[tie] = {
        "device": device.type,
        "peft": type(model).__name__,
        "fast_language_model": hasattr(inner, "for_training") and hasattr(inner, "max_seq_length"),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "quantized": getattr(inner.config, "quantization_config", None) is not None,
        "padding_side": tokenizer.padding_side,
        "indices": model.peft_config["default"].trainable_token_indices,
        "checkpointing": inner.is_gradient_checkpointing,
        "new": new, "loss": loss.item(), "guards": guards, "logits_shape": list(logits.shape), "grads": grads,
        "embed_changed": changed(embed0, embed1), "head_changed": changed(head0, head1),
        "p_here": here["p_confident"], "p_reloaded": there["p_confident"],
    }
print(json.dumps(result))
"""


def check_unsloth_run(result, device_type, dtype):
    """What the UNSLOTH script found, for weights of ``dtype`` on a ``device_type`` device."""
    tol = tolerance(dtype)
    for tie, r in result.items():
        new = r["new"]
        assert r["device"] == device_type, tie
        assert r["peft"] == "PeftModelForCausalLM" and r["fast_language_model"], tie
        assert str(dtype) in r["dtypes"] and not r["quantized"], (tie, r["dtypes"])  # not unsloth's 4-bit default
        assert set(r["dtypes"]) <= {str(dtype), "torch.float32"}, r["dtypes"]  # LoRA matrices may stay fp32
        assert r["padding_side"] == "left" and r["checkpointing"] is True
        modules = ["embed_tokens"] if tie == "tied" else ["embed_tokens", "lm_head"]
        assert r["indices"] == {m: new for m in modules}
        assert r["logits_shape"] == [len(TRAIN_CASES), 404] and 0 < r["loss"] < 100
        # The guard terms run on unsloth's model too: the same token loss, KL 0 before training
        # (the adapter is the identity), a positive placement term.
        assert r["guards"]["token"] == approx(r["loss"], dtype)
        assert abs(r["guards"]["kl"]) < tol["atol"] and r["guards"]["placement"] > 0
        assert set(r["grads"]) == set(modules)
        assert all(g > 0 for rows in r["grads"].values() for g in rows)  # all 4 tokens are in TRAIN_CASES
        assert r["embed_changed"] == new and r["head_changed"] == new
        # Reloaded through the hf loader: the same p_confident (other kernels than unsloth's).
        assert r["p_reloaded"] == approx(r["p_here"], dtype)
        assert max(abs(p - 0.5) for p in r["p_here"]) > 1e-4


UNSLOTH_GPU_SHAPED = """
import json, sys
import unsloth  # first: it patches transformers and peft when imported
import torch
from unsloth import FastLanguageModel
from unsloth_zoo.training_utils import prepare_model_for_training
from conftok.modeling import build_model

# What unsloth's GPU path does around conftok's calls (unsloth 2026.10, models/llama.py), which its CPU fallback
# here does not: from_pretrained loads its own copy of the repo, and get_peft_model ends in
# prepare_model_for_training (every parameter but LoRA's frozen) and sets the tokenizer to pad on the right.
loaded, real_load, real_wrap = {}, FastLanguageModel.from_pretrained, FastLanguageModel.get_peft_model

def from_pretrained(*args, **kwargs):
    model, tokenizer = real_load(*args, **kwargs)
    model.name_or_path = model.config._name_or_path = "unsloth/its-own-copy"
    loaded["tokenizer"] = tokenizer
    return model, tokenizer

def get_peft_model(model, **kwargs):
    model = real_wrap(model, **kwargs)
    prepare_model_for_training(model, use_gradient_checkpointing="unsloth", use_reentrant=True, full_finetuning=False,
                               train_layernorms=False, train_embedding=False, train_lm_head=False,
                               float32_mixed_precision=True)
    loaded["tokenizer"].padding_side = "right"
    return model

FastLanguageModel.from_pretrained, FastLanguageModel.get_peft_model = from_pretrained, get_peft_model
model, tokenizer = build_model(sys.argv[1], backend="unsloth", bf16=True, lora_r=4, lora_alpha=8,
                               gradient_checkpointing=False)
rows = {n: [p.requires_grad, str(p.dtype)] for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
print(json.dumps({"rows": rows, "padding_side": tokenizer.padding_side,
                  "base": model.peft_config["default"].base_model_name_or_path}))
"""


UNSLOTH_TRAIN = """
import contextlib, io, json, re, sys
import unsloth  # first: it patches transformers and peft when imported
from conftok.config import TrainConfig
from conftok.data import ConfidenceDataset
from conftok.domains import resolve_domains
from conftok.modeling import load_tokenizer
from conftok.tokens import add_confidence_tokens
from conftok.train import train

cfg = TrainConfig(model_name=sys.argv[1], train_data=sys.argv[2], output_dir=sys.argv[3], backend="unsloth", bf16=False,
                  gradient_checkpointing="auto", batch_size=4, max_steps=1, max_new_tokens=2, lora_r=4, progress=False)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    train(cfg, val_sets={"boolq": [{"question": "is it red", "passage": "It is red.", "answer": True}]})
tokenizer = load_tokenizer(sys.argv[1])
add_confidence_tokens(tokenizer, None, resolve_domains().tokens)
longest = max(ConfidenceDataset(sys.argv[2], tokenizer).lengths())
print(json.dumps({"decisions": re.findall(r"Gradient checkpointing \\(auto\\) \\w+: .*?\\((batch \\d+ x \\d+ tokens)",
                                          printed.getvalue()),
                  "longest": longest}))
"""


needs_unsloth = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")


@pytest.mark.unsloth
@needs_unsloth
class TestUnslothBackend:
    def test_builds_trains_and_reloads_on_cpu(self, tmp_path):
        """FastLanguageModel (unsloth's CPU fallback here, CUDA hidden) loads fp32, adds the tokens
        before LoRA, runs the one-position loss forward and backward, trains the new rows only, and
        its adapter reloads through the hf loader with the same p_confident."""
        tied, untied = save_base(tmp_path, tie=True, name="tied"), save_base(tmp_path, tie=False, name="untied")
        result = run_python(UNSLOTH, str(tied), str(untied), str(tmp_path / "adapters"), "fp32",
                            env={"CUDA_VISIBLE_DEVICES": ""})
        check_unsloth_run(result, "cpu", torch.float32)

    @pytest.mark.parametrize("tie", [True, False])
    def test_what_unsloths_wrapping_does_on_a_gpu_is_undone(self, tmp_path, tie):
        """unsloth's GPU path freezes every parameter but LoRA's when it wraps (the confidence tokens' rows too:
        C and U would stay equal, p_confident 0.5), pads the tokenizer on the right and names its own copy of the
        repo as the adapter's base; build_model undoes the three (unsloth_zoo's own function applied here)."""
        base = save_base(tmp_path, tie=tie)
        result = run_python(UNSLOTH_GPU_SHAPED, str(base), env={"CUDA_VISIBLE_DEVICES": ""})
        assert len(result["rows"]) == (1 if tie else 2), result
        assert all(row == [True, "torch.float32"] for row in result["rows"].values()), result
        assert result["padding_side"] == "left" and result["base"] == str(base)

    def test_train_decides_auto_checkpointing_for_its_longest_row(self, tmp_path):
        """unsloth sets checkpointing when it wraps the model, before train's own decision: 'auto' is decided
        there for the rows' longest (it was max_seq_length's 2048, which on a 141 GB card turned checkpointing
        on for the 7B search whose rows fit without it)."""
        base = save_base(tmp_path)
        rows = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
        result = run_python(UNSLOTH_TRAIN, str(base), rows, str(tmp_path / "run"), env={"CUDA_VISIBLE_DEVICES": ""})
        assert result["decisions"] == [f"batch 4 x {result['longest']} tokens"], result
        assert result["longest"] < 2048

    @pytest.mark.gpu
    def test_builds_trains_and_reloads_on_cuda(self, tmp_path, cuda_device):
        """The same on unsloth's GPU path (its kernels, its checkpointing), in bf16 where the card has it."""
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        tied, untied = save_base(tmp_path, tie=True, name="tied"), save_base(tmp_path, tie=False, name="untied")
        result = run_python(UNSLOTH, str(tied), str(untied), str(tmp_path / "adapters"),
                            "bf16" if dtype == torch.bfloat16 else "fp32", timeout=600)
        check_unsloth_run(result, "cuda", dtype)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_inputs_uncast_gives_the_cast_paths_step_with_fewer_copies(device, checkpointing):
    """Under bf16 autocast, a step with LoRA inputs left bf16 (train's forward) has the loss and
    gradients of PEFT's cast-to-fp32 path, with fewer copies; the layers' flags come back after. With
    gradient checkpointing the backward, outside the context, recomputes each layer uncast as its
    forward ran (else torch.utils.checkpoint stops: the recomputed tensors differ)."""
    tok = make_tokenizer()
    model, tok = modeling.build_model(make_model(len(tok), seed=2, device=device), tokenizer=tok, backend="hf",
                                      bf16=True, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                                      gradient_checkpointing=checkpointing, device=device)
    model.train()
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for uncast in (False, True):
        torch.manual_seed(0)  # the same dropout masks
        counter = OpCounter()
        context = LoraInputsUncast(model) if uncast else torch.enable_grad()
        with counter, torch.autocast(device.type, dtype=torch.bfloat16), context:
            loss = model(input_ids=ids, logits_to_keep=1).logits.float().logsumexp(-1).mean()
        loss.backward()
        results[uncast] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                           counter.count(torch.ops.aten._to_copy, torch.ops.aten.copy_))
        model.zero_grad(set_to_none=True)
    assert all(m.cast_input_dtype_enabled for m in LoraInputsUncast(model).layers)
    (loss_cast, grads_cast, copies_cast), (loss_uncast, grads_uncast, copies_uncast) = results[False], results[True]
    assert copies_uncast < copies_cast, (copies_uncast, copies_cast)
    torch.testing.assert_close(loss_uncast, loss_cast, **tolerance(torch.bfloat16))
    assert grads_uncast.keys() == grads_cast.keys()
    for name, grad in grads_cast.items():
        torch.testing.assert_close(grads_uncast[name], grad, **tolerance(torch.bfloat16), msg=name)


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from conftok.inputs import InputError
    from conftok.modeling import load_adapter, looks_like_hub_id
    from conftok.preflight import adapter_domains

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    assert looks_like_hub_id("someuser/conftok-adapter")
    for local in ("experiments/fnal", "./runs/final", "/abs/final", "~/final",
                  "experiments", "a/b/c", "user/"):
        assert not looks_like_hub_id(local), local
    assert adapter_domains("someuser/conftok-adapter") is None  # checked where it is downloaded
    with pytest.raises(InputError, match="no such directory"):  # not a Hub download that fails offline
        adapter_domains("experiments/fnal")
    with pytest.raises(FileNotFoundError, match="not a conftok adapter"):
        load_adapter("experiments/fnal")


def test_train_refuses_a_model_whose_token_rows_are_frozen(tmp_path, monkeypatch):
    """The rows are what the loss trains: a backend that froze them (unsloth's GPU wrapping did) would run a
    whole search with p_confident 0.5 at every answer. train stops before the first step instead."""
    from conftest import feature_rows, write_jsonl

    from conftok.config import TrainConfig

    train_module = importlib.import_module("conftok.train")
    real = train_module.build_model

    def freezing(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.requires_grad_(False)
        return model, tokenizer

    monkeypatch.setattr(train_module, "build_model", freezing)
    tok = make_tokenizer()
    cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(8)),
                      output_dir=str(tmp_path / "run"), bf16=False, progress=False, batch_size=4, max_steps=1)
    with pytest.raises(RuntimeError, match="confidence tokens' rows are not trainable"):
        train_module.train(cfg, model=make_model(len(tok)), tokenizer=tok,
                           val_sets={"boolq": [{"question": "is it red", "passage": "It is red.", "answer": True}]})
    assert not (tmp_path / "run" / "checkpoint-1").exists()
