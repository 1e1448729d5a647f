"""End to end on an in-process tiny model: train, validate, save, reload in a fresh process."""

import functools
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import feature_rows, logged_scalars, make_model, make_tokenizer, to_device, write_jsonl

from conftok import TrainConfig, train
from conftok.config import ConfigError
from conftok.checkpoint import TRAINER_STATE_FILE, TRAINER_STATE_FILES, TRAINER_TENSORS_FILE
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
    batch = to_device(batch, next(model.parameters()).device)
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
def train_on_device(device):
    """train() takes CUDA whenever it sees it; here its model goes where the suite runs."""
    from conftok.modeling import build_model

    train_module = importlib.import_module("conftok.train")  # `conftok.train` the attribute is the function
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_model", functools.partial(build_model, device=device))
        yield device


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_on_device):
    root = tmp_path_factory.mktemp("integration")
    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # 320 rows at batch 32 (10 steps an epoch): with the default guards a batch of 16 left the learned
    # token at the mercy of the seed (held-out accuracy 0.58-1.0 over seeds 0-5 and 42); at 32 it is
    # 0.95-1.0 for six of those seven seeds (0.60 for seed 5), 0.98 for the default seed.
    train_path = write_jsonl(root / "train.jsonl", feature_rows(320, seed=1))
    test_path = write_jsonl(root / "test.jsonl", feature_rows(60, seed=2))
    cfg = TrainConfig(model_name=str(root / "base"), train_data=train_path, output_dir=str(root / "run"),
                      backend="hf", num_epochs=3, batch_size=32, learning_rate=1e-2, warmup_ratio=0.1,
                      lora_r=8, lora_alpha=16, lora_dropout=0.1, eval_steps=15, bf16=False, gradient_checkpointing=False,
                      calib_beta=4, eval_batch_size=8, max_new_tokens=4, logging_steps=1, progress=False,
                      save_total_limit=None)  # every checkpoint kept: the tests below resume from checkpoint-20
    seen = []
    result = train(cfg, val_sets=VAL, on_validation=lambda m, d: seen.append((m, d)))
    return {"root": root, "cfg": cfg, "result": result, "seen": seen, "test": test_path, "device": train_on_device}


def _scalars(logdir, tag):
    return [value for _, value in logged_scalars(logdir, tag)]


class TestIntegration:
    def test_token_loss_falls(self, trained):
        losses = _scalars(trained["root"] / "run" / "logs", "train/token_loss")
        assert len(losses) == trained["result"].global_step == 30
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, (first, last)

    def test_held_out_token_accuracy_beats_majority(self, trained):
        from conftok.modeling import load_adapter

        model, tokenizer, _ = load_adapter(trained["result"].final_dir, device=trained["device"])
        accuracy, _ = held_out_accuracy(model, tokenizer, trained["test"])
        rows = [json.loads(line) for line in open(trained["test"])]
        confident = sum("<C_" in r["tagged_response"] for r in rows) / len(rows)
        majority = max(confident, 1 - confident)
        assert accuracy > majority + 0.1, (accuracy, majority)

    def test_output_tree_and_callbacks(self, trained):
        run = trained["root"] / "run"
        steps = [m["step"] for m, _ in trained["seen"]]
        assert steps == [10, 15, 20, 30]  # eval_steps=15 plus each epoch end (10 steps an epoch)
        from conftok.train import planned_validations

        assert planned_validations(320, trained["cfg"]) == len(steps)  # what a search's ASHA max_t must allow
        assert [(m["validation"], m["validations_planned"]) for m, _ in trained["seen"]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        for metrics, ckpt in trained["seen"]:
            assert ckpt == run / f"checkpoint-{metrics['step']}"
            assert (ckpt / "adapter_model.safetensors").is_file()
            assert all((ckpt / name).is_file() for name in TRAINER_STATE_FILES)
            assert 0 <= metrics["val/accuracy"] <= 1 and metrics["val/calibration_error"] >= 0
            assert metrics["val/score"] == pytest.approx(metrics["val/accuracy"] - metrics["val/calibration_error"])
        for name in ("best_accuracy", "best_calibration", "final"):
            assert (run / name / "adapter_model.safetensors").is_file(), name
            assert not any((run / name / f).exists() for f in TRAINER_STATE_FILES)
        for epoch in (1, 2, 3):
            data = json.loads((run / f"reliability_epoch_{epoch}.json").read_text())
            assert data["epoch"] == epoch and set(data["reliability"]) == {"read", "med"}
            assert sum(b["count"] for b in data["reliability"]["read"]) == len(VAL["boolq"])
        assert len(_scalars(run / "logs", "val/accuracy")) == 4
        assert len(_scalars(run / "logs", "train/learning_rate")) == 30
        best = json.loads((run / "best_calibration" / "validation.json").read_text())["metrics"]
        assert best["val/calibration_error"] == min(m["val/calibration_error"] for m, _ in trained["seen"])
        # Each best_* directory holds the first validation that reached its best (a tie keeps the earlier one).
        for name, key, pick in (("best_accuracy", "val/accuracy", max), ("best_calibration", "val/calibration_error", min)):
            values = [m[key] for m, _ in trained["seen"]]
            first = steps[values.index(pick(values))]
            assert json.loads((run / name / "conftok.json").read_text())["global_step"] == first, name

    def test_reload_in_fresh_process_gives_same_p_confident(self, trained):
        from conftok.modeling import load_adapter

        device = str(trained["device"])
        model, tokenizer, _ = load_adapter(trained["result"].final_dir, device=device)
        _, here = held_out_accuracy(model, tokenizer, trained["test"])
        code = (
            "import json, sys; sys.path.insert(0, 'tests')\n"
            "from test_integration import held_out_accuracy\n"
            "from conftok.modeling import load_adapter\n"
            f"m, t, _ = load_adapter({str(trained['result'].final_dir)!r}, device={device!r})\n"
            f"print(json.dumps(held_out_accuracy(m, t, {trained['test']!r})[1]))\n"
        )
        # The environment is kept (a GPU box may find peft through PYTHONPATH, CUDA through LD_LIBRARY_PATH).
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        there = json.loads(out.stdout.strip().splitlines()[-1])
        assert max(abs(a - b) for a, b in zip(here, there)) < 1e-6

    def test_resume_continues_from_checkpoint(self, trained, tmp_path, monkeypatch):
        """Resuming from checkpoint-20 reaches the uninterrupted run's final adapter within 1e-5, on
        the suite's device: optimizer, schedule, data order and every random state come back.
        LoRA dropout (0.1) draws from the model's device's generator (CUDA's on a GPU), so the
        random states matter: a resume that skips them ends elsewhere."""
        from safetensors.torch import load_file

        from conftok import checkpoint

        def resume(name, step=20):
            cfg = TrainConfig(**{**trained["cfg"].to_dict(), "output_dir": str(tmp_path / name)})
            seen = []
            result = train(cfg, val_sets=VAL, resume_from=trained["root"] / "run" / f"checkpoint-{step}",
                           on_validation=lambda m, d: seen.append(m["step"]))
            assert seen == [s for s in (20, 30) if s > step] and result.global_step == 30
            return load_file(str(result.final_dir / "adapter_model.safetensors"))

        def max_difference(x, y):
            assert x.keys() == y.keys()
            return max((x[k] - y[k]).abs().max().item() for k in x)

        uninterrupted = load_file(str(trained["result"].final_dir / "adapter_model.safetensors"))
        assert max_difference(uninterrupted, resume("resumed")) <= 1e-5
        # Mid-epoch (10 steps an epoch): the length-grouped batches skip to batch 5 of epoch 2.
        assert trained["cfg"].group_by_length and max_difference(uninterrupted, resume("mid_epoch", 15)) <= 1e-5
        monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
        assert max_difference(uninterrupted, resume("random_states_not_restored")) > 1e-5

    def test_checkpoint_holds_no_pickle(self, trained):
        """The trainer state is JSON plus safetensors (every tensor the JSON names is there), and no
        file of a checkpoint is a pickle or a torch.save archive: loading one runs no code."""
        from safetensors.torch import load_file

        ckpt = trained["root"] / "run" / "checkpoint-20"
        for path in (p for p in ckpt.iterdir() if p.is_file()):
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path.name} is a pickle or zip"
        text = (ckpt / TRAINER_STATE_FILE).read_text()
        saved = json.loads(text)
        tensors = load_file(str(ckpt / TRAINER_TENSORS_FILE))
        assert saved["state"]["global_step"] == 20 and saved["state"]["step_in_epoch"] == 0
        assert set(re.findall(r'"__tensor__": "([^"]+)"', text)) == set(tensors)
        assert tensors["trainer.rng.torch"].dtype == torch.uint8
        assert len(saved["rng"]["python"][1]) == 625 and len(saved["rng"]["numpy"][1]) == 624
        if trained["device"].type == "cuda":  # one state per device, the model's among them
            assert tensors[f"trainer.rng.cuda.{trained['device'].index}"].dtype == torch.uint8

    def test_retention_keeps_the_last_checkpoint_and_links_the_rest(self, tmp_path, train_on_device):
        """The default save_total_limit=1 with validations at steps 2, 4 and 6: checkpoint-2 and -4 keep
        only validation.json; checkpoint-6 keeps its adapter but, the run finished, not its trainer
        state; best_*/ and final/ hold the adapter without optimizer state, as hard links to a
        checkpoint's files (one copy on disk). A run stopped after its validation at step 4 (an epoch's
        end) has checkpoint-4 whole, resumes from it and ends on the uninterrupted run's adapter.
        Resuming a finished run from its last checkpoint returns it at once."""
        from safetensors.torch import load_file

        class Stop(Exception):
            pass

        def stop_at(step):
            def on_validation(metrics, ckpt):
                if metrics["step"] == step:
                    raise Stop
            return on_validation

        tokenizer = make_tokenizer()
        # 4 steps an epoch: validations at 2 (eval_steps), 4 (the epoch's end) and 6 (max_steps).
        cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(16)),
                          output_dir=str(tmp_path / "run"), backend="hf", batch_size=4, max_steps=6, eval_steps=2,
                          learning_rate=1e-2, lora_r=4, lora_alpha=8, bf16=False, gradient_checkpointing=False,
                          calib_beta=4, eval_batch_size=8, max_new_tokens=4, progress=False)
        assert cfg.save_total_limit == 1
        full = train(cfg, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL)
        run = tmp_path / "run"
        last = {p.name for p in (run / "checkpoint-6").iterdir()}
        assert {"adapter_model.safetensors", "validation.json"} <= last and not last & set(TRAINER_STATE_FILES)
        for step in (2, 4):
            assert [p.name for p in (run / f"checkpoint-{step}").iterdir()] == ["validation.json"]
        inodes = {}
        for name in ("best_accuracy", "best_calibration", "final"):
            files = {p.name for p in (run / name).iterdir()}
            assert "adapter_model.safetensors" in files and not files & set(TRAINER_STATE_FILES), (name, files)
            inodes[name] = (run / name / "adapter_model.safetensors").stat().st_ino
        assert inodes["final"] == (run / "checkpoint-6" / "adapter_model.safetensors").stat().st_ino
        best_steps = {json.loads((run / name / "validation.json").read_text())["metrics"]["step"]
                      for name in ("best_accuracy", "best_calibration")}
        assert len(set(inodes.values())) == len(best_steps | {6})  # one file per distinct step, however named
        assert (run / "final" / "final_metrics.json").is_file()
        assert not (run / "checkpoint-6" / "final_metrics.json").exists()  # a file of final/ only, not a shared one

        tokenizer = make_tokenizer()
        stopped = TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "stopped")})
        with pytest.raises(Stop):
            train(stopped, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL,
                  on_validation=stop_at(4))
        assert [p.name for p in (tmp_path / "stopped" / "checkpoint-2").iterdir()] == ["validation.json"]
        assert all((tmp_path / "stopped" / "checkpoint-4" / name).is_file() for name in TRAINER_STATE_FILES)
        tokenizer = make_tokenizer()
        resumed = train(stopped, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL,
                        resume_from=tmp_path / "stopped" / "checkpoint-4")
        assert resumed.global_step == 6
        assert [(m["step"], m["validation"]) for m in resumed.history] == [(2, 1), (4, 2), (6, 3)]  # counted on
        assert [p.name for p in (tmp_path / "stopped" / "checkpoint-4").iterdir()] == ["validation.json"]
        # TensorBoard, resumed into the same logs: every step the uninterrupted run logged, with its values (the
        # resumed process purges what came after step 4, not step 4's validation; the training loss's logging
        # window, steps 1-6 here, straddles the checkpoint and comes back with it).
        for tag in ("val/accuracy", "val/calibration_error", "train/loss", "train/placement_loss"):
            there, here = logged_scalars(run / "logs", tag), logged_scalars(tmp_path / "stopped" / "logs", tag)
            assert [s for s, _ in here] == [s for s, _ in there] and len(there) >= 1, tag
            assert [v for _, v in here] == pytest.approx([v for _, v in there], rel=1e-5), tag
        a = load_file(str(full.final_dir / "adapter_model.safetensors"))
        b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

        again = train(cfg, model=make_model(len(tokenizer), seed=0), tokenizer=make_tokenizer(), val_sets=VAL,
                      resume_from=run / "checkpoint-6", on_validation=stop_at(6))  # would raise if it validated
        assert again.global_step == 6 and again.final_dir == run / "final"
        assert [m["step"] for m in again.history] == [2, 4, 6] and again.best == full.best

        # Other settings that shape a run: refused before anything loads, for a finished run as for one to go on
        # (it would return the old adapter, or splice the old optimizer and data order into the new run).
        for checkpoint, changed in ((run / "checkpoint-6", {"learning_rate": cfg.learning_rate / 10}),
                                    (tmp_path / "stopped" / "checkpoint-6", {"seed": cfg.seed + 1, "num_epochs": 9})):
            other = TrainConfig(**{**cfg.to_dict(), **changed, "eval_steps": 3, "progress": False})
            with pytest.raises(ConfigError, match="other settings") as e:
                train(other, model=make_model(len(tokenizer), seed=0), tokenizer=make_tokenizer(), val_sets=VAL,
                      resume_from=checkpoint)
            assert all(f"{name}: {getattr(cfg, name)!r} -> {value!r}" in str(e.value) for name, value in changed.items())
            assert "eval_steps" not in str(e.value)  # where and how often it validates may change

    def test_a_run_stopped_before_linking_its_best_links_it_when_resumed(self, tmp_path, train_on_device,
                                                                         monkeypatch):
        """Stopped after checkpoint-2 was written and before best_*/ were linked to it (the first validation is
        the best so far on both counts): resumed from checkpoint-2, the run links them (its state already holds
        the figures, so no later validation would) and ends with the uninterrupted run's best_*/."""
        train_module = importlib.import_module("conftok.train")

        class Stop(Exception):
            pass

        tokenizer = make_tokenizer()
        cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(16)),
                          output_dir=str(tmp_path / "run"), backend="hf", batch_size=4, max_steps=6, eval_steps=2,
                          learning_rate=1e-2, lora_r=4, lora_alpha=8, bf16=False, gradient_checkpointing=False,
                          calib_beta=4, eval_batch_size=8, max_new_tokens=4, progress=False)
        train(cfg, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL)

        def best_steps(run):
            return {name: json.loads((run / name / "validation.json").read_text())["metrics"]["step"]
                    for name in ("best_accuracy", "best_calibration")}

        real_link = train_module.link_tree

        def link_tree(src, dst, **kwargs):
            if Path(dst).name.startswith("best_"):
                raise Stop
            return real_link(src, dst, **kwargs)

        stopped = TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "stopped")})
        with monkeypatch.context() as mp:
            mp.setattr(train_module, "link_tree", link_tree)
            tokenizer = make_tokenizer()
            with pytest.raises(Stop):
                train(stopped, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL)
        assert not (tmp_path / "stopped" / "best_accuracy").exists()
        tokenizer = make_tokenizer()
        train(stopped, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL,
              resume_from=tmp_path / "stopped" / "checkpoint-2")
        assert best_steps(tmp_path / "stopped") == best_steps(tmp_path / "run")

    def test_validation_batches_as_eval_batching_says(self, tmp_path, train_on_device, monkeypatch):
        """TrainConfig.eval_batching reaches validation's plan_batches, with eval_batch_size; its default, "auto",
        is "padding" on a CPU."""
        import importlib

        evaluate_module = importlib.import_module("conftok.evaluate")
        seen = []
        real = evaluate_module.plan_batches
        monkeypatch.setattr(evaluate_module, "plan_batches",
                            lambda lengths, batch_size, batching, **kw: seen.append((batch_size, batching))
                            or real(lengths, batch_size, batching, **kw))
        tokenizer = make_tokenizer()
        cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(4)),
                          output_dir=str(tmp_path / "run"), bf16=False, gradient_checkpointing=False, progress=False,
                          batch_size=4, max_steps=1, eval_batch_size=3, max_new_tokens=2, eval_batching="tokens")
        train(cfg, model=make_model(len(tokenizer), device=train_on_device), tokenizer=tokenizer, val_sets=VAL)
        assert seen and set(seen) == {(3, "tokens")}
        assert TrainConfig().eval_batching == "auto"
        if train_on_device.type == "cpu":
            seen.clear()
            train(replace(cfg, eval_batching="auto", output_dir=str(tmp_path / "auto")),
                  model=make_model(len(tokenizer), device=train_on_device), tokenizer=tokenizer, val_sets=VAL)
            assert seen and set(seen) == {(3, "padding")}

    def test_nan_loss_stops_with_the_step(self, tmp_path, train_on_device):
        tokenizer = make_tokenizer()
        model = make_model(len(tokenizer), device=train_on_device)
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
        path = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
        cfg = TrainConfig(model_name="in-process", train_data=path, output_dir=str(tmp_path / "run"), bf16=False,
                          gradient_checkpointing=False, progress=False, batch_size=4)
        with pytest.raises(FloatingPointError, match=r"loss is nan at step 1 \(epoch 1, batch 1\)"):
            train(cfg, model=model, tokenizer=tokenizer, val_sets=VAL)

    def test_an_update_that_overflows_the_weights_stops_at_its_validation(self, tmp_path, train_on_device):
        """A finite loss and gradient, then a step of size 1e30: the weights overflow and the validation
        right after it reads NaN. That is a divergence with its step (a FloatingPointError, which the Ray
        job records and does not retry), not a complaint about NaN confidences in the rows."""
        tokenizer = make_tokenizer()
        path = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
        cfg = TrainConfig(model_name="in-process", train_data=path, output_dir=str(tmp_path / "run"), bf16=False,
                          gradient_checkpointing=False, progress=False, batch_size=4, max_steps=2, eval_steps=1,
                          learning_rate=1e30, warmup_ratio=0.0, lr_scheduler="constant_with_warmup", max_new_tokens=2)
        with pytest.raises(FloatingPointError, match=r"validation after step 1 \(epoch 0\.5\): p_confident is not "
                                                     r"finite on \d+ of \d+ boolq validation rows"):
            train(cfg, model=make_model(len(tokenizer), device=train_on_device), tokenizer=tokenizer, val_sets=VAL)

    def test_a_crash_while_saving_leaves_no_checkpoint(self, tmp_path, train_on_device, monkeypatch):
        """A checkpoint is written whole or not at all: a failure after the adapter is written but
        before the trainer state leaves no checkpoint-N (a resume would pick it and fail) and no
        staging directory."""
        train_module = importlib.import_module("conftok.train")  # `conftok.train` the attribute is the function

        def fail(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(train_module, "save_trainer_state", fail)
        tokenizer = make_tokenizer()
        model = make_model(len(tokenizer), device=train_on_device)
        path = write_jsonl(tmp_path / "t.jsonl", feature_rows(8))
        cfg = TrainConfig(model_name="in-process", train_data=path, output_dir=str(tmp_path / "run"), bf16=False,
                          gradient_checkpointing=False, progress=False, batch_size=4, eval_steps=1, max_steps=1)
        with pytest.raises(OSError, match="disk full"):
            train(cfg, model=model, tokenizer=tokenizer, val_sets=VAL)
        assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == []


class TestResumeGuards:
    """What a resume refuses, and what an interrupted run keeps (16 rows at batch 4: 4 steps an epoch)."""

    @staticmethod
    def config(tmp_path, name="run", **kw):
        path = tmp_path / "t.jsonl"
        if not path.exists():
            write_jsonl(path, feature_rows(16))
        return TrainConfig(**{**dict(model_name="in-process", train_data=str(path), output_dir=str(tmp_path / name),
                                     backend="hf", batch_size=4, num_epochs=2, learning_rate=1e-2, lora_r=4,
                                     lora_alpha=8, bf16=False, gradient_checkpointing=False, calib_beta=4,
                                     eval_batch_size=8, max_new_tokens=4, progress=False, save_total_limit=None),
                              **kw})

    @staticmethod
    def run(cfg, **kw):
        tokenizer = make_tokenizer()
        return train(cfg, model=make_model(len(tokenizer), seed=0), tokenizer=tokenizer, val_sets=VAL, **kw)

    def test_a_run_stopped_at_an_epoch_end_validation_keeps_its_reliability_file(self, tmp_path, train_on_device):
        """Stopped once epoch 1's validation is reported (Ray's report, a preemption right after it): the epoch's
        reliability file is already there, and the resumed run, which goes on after that validation, ends with the
        uninterrupted run's files."""
        class Stop(Exception):
            pass

        def stop_at_4(metrics, checkpoint):
            if metrics["step"] == 4:
                raise Stop

        self.run(self.config(tmp_path))
        stopped = self.config(tmp_path, "stopped")
        with pytest.raises(Stop):
            self.run(stopped, on_validation=stop_at_4)
        assert (tmp_path / "stopped" / "reliability_epoch_1.json").is_file()
        self.run(stopped, resume_from=tmp_path / "stopped" / "checkpoint-4")
        files = lambda run: sorted(p.name for p in (tmp_path / run).iterdir() if p.name.startswith("reliability"))
        assert files("stopped") == files("run") == ["reliability_epoch_1.json", "reliability_epoch_2.json"]

    def test_resume_refuses_training_data_or_domains_changed_in_place(self, tmp_path, train_on_device):
        import yaml

        from conftok.domains import DEFAULT_DOMAINS

        domains_file = tmp_path / "domains.yaml"
        domains_file.write_text(yaml.safe_dump([d.to_dict() for d in DEFAULT_DOMAINS]))
        cfg = self.config(tmp_path, max_steps=4, eval_steps=2, domains=str(domains_file))
        self.run(cfg)
        checkpoint = tmp_path / "run" / "checkpoint-2"
        again = self.config(tmp_path, "again", max_steps=4, eval_steps=2, domains=str(domains_file))
        write_jsonl(tmp_path / "t.jsonl", feature_rows(16, seed=7))  # tagged again, in place
        with pytest.raises(ConfigError, match=r"train_data .*t\.jsonl: its content \(SHA-256\) [0-9a-f]{12}… -> "):
            self.run(again, resume_from=checkpoint)
        write_jsonl(tmp_path / "t.jsonl", feature_rows(16))  # the rows it was trained on: resumes
        domains_file.write_text(yaml.safe_dump([{**d.to_dict(), "datasets": [*d.datasets, f"extra_{d.name}"]}
                                                for d in DEFAULT_DOMAINS]))
        with pytest.raises(ConfigError, match="domains: their content changed"):
            self.run(again, resume_from=checkpoint)
        assert not (tmp_path / "again").exists()  # refused before anything was written
        domains_file.write_text(yaml.safe_dump([d.to_dict() for d in DEFAULT_DOMAINS]))
        assert self.run(again, resume_from=checkpoint).global_step == 4

    def test_domains_given_as_objects_resume(self, tmp_path, train_on_device):
        from conftok.domains import DEFAULT_DOMAINS, resolve_domains

        for name, domains in (("set", resolve_domains()), ("objects", list(DEFAULT_DOMAINS)),
                              ("path", Path(__file__).parents[1] / "domains" / "read_med_math.yaml")):
            cfg = self.config(tmp_path, name, max_steps=4, eval_steps=2, domains=domains)
            json.dumps(cfg.to_dict())  # JSON values, not reprs
            self.run(cfg)
            assert self.run(cfg, resume_from=tmp_path / name / "checkpoint-2").global_step == 4

    def test_a_checkpoint_that_cannot_be_resumed_is_refused_before_the_model_loads(self, tmp_path, monkeypatch):
        train_module = importlib.import_module("conftok.train")
        cfg = self.config(tmp_path, max_steps=4, eval_steps=2, save_total_limit=1)
        self.run(cfg)  # keeps checkpoint-4 whole (its trainer state dropped: finished), checkpoint-2 pruned

        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded")

        monkeypatch.setattr(train_module, "build_model", no_model)
        other = self.config(tmp_path, "other", max_steps=4, eval_steps=2)
        for checkpoint, message in ((tmp_path / "run" / "checkpoint-99", "no such directory"),
                                    (tmp_path / "run" / "checkpoint-2", "pruned by save_total_limit"),
                                    (tmp_path / "run" / "checkpoint-4", "last checkpoint of a finished run")):
            with pytest.raises(FileNotFoundError, match=message):
                train(other, resume_from=checkpoint, val_sets=VAL)
        assert not (tmp_path / "other").exists()

    def test_seed_outside_numpys_range_is_a_config_error(self, tmp_path):
        for seed in (-1, 2 ** 32, 1.5):
            with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
                self.config(tmp_path, seed=seed)
