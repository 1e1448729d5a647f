"""Calibration metrics for a confidence score against answer correctness.

Every function takes the same two arrays, one entry per answered item:

- ``confidence``: shape ``(n,)``, floats in ``[0, 1]``; the model's probability that its
  answer is right (in conftok, ``p_confident`` read at the confidence token).
- ``correct``: shape ``(n,)``, bool or 0/1; whether the ANSWER was right.

Inputs are checked once, in ``_check_inputs``: an empty, ragged, non-1-D, NaN, out-of-range
or non-binary input raises one ``ValueError`` that lists every problem found. All results are
plain Python ``float``/``int``/``None`` so they go straight into JSON and Ray Tune results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "CALIBRATION_P_NORMS",
    "RELIABILITY_STRATEGIES",
    "auroc",
    "brier_score",
    "calibration_error",
    "reliability_bins",
]

CALIBRATION_P_NORMS = ("1", "2", "infty")
RELIABILITY_STRATEGIES = ("uniform", "quantile")


def _first_offender(values: np.ndarray, bad: np.ndarray) -> str:
    index = int(np.flatnonzero(bad)[0])
    return f"{values[index].item()!r} at index {index}"


def _as_1d(name: str, values: ArrayLike, problems: list[str]) -> np.ndarray | None:
    """Return ``values`` as a 1-D numeric array, or record why it is not and return None."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        problems.append(
            f"{name} must hold numbers or bools, got dtype {array.dtype} "
            f"(allowed: bool, int or float)"
        )
        return None
    if array.ndim != 1:
        problems.append(f"{name} must be 1-D with shape (n,), got shape {array.shape}")
        return None
    if array.size == 0:
        problems.append(f"{name} is empty; need at least one item")
        return None
    return array


def _check_inputs(
    confidence: ArrayLike, correct: ArrayLike, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the shared ``(confidence, correct)`` pair; return both as float64 arrays.

    ``where`` (the public function's name) starts the message. All problems of the pair are
    gathered into one ``ValueError`` instead of stopping at the first.
    """
    problems: list[str] = []
    conf = _as_1d("confidence", confidence, problems)
    corr = _as_1d("correct", correct, problems)

    if conf is not None:
        conf = conf.astype(np.float64)
        nan = np.isnan(conf)
        if nan.any():
            problems.append(
                f"confidence contains {int(nan.sum())} NaN value(s) (first at index "
                f"{int(np.flatnonzero(nan)[0])}); allowed: floats in [0, 1]"
            )
        outside = ~nan & ((conf < 0.0) | (conf > 1.0))
        if outside.any():
            problems.append(
                f"confidence has {int(outside.sum())} value(s) outside [0, 1] "
                f"(first: {_first_offender(conf, outside)})"
            )

    if corr is not None:
        corr = corr.astype(np.float64)
        not_binary = (corr != 0.0) & (corr != 1.0)  # NaN compares unequal, so it lands here
        if not_binary.any():
            problems.append(
                f"correct has {int(not_binary.sum())} value(s) that are not bool or 0/1 "
                f"(first: {_first_offender(corr, not_binary)})"
            )

    if conf is not None and corr is not None and conf.shape != corr.shape:
        problems.append(
            f"confidence and correct must have the same length, got {conf.shape[0]} "
            f"and {corr.shape[0]}"
        )

    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return conf, corr


def _check_positive_int(name: str, value: Any, where: str) -> int:
    # bool is an int subclass; beta=True is a bug in the caller, not a bin size of 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be a positive int (>= 1), got {value}")
    return int(value)


def _normalise_p(p: Any) -> str:
    if isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)) and p in (1, 2):
        return str(int(p))
    if isinstance(p, str) and p in CALIBRATION_P_NORMS:
        return p
    raise ValueError(
        f"calibration_error: unknown p={p!r}; allowed: '1', '2', 'infty' (or the ints 1, 2)"
    )


def _legacy_calib_err(confidence: np.ndarray, correct: np.ndarray, p: str, beta: int) -> float:
    """Hendrycks' original ``calib_err``, bugs included, re-implemented from its description.

    Differences from :func:`calibration_error` that it keeps on purpose: the default
    (quicksort, not stable) argsort, so tied confidences may be ordered differently on another
    numpy or CPU; and the loop over ``len(bins) - 1`` bins, which never scores the last bin
    (the one holding the highest confidences and the remainder). With one bin
    (``beta <= n < 2 * beta``) nothing is scored and the result is 0.0.
    """
    n = len(confidence)
    if n < beta:
        # The original indexes bins[-1] of an empty list here and dies with an IndexError.
        raise ValueError(
            f"calibration_error: legacy=True needs at least beta items (n >= beta), got "
            f"n={n} and beta={beta}; use legacy=False, which scores n < beta as one bin"
        )
    idxs = np.argsort(confidence)
    confidence = confidence[idxs]
    correct = correct[idxs]
    bins = [[i * beta, (i + 1) * beta] for i in range(n // beta)]
    bins[-1] = [bins[-1][0], n]

    cerr = 0.0
    total_examples = n
    for i in range(len(bins) - 1):  # the original's bug: the last bin is skipped
        bin_confidence = confidence[bins[i][0] : bins[i][1]]
        bin_correct = correct[bins[i][0] : bins[i][1]]
        num_examples_in_bin = len(bin_confidence)
        if num_examples_in_bin > 0:
            difference = np.abs(np.nanmean(bin_confidence) - np.nanmean(bin_correct))
            if p == "2":
                cerr += num_examples_in_bin / total_examples * np.square(difference)
            elif p == "1":
                cerr += num_examples_in_bin / total_examples * difference
            else:  # "infty"
                cerr = np.maximum(cerr, difference)
    if p == "2":
        cerr = np.sqrt(cerr)
    return float(cerr)


def calibration_error(
    confidence: ArrayLike,
    correct: ArrayLike,
    beta: int = 100,
    p: str | int = "2",
    legacy: bool = False,
) -> float:
    """Equal-mass binned calibration error (Hendrycks' ``calib_err``, with its bugs fixed).

    Args:
        confidence: shape ``(n,)``, floats in ``[0, 1]``; the model's confidence per item.
        correct: shape ``(n,)``, bool or 0/1; whether the item's answer was right.
        beta: target bin size (items per bin), a positive int.
        p: ``"1"`` (weighted mean gap), ``"2"`` (root weighted mean squared gap) or
            ``"infty"`` (largest gap); the ints ``1`` and ``2`` are accepted too.
        legacy: reproduce the original ``calib_err`` numbers, bugs included (see below).

    Returns:
        The calibration error in ``[0, 1]``; 0 means each bin's mean confidence equals its
        accuracy.

    Items are sorted by confidence and cut into ``max(n // beta, 1)`` consecutive bins of
    ``beta`` items; the last bin also takes the ``n % beta`` remainder, and ``n < beta`` gives a
    single bin holding everything. Items of equal confidence count with their tie group's mean
    correctness (each bin's accuracy is then its expectation over every order of the ties), so
    the result does not depend on the order items come in: a constant confidence ``c`` gives
    ``|c - accuracy|`` whatever the bins. (A bin edge inside a tie group would otherwise split
    it by input order: a constant 0.5 with 35 of 100 right gave 0.15 to 0.44 at ``beta=25``.) For bin
    ``b`` with ``n_b`` items, ``d_b = |mean confidence - mean correct|`` and ``w_b = n_b / n``:

    - ``p="1"``: ``sum_b w_b * d_b``
    - ``p="2"``: ``sqrt(sum_b w_b * d_b**2)``
    - ``p="infty"``: ``max_b d_b``

    ``legacy=True`` follows the original instead: unstable (quicksort) argsort, the LAST bin
    is never scored (so ``beta <= n < 2 * beta`` returns 0.0), and ``n < beta`` raises
    ``ValueError`` (the original crashes with an IndexError).

    Example: 4 items, ``beta=2``, so bins ``{0.25, 0.5}`` and ``{0.75, 1.0}``, ``w = 1/2`` each.
    Bin 1: mean confidence 0.375, accuracy 1/2, ``d = 0.125``. Bin 2: mean confidence 0.875,
    accuracy 0, ``d = 0.875``.

    >>> conf, right = [0.25, 0.5, 0.75, 1.0], [1, 0, 0, 0]
    >>> calibration_error(conf, right, beta=2, p="1")  # (0.125 + 0.875) / 2
    0.5
    >>> calibration_error(conf, right, beta=2, p="2")  # sqrt((0.125**2 + 0.875**2) / 2)
    0.625
    >>> calibration_error(conf, right, beta=2, p="infty")
    0.875
    >>> calibration_error(conf, right, beta=2, p="1", legacy=True)  # bin 2 skipped: 0.125 / 2
    0.0625
    """
    beta = _check_positive_int("beta", beta, "calibration_error")
    p = _normalise_p(p)
    conf, corr = _check_inputs(confidence, correct, "calibration_error")
    if legacy:
        # The original computes on the arrays as given (e.g. float32 means stay float32);
        # keep their dtypes so the numbers match to the last bit.
        return _legacy_calib_err(np.asarray(confidence), np.asarray(correct), p, beta)

    n = conf.shape[0]
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], _tie_means(conf[order], corr[order])
    n_bins = max(n // beta, 1)
    starts = np.arange(n_bins) * beta  # (n_bins,)
    sizes = np.full(n_bins, beta)
    sizes[-1] = n - starts[-1]  # the last bin takes the remainder (or all of n < beta)
    gaps = np.abs(np.add.reduceat(conf, starts) / sizes - np.add.reduceat(corr, starts) / sizes)
    weights = sizes / n
    if p == "1":
        return float(np.sum(weights * gaps))
    if p == "2":
        return float(np.sqrt(np.sum(weights * gaps**2)))
    return float(np.max(gaps))


def reliability_bins(
    confidence: ArrayLike,
    correct: ArrayLike,
    n_bins: int = 10,
    strategy: str = "uniform",
) -> list[dict[str, float | int | None]]:
    """Per-bin mean confidence and accuracy: the points of a reliability diagram.

    Args:
        confidence: shape ``(n,)``, floats in ``[0, 1]``.
        correct: shape ``(n,)``, bool or 0/1.
        n_bins: number of bins, a positive int.
        strategy: ``"uniform"``: ``n_bins`` equal-width bins on ``[0, 1]``, bin ``i`` is
            ``[i / n_bins, (i + 1) / n_bins)`` and the last one is closed, so 1.0 lands in it.
            ``"quantile"``: equal-mass bins, like :func:`calibration_error`'s: items sorted by
            confidence and split into ``min(n_bins, n)`` consecutive chunks whose sizes differ
            by at most one, tied items counting with their group's mean correctness (as there);
            ``lower``/``upper`` are the smallest and largest confidence in the chunk.

    Returns:
        One JSON-serialisable dict per bin, in increasing confidence: ``lower``, ``upper``
        (float edges), ``count`` (int), ``mean_confidence`` and ``accuracy`` (floats, or
        None for an empty bin). The counts sum to ``n``.

    Example: two uniform bins, ``[0, 0.5)`` holds 0.125 and 0.375, ``[0.5, 1]`` holds 0.75
    and 1.0.

    >>> bins = reliability_bins([0.125, 0.375, 0.75, 1.0], [0, 1, 1, 1], n_bins=2)
    >>> bins[0]
    {'lower': 0.0, 'upper': 0.5, 'count': 2, 'mean_confidence': 0.25, 'accuracy': 0.5}
    >>> bins[1]
    {'lower': 0.5, 'upper': 1.0, 'count': 2, 'mean_confidence': 0.875, 'accuracy': 1.0}
    """
    n_bins = _check_positive_int("n_bins", n_bins, "reliability_bins")
    if strategy not in RELIABILITY_STRATEGIES:
        raise ValueError(
            f"reliability_bins: unknown strategy={strategy!r}; allowed: "
            + ", ".join(repr(s) for s in RELIABILITY_STRATEGIES)
        )
    conf, corr = _check_inputs(confidence, correct, "reliability_bins")

    bins: list[dict[str, float | int | None]] = []
    if strategy == "uniform":
        # i / n_bins rather than np.linspace: linspace gives 0.30000000000000004 for 3/10,
        # and membership must agree with the edges we report.
        edges = np.arange(n_bins + 1) / n_bins
        index = np.searchsorted(edges, conf, side="right") - 1
        index = np.minimum(index, n_bins - 1)  # 1.0 goes in the last (closed) bin
        for i in range(n_bins):
            members = index == i
            count = int(members.sum())
            bins.append(
                {
                    "lower": float(edges[i]),
                    "upper": float(edges[i + 1]),
                    "count": count,
                    "mean_confidence": float(conf[members].mean()) if count else None,
                    "accuracy": float(corr[members].mean()) if count else None,
                }
            )
        return bins

    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], _tie_means(conf[order], corr[order])
    for chunk in np.array_split(np.arange(conf.shape[0]), min(n_bins, conf.shape[0])):
        bins.append(
            {
                "lower": float(conf[chunk].min()),
                "upper": float(conf[chunk].max()),
                "count": int(chunk.size),
                "mean_confidence": float(conf[chunk].mean()),
                "accuracy": float(corr[chunk].mean()),
            }
        )
    return bins


def _tie_means(sorted_conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """``corr`` (in the order of ``sorted_conf``, ascending) with each run of equal confidences given its mean."""
    if sorted_conf.shape[0] == 0:
        return corr
    starts = np.flatnonzero(np.r_[True, sorted_conf[1:] != sorted_conf[:-1]])  # first of each tie group
    sizes = np.diff(np.r_[starts, sorted_conf.shape[0]])
    return np.repeat(np.add.reduceat(corr, starts) / sizes, sizes)


def brier_score(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Mean squared gap between confidence and correctness: ``mean((confidence - correct)**2)``.

    Args:
        confidence: shape ``(n,)``, floats in ``[0, 1]``.
        correct: shape ``(n,)``, bool or 0/1.

    Returns:
        A float in ``[0, 1]``; 0 for confidence 1 on every right answer and 0 on every wrong
        one, 0.25 for a constant 0.5.

    >>> brier_score([0.75, 0.5], [1, 0])  # ((0.75 - 1)**2 + (0.5 - 0)**2) / 2
    0.15625
    """
    conf, corr = _check_inputs(confidence, correct, "brier_score")
    return float(np.mean((conf - corr) ** 2))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first of each tie group
    ends = np.r_[starts[1:], ordered.size]  # one past the last
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """AUROC of confidence as a detector of right answers (positives = ``correct``).

    The probability that a random right answer gets a higher confidence than a random wrong
    one, ties counting one half, computed from average ranks (Mann-Whitney U):
    ``(sum of positives' ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)``.

    Args:
        confidence: shape ``(n,)``, floats in ``[0, 1]``.
        correct: shape ``(n,)``, bool or 0/1.

    Returns:
        A float in ``[0, 1]``: 1.0 when every right answer is more confident than every
        wrong one, 0.5 for no signal (e.g. all confidences equal), 0.0 when inverted.
        ``float('nan')`` (no error) when all items are right or all are wrong, because the
        AUROC is undefined then; callers averaging over domains should skip NaN.

    Example: right answers at 0.9 and 0.5, wrong ones at 0.5 and 0.25. Of the 4 (right,
    wrong) pairs, (0.9, 0.5), (0.9, 0.25) and (0.5, 0.25) are ordered correctly and
    (0.5, 0.5) is a tie worth 1/2, so AUROC = 3.5 / 4.

    >>> auroc([0.9, 0.5, 0.5, 0.25], [1, 1, 0, 0])
    0.875
    >>> auroc([0.9, 0.5], [1, 1])
    nan
    """
    conf, corr = _check_inputs(confidence, correct, "auroc")
    positive = corr == 1.0
    n_pos = int(positive.sum())
    n_neg = conf.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(conf)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
