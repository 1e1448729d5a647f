"""The linear probe and the bootstrap interval, on data whose answer is known."""

import numpy as np
import pytest

from conftok.calibration import auroc
from conftok.probe import answer_end_states, bootstrap_interval, cross_validated_auroc, fit_logistic, probe_auroc


def _data(n, signal, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    x = rng.normal(size=(n, 20))
    x[:, 3] += signal * y  # one informative direction among noise
    return x, y.astype(float)


def test_probe_finds_a_linear_signal_and_not_noise():
    x, y = _data(400, signal=2.0)
    assert cross_validated_auroc(x, y) > 0.85
    noise_x, noise_y = _data(400, signal=0.0, seed=1)
    assert abs(cross_validated_auroc(noise_x, noise_y) - 0.5) < 0.1
    held_x, held_y = _data(200, signal=2.0, seed=2)
    score, scores = probe_auroc(x, y, held_x, held_y)
    assert score > 0.85 and scores.shape == (200,) and ((0 < scores) & (scores < 1)).all()


def test_fit_logistic_recovers_probabilities():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 1))
    y = (rng.random(4000) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(float)
    p = fit_logistic(x, y, l2=0.0)(np.array([[0.0], [1.0]]))
    assert p[0] == pytest.approx(0.5, abs=0.05) and p[1] == pytest.approx(1 / (1 + np.exp(-2)), abs=0.05)


def test_bootstrap_interval_holds_the_estimate_and_narrows():
    x, y = _data(100, signal=0.0, seed=4)
    conf = np.clip(y * 0.3 + np.random.default_rng(5).random(100) * 0.7, 0, 1)
    low, high = bootstrap_interval(auroc, conf, y, n_resamples=300)
    assert low < auroc(conf, y) < high
    big_conf, big_y = np.tile(conf, 16), np.tile(y, 16)
    big_low, big_high = bootstrap_interval(auroc, big_conf, big_y, n_resamples=300)
    assert big_high - big_low < (high - low) / 2
    assert np.isnan(bootstrap_interval(auroc, [0.5, 0.6], [1, 1])[0])  # one class: undefined


def test_bootstrap_interval_keeps_one_class_resamples_where_the_statistic_is_defined():
    from conftok.calibration import brier_score

    conf = np.array([0.9, 0.8, 0.7, 0.6])
    low, high = bootstrap_interval(brier_score, conf, [1, 1, 1, 1], n_resamples=200)
    assert 0.01 <= low < high <= 0.16  # every row right: Brier is (1 - p)^2, from 0.01 to 0.16
    rng = np.random.default_rng(0)  # mostly right: resamples of right rows only must not be dropped
    conf, y = rng.uniform(0.5, 1, 12), np.r_[np.ones(11), 0]
    low, high = bootstrap_interval(brier_score, conf, y, n_resamples=2000)
    assert low < brier_score(conf[y == 1], y[y == 1]) + 1e-3  # the all-right resamples (~1/3 of them) count


def test_answer_end_states_reads_each_rows_own_last_position(tokenizer, device):
    from conftest import make_model

    model = make_model(len(tokenizer), device=device)
    seqs = [[5, 6, 7], [8, 9], [5, 6, 7, 10, 11]]
    states = answer_end_states(model, seqs, pad_id=tokenizer.pad_token_id, batch_size=2)
    import torch

    for seq, state in zip(seqs, states, strict=True):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([seq], device=device), output_hidden_states=True).hidden_states[-1][0, -1]
        assert np.allclose(state, alone.float().cpu().numpy(), atol=1e-4)
