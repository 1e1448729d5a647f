"""Decisions from p_confident: abstain below a threshold (risk-coverage) or route the least
confident items to a stronger model (Self-REF-style routing).

Both take ``confidence`` (n,) in [0, 1] and ``correct`` (n,) bool: whether the model's ANSWER
was right. Items are ranked most confident first; items with equal confidence share their mean
correctness, so a curve is the expectation over random tie-breaking (a constant confidence, such
as an untrained token's 0.5, gives the random-routing line, not an artefact of row order).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from conftok.calibration import _check_inputs

__all__ = ["risk_coverage_curve", "routing_curve", "area_under_risk_coverage"]


def _ranked(confidence: ArrayLike, correct: ArrayLike, where: str) -> np.ndarray:
    conf, corr = _check_inputs(confidence, correct, where)
    order = np.argsort(-conf, kind="stable")  # most confident first
    conf, corr = conf[order], corr[order]
    _, start, counts = np.unique(-conf, return_index=True, return_counts=True)
    group_mean = np.add.reduceat(corr, start) / counts  # mean correctness of each run of ties
    return np.repeat(group_mean, counts)


def risk_coverage_curve(confidence: ArrayLike, correct: ArrayLike) -> dict[str, list[float]]:
    """Answer only the k most confident items (abstain below a threshold), k = 1..n.

    Returns ``{"coverage": [k/n], "accuracy": [...], "risk": [1 - accuracy]}``, each of length n.
    Example: confidence [0.9, 0.8, 0.3, 0.1], correct [1, 1, 0, 1] -> coverage
    [0.25, 0.5, 0.75, 1.0], risk [0.0, 0.0, 0.333..., 0.25].
    """
    ranked = _ranked(confidence, correct, "risk_coverage_curve")
    k = np.arange(1, len(ranked) + 1)
    accuracy = np.cumsum(ranked) / k
    return {"coverage": (k / len(ranked)).tolist(), "accuracy": accuracy.tolist(), "risk": (1 - accuracy).tolist()}


def area_under_risk_coverage(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Mean risk over coverages 1/n..1 (lower is better; a perfect ranking reaches the floor)."""
    return float(np.mean(risk_coverage_curve(confidence, correct)["risk"]))


def routing_curve(confidence: ArrayLike, correct: ArrayLike, oracle_accuracy: float = 1.0,
                  seed: int = 0) -> dict[str, list[float]]:
    """Route the least confident fraction of items to a stronger model (an oracle that is right
    with probability ``oracle_accuracy``), in the manner of Self-REF; r = 0..n items routed.

    Returns ``{"fraction_routed": [r/n], "accuracy": [...], "random_accuracy": [...]}``:
    accuracy = (right answers among the kept items + oracle_accuracy * r) / n, and the same for
    routing r items chosen at random (the expectation, not a draw, so it is a straight line from
    the model's accuracy to the oracle's). Example: confidence [0.9, 0.8, 0.3, 0.1], correct
    [1, 1, 0, 1] -> accuracy [0.75, 0.75, 1.0, 1.0, 1.0] for 0..4 routed (the 0.1 item was right
    already; routing the 0.3 item fixes the one error), random [0.75, 0.8125, 0.875, 0.9375, 1.0].
    """
    ranked = _ranked(confidence, correct, "routing_curve")
    n = len(ranked)
    kept_right = np.concatenate([[0.0], np.cumsum(ranked)])  # right answers among the top n - r items
    routed = np.arange(n, -1, -1)  # items routed when keeping the top 0..n
    accuracy = (kept_right + oracle_accuracy * routed) / n
    base = ranked.mean()
    r = np.arange(0, n + 1)
    random_accuracy = base + (oracle_accuracy - base) * r / n
    return {"fraction_routed": (r / n).tolist(), "accuracy": accuracy[::-1].tolist(),
            "random_accuracy": random_accuracy.tolist()}
