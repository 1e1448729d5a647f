"""Sanity checks: the package imports lean, the config checks itself, public names exist."""

import subprocess
import sys

import pytest

import conftok
from conftok import TrainConfig
from conftok.config import ConfigError


class TestSanityChecks:
    def test_import_pulls_in_no_optional_backend(self):
        code = ("import sys, conftok; bad = [m for m in ('ray', 'unsloth', 'bitsandbytes', 'peft') if m in sys.modules];"
                "print(bad); sys.exit(1 if bad else 0)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_public_api(self):
        for name in conftok.__all__:
            assert hasattr(conftok, name), name
        assert callable(conftok.calibration_error) and callable(conftok.train)

    def test_seed_defaults(self):
        cfg = TrainConfig()
        assert (cfg.num_epochs, cfg.batch_size, cfg.gradient_accumulation_steps) == (3, 8, 1)
        assert (cfg.learning_rate, cfg.warmup_ratio, cfg.weight_decay, cfg.max_grad_norm) == (2e-4, 0.03, 0.01, 1.0)
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
        assert (cfg.calib_beta, cfg.calib_p_norm, cfg.max_seq_length, cfg.bf16, cfg.seed) == (100, "2", 2048, True, 42)
        assert cfg.hf_repo is None and cfg.eval_steps == 500
        assert cfg.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def test_config_reports_every_problem_at_once(self):
        with pytest.raises(ConfigError) as e:
            TrainConfig(batch_size=0, learning_rate=-1.0, calib_p_norm="3", backend="jax", warmup_ratio=1.5,
                        eval_steps=0, quantization="2bit", eval_batching="bytes")
        msg = str(e.value)
        for field in ("batch_size", "learning_rate", "calib_p_norm", "backend", "warmup_ratio", "eval_steps",
                      "quantization", "eval_batching"):
            assert field in msg, field
        assert "got 'jax'" in msg and "['1', '2', 'infty']" in msg

    def test_config_round_trips_through_a_dict(self):
        cfg = TrainConfig(lora_r=64, val_sources={"boolq": "v.jsonl"})
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ConfigError, match="unknown TrainConfig field"):
            TrainConfig.from_dict({"lora_rank": 8})

    def test_every_config_field_has_help(self):
        import dataclasses

        assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
