"""End to end on an in-process tiny model: train, validate, save, reload in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import feature_rows, make_model, make_tokenizer, write_jsonl

from conftok import TrainConfig, train
from conftok.data import ConfidenceCollator, ConfidenceDataset
from conftok.loss import confidence_logits, p_confident

VAL = {
    "boolq": [{"id": f"b{i}", "question": f"is code {w} red", "passage": "The barn is red.", "answer": i % 3 != 0}
              for i, w in enumerate(["alpha", "beta"] * 4)],
    "medqa": [{"id": f"m{i}", "question": f"code {w}: which drug", "answer": "ABCD"[i % 4],
               "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}
              for i, w in enumerate(["alpha", "beta"] * 4)],
}


def held_out_accuracy(model, tokenizer, path):
    """Token accuracy at the token position (teacher-forced answer) and p_confident per row."""
    ds = ConfidenceDataset(path, tokenizer)
    batch = ConfidenceCollator(tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        logits = confidence_logits(model, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])
    hits, probs = [], []
    for row, target in zip(ds.kept_rows, batch["labels"][:, -1].tolist()):
        tag = row.token[3:]
        c, u = tokenizer.convert_tokens_to_ids([f"<C_{tag}", f"<U_{tag}"])
        p = p_confident(logits[len(probs)], c, u).item()
        probs.append(p)
        hits.append((p > 0.5) == (target == c))
    return sum(hits) / len(hits), probs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    train_path = write_jsonl(root / "train.jsonl", feature_rows(160, seed=1))
    test_path = write_jsonl(root / "test.jsonl", feature_rows(60, seed=2))
    cfg = TrainConfig(model_name=str(root / "base"), train_data=train_path, output_dir=str(root / "run"),
                      backend="hf", num_epochs=3, batch_size=16, learning_rate=1e-2, warmup_ratio=0.1,
                      lora_r=8, lora_alpha=16, eval_steps=15, bf16=False, gradient_checkpointing=False,
                      calib_beta=4, eval_batch_size=8, max_new_tokens=4, logging_steps=1, progress=False)
    seen = []
    result = train(cfg, val_sets=VAL, on_validation=lambda m, d: seen.append((m, d)))
    return {"root": root, "cfg": cfg, "result": result, "seen": seen, "test": test_path}


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


class TestIntegration:
    def test_token_loss_falls(self, trained):
        losses = _scalars(trained["root"] / "run" / "logs", "train/token_loss")
        assert len(losses) == trained["result"].global_step == 30
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, (first, last)

    def test_held_out_token_accuracy_beats_majority(self, trained):
        from conftok.modeling import load_adapter

        model, tokenizer, _ = load_adapter(trained["result"].final_dir, device="cpu")
        accuracy, _ = held_out_accuracy(model, tokenizer, trained["test"])
        rows = [json.loads(line) for line in open(trained["test"])]
        confident = sum("<C_" in r["tagged_response"] for r in rows) / len(rows)
        majority = max(confident, 1 - confident)
        assert accuracy > majority + 0.1, (accuracy, majority)

    def test_output_tree_and_callbacks(self, trained):
        run = trained["root"] / "run"
        steps = [m["step"] for m, _ in trained["seen"]]
        assert steps == [10, 15, 20, 30]  # eval_steps=15 plus each epoch end (10 steps an epoch)
        for metrics, ckpt in trained["seen"]:
            assert ckpt == run / f"checkpoint-{metrics['step']}"
            assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
            assert 0 <= metrics["val/accuracy"] <= 1 and metrics["val/calibration_error"] >= 0
            assert metrics["val/score"] == pytest.approx(metrics["val/accuracy"] - metrics["val/calibration_error"])
        for name in ("best_accuracy", "best_calibration", "final"):
            assert (run / name / "adapter_model.safetensors").is_file(), name
            assert not (run / name / "trainer_state.pt").exists()
        for epoch in (1, 2, 3):
            data = json.loads((run / f"reliability_epoch_{epoch}.json").read_text())
            assert data["epoch"] == epoch and set(data["reliability"]) == {"read", "med"}
            assert sum(b["count"] for b in data["reliability"]["read"]) == len(VAL["boolq"])
        assert len(_scalars(run / "logs", "val/accuracy")) == 4
        assert len(_scalars(run / "logs", "train/learning_rate")) == 30
        best = json.loads((run / "best_calibration" / "validation.json").read_text())["metrics"]
        assert best["val/calibration_error"] == min(m["val/calibration_error"] for m, _ in trained["seen"])

    def test_reload_in_fresh_process_gives_same_p_confident(self, trained):
        from conftok.modeling import load_adapter

        model, tokenizer, _ = load_adapter(trained["result"].final_dir, device="cpu")
        _, here = held_out_accuracy(model, tokenizer, trained["test"])
        code = (
            "import json, sys; sys.path.insert(0, 'tests')\n"
            "from test_integration import held_out_accuracy\n"
            "from conftok.modeling import load_adapter\n"
            f"m, t, _ = load_adapter({str(trained['result'].final_dir)!r}, device='cpu')\n"
            f"print(json.dumps(held_out_accuracy(m, t, {trained['test']!r})[1]))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        there = json.loads(out.stdout.strip().splitlines()[-1])
        assert max(abs(a - b) for a, b in zip(here, there)) < 1e-6

    def test_resume_continues_from_checkpoint(self, trained, tmp_path):
        """Resuming from checkpoint-20 reaches the same final adapter as the uninterrupted run."""
        from safetensors.torch import load_file

        cfg = TrainConfig(**{**trained["cfg"].to_dict(), "output_dir": str(tmp_path / "resumed")})
        seen = []
        result = train(cfg, val_sets=VAL, resume_from=trained["root"] / "run" / "checkpoint-20",
                       on_validation=lambda m, d: seen.append(m["step"]))
        assert seen == [30] and result.global_step == 30
        a = load_file(str(trained["result"].final_dir / "adapter_model.safetensors"))
        b = load_file(str(result.final_dir / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    def test_nan_loss_stops_with_the_step(self, tmp_path):
        tokenizer = make_tokenizer()
        model = make_model(len(tokenizer))
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
        path = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
        cfg = TrainConfig(model_name="in-process", train_data=path, output_dir=str(tmp_path / "run"), bf16=False,
                          gradient_checkpointing=False, progress=False, batch_size=4)
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(epoch 1, batch 1\)"):
            train(cfg, model=model, tokenizer=tokenizer, val_sets=VAL)
