"""LengthGroupedBatchSampler and padding_share: coverage, determinism, tightness, resume."""

import random

import pytest
import torch

from conftok.sampler import LengthGroupedBatchSampler, padding_share


def skewed_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    """Two domains as in the real rows: short yes/no prompts and long case vignettes."""
    rng = random.Random(seed)
    return [rng.randint(40, 250) if rng.random() < 0.6 else rng.randint(150, 700) for _ in range(n)]


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class TestPaddingShare:
    def test_hand_computed(self):
        # Batches pad to 2 x 4 and 2 x 3 = 14 positions; row 0 gets 2 pads.
        assert padding_share([[0, 1], [2, 3]], [2, 4, 3, 3]) == pytest.approx(2 / 14)

    def test_equal_lengths_and_empty(self):
        assert padding_share([[0, 1, 2]], [5, 5, 5]) == 0.0
        assert padding_share([], [1, 2]) == 0.0
        assert padding_share([[], [1]], [1, 2]) == 0.0

    def test_one_long_row(self):
        # 3 rows padded to 10: 30 positions, 1 + 1 + 10 real.
        assert padding_share([[0, 1, 2]], [1, 1, 10]) == pytest.approx(18 / 30)


class TestLengthGroupedBatchSampler:
    @pytest.mark.parametrize("n,batch_size,group_factor", [(1000, 8, 64), (37, 8, 2), (5, 8, 64), (64, 8, 1), (1, 1, 1)])
    def test_every_row_once(self, n, batch_size, group_factor):
        sampler = LengthGroupedBatchSampler(skewed_lengths(n), batch_size, seed=3, group_factor=group_factor)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert sum(len(b) < batch_size for b in batches) <= 1

    def test_drop_last(self):
        lengths = skewed_lengths(37)
        sampler = LengthGroupedBatchSampler(lengths, 8, seed=1, drop_last=True, group_factor=2)
        batches = list(sampler)
        assert len(sampler) == len(batches) == 4
        assert all(len(b) == 8 for b in batches)
        assert len({i for b in batches for i in b}) == 32
        # Divisible: nothing dropped.
        exact = LengthGroupedBatchSampler(skewed_lengths(32), 8, drop_last=True)
        assert len(exact) == 4 and sorted(i for b in exact for i in b) == list(range(32))

    def test_deterministic_per_seed_and_epoch(self):
        lengths = skewed_lengths()
        a = list(LengthGroupedBatchSampler(lengths, 8, seed=5, epoch=2))
        b = list(LengthGroupedBatchSampler(lengths, 8, seed=5, epoch=2))
        assert a == b
        sampler = LengthGroupedBatchSampler(lengths, 8, seed=5)
        assert list(sampler) == list(sampler)  # iterating twice gives the same epoch

    def test_epochs_and_seeds_differ(self):
        lengths = skewed_lengths()
        sampler = LengthGroupedBatchSampler(lengths, 8, seed=5)
        epoch0 = list(sampler)
        sampler.set_epoch(1)
        epoch1 = list(sampler)
        assert epoch0 != epoch1
        # Different grouping, not only a different order of the same batches.
        assert {tuple(sorted(b)) for b in epoch0} != {tuple(sorted(b)) for b in epoch1}
        assert epoch1 == list(LengthGroupedBatchSampler(lengths, 8, seed=5, epoch=1))
        assert list(LengthGroupedBatchSampler(lengths, 8, seed=6)) != epoch0
        # (seed, epoch) is mixed as a pair, not summed.
        assert list(LengthGroupedBatchSampler(lengths, 8, seed=1, epoch=0)) != \
            list(LengthGroupedBatchSampler(lengths, 8, seed=0, epoch=1))

    def test_batches_hold_similar_lengths(self):
        lengths = skewed_lengths(2000)
        grouped = padding_share(LengthGroupedBatchSampler(lengths, 8, seed=0), lengths)
        shuffled = padding_share(random_batches(len(lengths), 8), lengths)
        assert shuffled > 0.3, shuffled  # the distribution is skewed enough to matter
        assert grouped < 0.05, grouped
        # group_factor=1 only sorts within random batches: no better than random.
        assert padding_share(LengthGroupedBatchSampler(lengths, 8, group_factor=1), lengths) == \
            pytest.approx(shuffled, abs=0.05)

    def test_batch_order_is_shuffled(self):
        lengths = list(range(800))  # all distinct: a sorted epoch would show as monotone batch maxima
        longest = [max(lengths[i] for i in b) for b in LengthGroupedBatchSampler(lengths, 8, seed=0)]
        assert longest != sorted(longest) and longest != sorted(longest, reverse=True)

    def test_a_new_sampler_for_the_same_seed_and_epoch_gives_the_same_batches(self):
        """What a resumed run relies on: it builds a new sampler and skips the batches it has trained (that
        skip, with gradient accumulation, is test_train_resumed_mid_epoch_sees_the_same_batches, below);
        another epoch gives another order."""
        lengths = skewed_lengths(300)
        full = list(LengthGroupedBatchSampler(lengths, 4, seed=42, epoch=1))
        assert list(LengthGroupedBatchSampler(lengths, 4, seed=42, epoch=1)) == full
        assert list(LengthGroupedBatchSampler(lengths, 4, seed=42, epoch=2)) != full

    def test_dataloader_batch_sampler(self):
        lengths = [3, 1, 2, 5, 4, 4, 1]
        data = [torch.arange(n) for n in lengths]
        sampler = LengthGroupedBatchSampler(lengths, 2, seed=0, group_factor=8)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=lambda rows: [len(r) for r in rows])
        assert len(loader) == 4
        seen = list(loader)
        assert sorted(n for b in seen for n in b) == sorted(lengths)
        assert seen == [[lengths[i] for i in b] for b in sampler]

    def test_bad_arguments_listed_together(self):
        with pytest.raises(ValueError, match="batch_size.*0.*group_factor.*0") as err:
            LengthGroupedBatchSampler([1, 2], 0, group_factor=0)
        assert "epoch" not in str(err.value)
        with pytest.raises(ValueError, match="lengths must be >= 0"):
            LengthGroupedBatchSampler([1, -2], 2)
        with pytest.raises(ValueError, match="epoch"):
            LengthGroupedBatchSampler([1, 2], 2).set_epoch(-1)


VAL = {
    "boolq": [{"id": "b0", "question": "is code alpha red", "passage": "The barn is red.", "answer": True},
              {"id": "b1", "question": "is code beta red", "passage": "The barn is red.", "answer": False}],
    "medqa": [{"id": "m0", "question": "code alpha: which drug", "answer": "A",
               "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}],
}


def test_train_resumed_mid_epoch_sees_the_same_batches(tmp_path, capsys):
    """train() with length-grouped batches, resumed from a checkpoint in the middle of epoch 2 (it skips
    step_in_epoch * gradient_accumulation_steps batches), ends on the uninterrupted run's adapter."""
    from conftest import feature_rows, make_model, make_tokenizer, write_jsonl
    from safetensors.torch import load_file

    from conftok import TrainConfig, train

    tokenizer = make_tokenizer()
    make_model(len(tokenizer), seed=0).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = feature_rows(48, seed=3)
    for i, row in enumerate(rows):  # lengths that differ, so grouping changes the batches
        row["question"] = " ".join(["code red farm"] * (i % 7)) + " " + row["question"]
    # 12 batches of 4 an epoch, 2 per step: 6 steps an epoch; checkpoint-8 is 2 steps into epoch 2.
    cfg = TrainConfig(model_name=str(tmp_path / "base"), train_data=write_jsonl(tmp_path / "train.jsonl", rows),
                      output_dir=str(tmp_path / "full"), backend="hf", num_epochs=2, batch_size=4,
                      gradient_accumulation_steps=2, learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      eval_steps=4, bf16=False, gradient_checkpointing=False, calib_beta=2, eval_batch_size=4,
                      max_new_tokens=2, logging_steps=1, progress=False, seed=7,
                      save_total_limit=None)  # checkpoint-8 kept whole to resume from
    full = train(cfg, val_sets=VAL)
    assert "Length-grouped batches:" in capsys.readouterr().out
    resumed = train(TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "resumed")}), val_sets=VAL,
                    resume_from=tmp_path / "full" / "checkpoint-8")
    assert full.global_step == resumed.global_step == 12
    a = load_file(str(full.final_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    middle = load_file(str(tmp_path / "full" / "checkpoint-8" / "adapter_model.safetensors"))
    assert max((a[k].float() - middle[k].float()).abs().max().item() for k in a) > 1e-3  # it trained on


def test_cli_flag():
    import argparse

    from ray_jobs.common import add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert config_from_args(parser.parse_args([])).group_by_length is True
    assert config_from_args(parser.parse_args(["--no-group_by_length"])).group_by_length is False
