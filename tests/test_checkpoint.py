"""conftok.checkpoint: the trainer state round-trips through JSON + safetensors (no pickle), the
random states of Python, numpy, the CPU and CUDA included, on the device the suite runs on."""

import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from conftok.checkpoint import (
    TRAINER_STATE_FILE,
    TRAINER_STATE_FILES,
    TRAINER_TENSORS_FILE,
    get_rng_state,
    load_trainer_state,
    save_trainer_state,
    set_rng_state,
)


def stepped(device, seed):
    """A linear layer on ``device`` after 3 AdamW steps (moments set) under a warmup schedule."""
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4, device=device)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def next_draws(device):
    return torch.rand(3).tolist(), torch.rand(3, device=device).tolist(), np.random.rand(2).tolist(), random.random()


class TestTrainerState:
    def test_round_trip(self, tmp_path, device):
        model, optimizer, scheduler = stepped(device, seed=0)
        state = {"global_step": 3, "epoch": 0, "best_accuracy": -math.inf,
                 "history": [{"val/auroc": math.nan, "step": 3}]}
        np.random.seed(5)
        random.seed(6)
        save_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler, state=state)
        expected = next_draws(device)  # what a run going on from here draws next
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TRAINER_STATE_FILES)

        _, fresh_optimizer, fresh_scheduler = stepped(device, seed=1)  # other moments, other random states
        loaded = load_trainer_state(tmp_path, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

        assert next_draws(device) == expected  # on CUDA, the CUDA generator came back too
        assert loaded["global_step"] == 3 and loaded["best_accuracy"] == -math.inf
        assert math.isnan(loaded["history"][0]["val/auroc"])
        before, after = optimizer.state_dict(), fresh_optimizer.state_dict()
        assert after["param_groups"] == before["param_groups"]  # betas a tuple again
        assert after["state"].keys() == before["state"].keys() == {0, 1}
        for index, moments in before["state"].items():
            for name, value in moments.items():
                assert torch.equal(after["state"][index][name].cpu(), value.cpu()), (index, name)
        assert after["state"][0]["exp_avg"].device == next(model.parameters()).device
        assert fresh_scheduler.state_dict() == scheduler.state_dict()
        assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()

    def test_files_are_json_and_safetensors(self, tmp_path, device):
        from safetensors.torch import load_file

        _, optimizer, scheduler = stepped(device, seed=0)
        save_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler, state={"global_step": 3})
        saved = json.loads((tmp_path / TRAINER_STATE_FILE).read_text())
        tensors = load_file(str(tmp_path / TRAINER_TENSORS_FILE))
        assert saved["state"] == {"global_step": 3}
        assert saved["optimizer"]["state"]["__int_keys__"]["0"]["exp_avg"] == {"__tensor__": "trainer.optimizer.state.0.exp_avg"}
        assert tensors["trainer.optimizer.state.0.exp_avg"].shape == (3, 4)
        assert tensors["trainer.rng.torch"].dtype == torch.uint8
        cuda_states = [k for k in tensors if k.startswith("trainer.rng.cuda.")]
        if device.type == "cuda":
            assert len(cuda_states) == torch.cuda.device_count()
        elif not torch.cuda.is_available():
            assert cuda_states == [] and "cuda" not in saved["rng"]

    def test_refuses_what_json_cannot_hold(self, tmp_path, device):
        _, optimizer, scheduler = stepped(device, seed=0)
        with pytest.raises(TypeError, match=r"trainer\.state\.seen: a set cannot be saved without pickle"):
            save_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler, state={"seen": {1, 2}})
        assert list(tmp_path.iterdir()) == []  # nothing half written

    def test_missing_files_are_named(self, tmp_path, device):
        _, optimizer, scheduler = stepped(device, seed=0)
        save_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler, state={})
        (tmp_path / TRAINER_TENSORS_FILE).unlink()
        with pytest.raises(FileNotFoundError, match=TRAINER_TENSORS_FILE):
            load_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler)

    def test_cuda_states_without_cuda_warn(self, monkeypatch, caplog):
        state = {**get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}  # as saved on a GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with caplog.at_level(logging.WARNING, logger="conftok.checkpoint"):
            set_rng_state(state)
        assert "1 CUDA random state(s) but CUDA is not available" in caplog.text


def test_remove_leftovers_deletes_the_writes_of_dead_processes_only(tmp_path):
    """A process killed mid-save leaves its staging directory (half a checkpoint), a moved-aside directory or a
    temporary file, each named with its pid; conftok.train removes those of processes no longer running when it
    starts in that output_dir. A running process's (this one's, its parent's) and every other entry stay."""
    import os
    import subprocess
    import sys

    from conftok.checkpoint import link_tree, remove_leftovers

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    left = [f".checkpoint-8.staging-{dead}", f".best_accuracy.tmp-{dead}-k2x_9a", f".final.old-{dead}"]
    kept = [f".checkpoint-10.staging-{os.getpid()}", f".final.old-{os.getppid()}", "checkpoint-6", ".hidden",
            ".staging-12", "best_calibration", "final"]
    for name in left + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / f".validation.json.tmp-{dead}").write_text("{")
    left.append(f".validation.json.tmp-{dead}")
    # Killed between moving best_accuracy/ aside and renaming its replacement in: the old one is put back.
    (tmp_path / f".best_accuracy.old-{dead}").mkdir()
    (tmp_path / f".best_accuracy.old-{dead}" / "validation.json").write_text("{}")
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "best_accuracy"])
    assert (tmp_path / "best_accuracy" / "validation.json").read_text() == "{}"
    # link_tree's and save_adapter's temporaries carry the pid too: a killed one is found the same way
    link_tree(tmp_path / "checkpoint-6", tmp_path / "final")
    assert remove_leftovers(tmp_path) == [] and remove_leftovers(tmp_path / "nothing") == []
