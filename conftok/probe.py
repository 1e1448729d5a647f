"""Is correctness readable from the model at all? A linear probe, and bootstrap intervals.

The probe is the ceiling the trained token is compared with: logistic regression on the base
model's last hidden state at the end of its answer (the position whose output the confidence
token would be read from), scored by AUROC on rows it was not fitted on. If the probe cannot tell
right answers from wrong ones, neither can a token read from the same place.

Everything here is torch and numpy (no scikit-learn): L2-regularised logistic regression fitted
with L-BFGS on standardised features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from conftok.calibration import auroc
from conftok.loss import position_ids_from_mask

__all__ = ["answer_end_states", "fit_logistic", "cross_validated_auroc", "probe_auroc", "bootstrap_interval"]


@torch.no_grad()
def answer_end_states(model, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 16,
                      layer: int = -1) -> np.ndarray:
    """Hidden state (N, H) of ``layer`` at the last position of each id sequence (prompt + answer).

    Sequences are left-padded in batches of similar length; the last position is each row's own.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, length - len(sequences[i]):] = torch.tensor(list(sequences[i]))
            mask[row, length - len(sequences[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        forward = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        output_hidden_states=True, use_cache=False, logits_to_keep=1)  # its hidden states only
        hidden = forward.hidden_states[layer][:, -1]  # (B, H)
        for row, i in enumerate(idx):
            out[i] = hidden[row].float().cpu().numpy()
    return np.stack(out)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """Fit ``p(y=1 | x) = sigmoid(w . z + b)`` on standardised ``z``; returns a scoring function.

    ``l2`` is the penalty on ``w`` (sum of squares, relative to the mean log-loss times n).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.tensor((x - mean) / std)
    t = torch.tensor(y)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, t, reduction="sum") + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach().numpy(), float(b.detach())

    def score(x_new: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(((np.asarray(x_new, dtype=np.float64) - mean) / std) @ w_ + b_)))

    return score


def cross_validated_auroc(x: np.ndarray, y: np.ndarray, *, folds: int = 5, l2: float = 1.0, seed: int = 0) -> float:
    """AUROC of out-of-fold probe scores: each row scored by a probe fitted on the other folds."""
    y = np.asarray(y, dtype=float)
    order = np.random.default_rng(seed).permutation(len(y))
    scores = np.empty(len(y))
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        scores[test] = fit_logistic(x[train], y[train], l2)(x[test])
    return auroc(scores, y)


def probe_auroc(x_train, y_train, x_test, y_test, *, l2: float = 1.0) -> tuple[float, np.ndarray]:
    """Fit on one part, score another: ``(AUROC on the test part, test scores)``."""
    scores = fit_logistic(x_train, y_train, l2)(x_test)
    return auroc(scores, np.asarray(y_test, dtype=float)), scores


def bootstrap_interval(statistic: Callable[[np.ndarray, np.ndarray], float], confidence, correct, *,
                       n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(confidence, correct)`` over resampled rows.

    Resamples where the statistic is undefined (NaN, e.g. AUROC with one class) are dropped.
    """
    conf = np.asarray(confidence, dtype=float)
    corr = np.asarray(correct, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(conf), len(conf))
        values.append(statistic(conf[idx], corr[idx]))  # one class: AUROC is NaN there, Brier and CE are not
    values = np.asarray([v for v in values if np.isfinite(v)])
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
