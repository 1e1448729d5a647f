"""Tests for conftok.calibration: hand-computed values, error messages, brute-force checks."""

import json
import math

import numpy as np
import pytest

from conftok.calibration import auroc, brier_score, calibration_error, reliability_bins

ALL_METRICS = [calibration_error, reliability_bins, brier_score, auroc]


def brute_force_calib_err(confidence, correct, beta, p, skip_last=False):
    """Loop-by-loop restatement of the spec: sort, floor(n/beta) bins, remainder last, each item counting with the
    mean correctness of the items of its confidence (not in the original, ``skip_last``)."""
    n = len(confidence)
    if not skip_last:
        correct = [sum(correct[j] for j in range(n) if confidence[j] == confidence[i])
                   / sum(confidence[j] == confidence[i] for j in range(n)) for i in range(n)]
    order = sorted(range(n), key=lambda i: confidence[i])  # Python's sort is stable
    n_bins = max(n // beta, 1)
    bins = []
    for b in range(n_bins):
        start = b * beta
        stop = n if b == n_bins - 1 else start + beta
        bins.append([order[i] for i in range(start, stop)])
    if skip_last:  # what Hendrycks' original does
        bins = bins[:-1]
    total, largest = 0.0, 0.0
    for members in bins:
        mean_conf = sum(confidence[i] for i in members) / len(members)
        accuracy = sum(correct[i] for i in members) / len(members)
        gap = abs(mean_conf - accuracy)
        weight = len(members) / n
        if p == "1":
            total += weight * gap
        elif p == "2":
            total += weight * gap**2
        largest = max(largest, gap)
    if p == "1":
        return total
    if p == "2":
        return math.sqrt(total)
    return largest


def brute_force_auroc(confidence, correct):
    """Count (right, wrong) pairs: 1 when the right answer is more confident, 1/2 on a tie."""
    pos = [c for c, y in zip(confidence, correct) if y]
    neg = [c for c, y in zip(confidence, correct) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


class TestCalibration:
    # ---- calibration_error: hand-computed values --------------------------------------------

    @pytest.mark.parametrize(
        "p, expected",
        [
            # Sorted: {0.2 (wrong), 0.4 (right)} | {0.6 (right), 0.8 (right)}, w = 1/2 each.
            # Bin 1: conf 0.3, acc 0.5, d = 0.2. Bin 2: conf 0.7, acc 1.0, d = 0.3.
            ("1", 0.25),  # (0.2 + 0.3) / 2
            ("2", math.sqrt(0.065)),  # sqrt((0.04 + 0.09) / 2)
            ("infty", 0.3),
            (1, 0.25),  # the ints 1 and 2 mean the same as "1" and "2"
            (2, math.sqrt(0.065)),
        ],
    )
    def test_four_items_two_bins(self, p, expected):
        confidence = [0.6, 0.2, 0.8, 0.4]  # unsorted on purpose
        correct = [1, 0, 1, 1]
        assert calibration_error(confidence, correct, beta=2, p=p) == pytest.approx(expected)

    @pytest.mark.parametrize("p", ["1", "2", "infty"])
    def test_fewer_items_than_beta_is_one_bin(self, p):
        # One bin of 3: conf (0.2 + 0.4 + 0.9) / 3 = 0.5, acc 2/3, d = 1/6; w = 1 so every
        # norm gives 1/6.
        result = calibration_error([0.2, 0.4, 0.9], [1, 0, 1], beta=100, p=p)
        assert result == pytest.approx(1 / 6)

    @pytest.mark.parametrize(
        "p, expected",
        [
            # n=5, beta=2: bins of 2 and 3 (the last takes the remainder).
            # Bin 1 {0.1, 0.3}, correct {0, 0}: conf 0.2, acc 0, d = 0.2, w = 2/5.
            # Bin 2 {0.5, 0.7, 0.9}, correct {1, 1, 0}: conf 0.7, acc 2/3, d = 1/30, w = 3/5.
            ("1", 0.1),  # 0.4 * 0.2 + 0.6 / 30 = 0.08 + 0.02
            ("2", math.sqrt(1 / 60)),  # 0.4 * 0.04 + 0.6 / 900 = 24/1500 + 1/1500 = 1/60
            ("infty", 0.2),
        ],
    )
    def test_remainder_goes_to_last_bin(self, p, expected):
        confidence = [0.1, 0.3, 0.5, 0.7, 0.9]
        correct = [0, 0, 1, 1, 0]
        assert calibration_error(confidence, correct, beta=2, p=p) == pytest.approx(expected)

    @pytest.mark.parametrize(
        "confidence, correct",
        [
            ([0.5, 0.5, 1.0, 1.0], [1, 0, 1, 1]),  # bins: conf 0.5 acc 0.5 | conf 1 acc 1
            ([0.0, 0.0, 0.0], [0, 0, 0]),
            ([1.0], [True]),
        ],
    )
    @pytest.mark.parametrize("p", ["1", "2", "infty"])
    def test_perfect_calibration_is_zero(self, confidence, correct, p):
        assert calibration_error(confidence, correct, beta=2, p=p) == 0.0

    def test_ties_count_with_their_groups_mean_correctness(self):
        # The two 0.5s tie and a bin edge falls between them. Each counts as right half the time:
        # 0.1(0), 0.5(0.5) | 0.5(0.5), 0.9(1). Bin 1: conf 0.3, acc 0.25, d = 0.05; bin 2: conf 0.7, acc 0.75.
        # Input order used to decide (0.2 or 0.3 for the same pairs listed in two orders).
        confidence = [0.9, 0.5, 0.5, 0.1]
        assert calibration_error(confidence, [1, 1, 0, 0], beta=2, p="1") == pytest.approx(0.05)
        assert calibration_error(confidence, [1, 0, 1, 0], beta=2, p="1") == pytest.approx(0.05)

    @pytest.mark.parametrize("p", ["1", "2", "infty"])
    def test_a_constant_confidence_is_its_gap_to_the_accuracy_in_any_order(self, p):
        """0.5 for every item, 35 of 100 right, bins of 25: |0.5 - 0.35| = 0.15 for every order of the rows
        (0.151 to 0.436 by order when ties followed input order)."""
        rng = np.random.default_rng(0)
        correct = np.r_[np.ones(35), np.zeros(65)]
        for _ in range(20):
            assert calibration_error(np.full(100, 0.5), rng.permutation(correct), beta=25, p=p) == pytest.approx(0.15)
        bins = reliability_bins(np.full(100, 0.5), rng.permutation(correct), n_bins=4, strategy="quantile")
        assert [b["accuracy"] for b in bins] == pytest.approx([0.35] * 4)

    def test_order_never_matters(self):
        """Any permutation of the same (confidence, correct) pairs gives the same error, ties or not."""
        rng = np.random.default_rng(1)
        for _ in range(30):
            n = int(rng.integers(1, 60))
            conf = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], size=n)
            corr = rng.integers(0, 2, size=n)
            perm = rng.permutation(n)
            beta = int(rng.integers(1, 20))
            assert calibration_error(conf[perm], corr[perm], beta=beta) == pytest.approx(
                calibration_error(conf, corr, beta=beta), abs=1e-12)

    def test_all_tied_is_the_gap_to_the_accuracy(self):
        assert calibration_error([0.5] * 4, [1, 1, 0, 0], beta=2, p="1") == 0.0
        assert calibration_error([0.5] * 4, [1, 1, 1, 0], beta=2, p="1") == pytest.approx(0.25)

    def test_accepts_bool_and_numpy_inputs(self):
        confidence = np.array([0.6, 0.2, 0.8, 0.4], dtype=np.float32)
        correct = np.array([True, False, True, True])
        result = calibration_error(confidence, correct, beta=np.int64(2), p="1")
        assert type(result) is float
        assert result == pytest.approx(0.25, abs=1e-6)

    # ---- calibration_error: legacy=True ------------------------------------------------------

    @pytest.mark.parametrize(
        "p, legacy_expected, new_expected",
        [
            # n=6, beta=2, three bins, w = 1/3 each:
            # {0.1, 0.2} correct {0, 1}: conf 0.15, acc 0.5, d = 0.35
            # {0.5, 0.6} correct {1, 0}: conf 0.55, acc 0.5, d = 0.05
            # {0.8, 1.0} correct {1, 0}: conf 0.9,  acc 0.5, d = 0.4   <- legacy skips this one
            ("1", (0.35 + 0.05) / 3, (0.35 + 0.05 + 0.4) / 3),
            ("2", math.sqrt((0.1225 + 0.0025) / 3), math.sqrt((0.1225 + 0.0025 + 0.16) / 3)),
            ("infty", 0.35, 0.4),
        ],
    )
    def test_legacy_skips_last_bin(self, p, legacy_expected, new_expected):
        confidence = [0.1, 0.2, 0.5, 0.6, 0.8, 1.0]
        correct = [0, 1, 1, 0, 1, 0]
        legacy = calibration_error(confidence, correct, beta=2, p=p, legacy=True)
        new = calibration_error(confidence, correct, beta=2, p=p)
        assert legacy == pytest.approx(legacy_expected)
        assert new == pytest.approx(new_expected)
        assert legacy != pytest.approx(new)

    def test_legacy_differs_when_remainder_bin_matters(self):
        # n=5, beta=2 (see test_remainder_goes_to_last_bin): new p=1 is 0.1; legacy scores
        # only bin 1, 0.4 * 0.2 = 0.08.
        confidence = [0.1, 0.3, 0.5, 0.7, 0.9]
        correct = [0, 0, 1, 1, 0]
        assert calibration_error(confidence, correct, beta=2, p="1", legacy=True) == (
            pytest.approx(0.08)
        )
        assert calibration_error(confidence, correct, beta=2, p="1") == pytest.approx(0.1)

    def test_legacy_single_bin_scores_zero(self):
        # beta <= n < 2*beta: one bin, which is the last, so the original scores nothing.
        # Badly calibrated (conf 0.95, acc 0) yet legacy returns 0.0.
        confidence, correct = [0.9, 1.0, 0.95], [0, 0, 0]
        assert calibration_error(confidence, correct, beta=2, legacy=True) == 0.0
        assert calibration_error(confidence, correct, beta=2) == pytest.approx(0.95)

    def test_legacy_rejects_fewer_items_than_beta(self):
        with pytest.raises(ValueError, match=r"legacy=True needs .*n >= beta.*n=3 and beta=100"):
            calibration_error([0.2, 0.4, 0.9], [1, 0, 1], beta=100, legacy=True)

    # ---- calibration_error: brute force on random data --------------------------------------

    @pytest.mark.parametrize("seed", range(5))
    @pytest.mark.parametrize("beta", [1, 2, 3, 7, 10, 50, 1000])
    @pytest.mark.parametrize("p", ["1", "2", "infty"])
    def test_matches_brute_force(self, seed, beta, p):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 400))
        # Rounded to 1 decimal so ties are common and the stable tie rule is exercised.
        confidence = np.round(rng.random(n), 1).tolist()
        correct = (rng.random(n) < 0.6).astype(int).tolist()
        expected = brute_force_calib_err(confidence, correct, beta, p)
        result = calibration_error(confidence, correct, beta=beta, p=p)
        assert result == pytest.approx(expected, rel=1e-12, abs=1e-12)

    @pytest.mark.parametrize("seed", range(5))
    @pytest.mark.parametrize("beta", [1, 2, 3, 7, 10])
    @pytest.mark.parametrize("p", ["1", "2", "infty"])
    def test_legacy_matches_brute_force_without_ties(self, seed, beta, p):
        # Without ties every sort gives the same order, so quicksort vs stable cannot matter.
        rng = np.random.default_rng(100 + seed)
        n = int(rng.integers(beta, 300))
        confidence = rng.random(n).tolist()
        assert len(set(confidence)) == n
        correct = (rng.random(n) < 0.6).astype(int).tolist()
        expected = brute_force_calib_err(confidence, correct, beta, p, skip_last=True)
        result = calibration_error(confidence, correct, beta=beta, p=p, legacy=True)
        assert result == pytest.approx(expected, rel=1e-12, abs=1e-12)

    # ---- input validation (shared by all four metrics) --------------------------------------

    @pytest.mark.parametrize("metric", ALL_METRICS)
    @pytest.mark.parametrize(
        "confidence, correct, message",
        [
            ([], [], r"confidence is empty; need at least one item"),
            ([0.5, 0.5, 0.5], [1, 0], r"same length, got 3 and 2"),
            ([[0.5, 0.5]], [[1, 0]], r"confidence must be 1-D with shape \(n,\), got shape \(1, 2"),
            (0.5, 1, r"must be 1-D with shape \(n,\), got shape \(\)"),
            ([0.5, math.nan], [1, 0], r"confidence contains 1 NaN value\(s\) \(first at index 1"),
            ([0.5, 1.5, -0.1], [1, 0, 1], r"2 value\(s\) outside \[0, 1\] \(first: 1.5 at index 1"),
            ([0.5, float("inf")], [1, 0], r"outside \[0, 1\]"),
            ([0.5, 0.5], [1, 2], r"correct has 1 value\(s\) that are not bool or 0/1 \(first: 2.0"),
            ([0.5, 0.5], [0.5, 1], r"not bool or 0/1 \(first: 0.5 at index 0\)"),
            ([0.5, 0.5], [1, float("nan")], r"not bool or 0/1 \(first: nan at index 1\)"),
            (["0.5", "0.2"], [1, 0], r"confidence must hold numbers or bools, got dtype <U3"),
        ],
    )
    def test_bad_inputs_raise(self, metric, confidence, correct, message):
        with pytest.raises(ValueError, match=message) as excinfo:
            metric(confidence, correct)
        assert str(excinfo.value).startswith(f"{metric.__name__}: ")

    def test_all_input_problems_reported_together(self):
        with pytest.raises(ValueError) as excinfo:
            brier_score([float("nan"), 2.0, 0.5], [1, 3])
        message = str(excinfo.value)
        assert "NaN" in message
        assert "outside [0, 1]" in message
        assert "not bool or 0/1" in message
        assert "same length, got 3 and 2" in message

    @pytest.mark.parametrize("beta", [0, -1, 2.0, True, "2", None])
    def test_bad_beta_raises(self, beta):
        with pytest.raises(ValueError, match=r"calibration_error: beta must be a positive int"):
            calibration_error([0.5], [1], beta=beta)

    @pytest.mark.parametrize("p", ["3", 3, "inf", "max", True, 1.0, None])
    def test_bad_p_raises_listing_allowed(self, p):
        with pytest.raises(ValueError, match=r"unknown p=.*allowed: '1', '2', 'infty'"):
            calibration_error([0.5], [1], p=p)

    def test_bad_reliability_options_raise(self):
        with pytest.raises(ValueError, match=r"n_bins must be a positive int \(>= 1\), got 0"):
            reliability_bins([0.5], [1], n_bins=0)
        allowed = r"unknown strategy='equal'; allowed: 'uniform', 'quantile'"
        with pytest.raises(ValueError, match=allowed):
            reliability_bins([0.5], [1], strategy="equal")

    # ---- brier_score -------------------------------------------------------------------------

    def test_brier_hand_values(self):
        # ((1 - 1)**2 + (0 - 0)**2 + (0.8 - 0)**2) / 3 = 0.64 / 3
        assert brier_score([1.0, 0.0, 0.8], [1, 0, 0]) == pytest.approx(0.64 / 3)
        # Constant 0.5 is 0.25 whatever the answers.
        assert brier_score([0.5] * 3, [True, False, True]) == pytest.approx(0.25)
        # Fully confident and fully wrong is the worst case, 1.
        assert brier_score([1.0, 0.0], [0, 1]) == 1.0
        assert type(brier_score([0.5], [1])) is float

    # ---- auroc -------------------------------------------------------------------------------

    def test_auroc_hand_values_with_ties(self):
        # Right answers at 0.8 and 0.4; wrong ones at 0.4, 0.4 and 0.2. Of the 6 pairs:
        # 0.8 beats all three (3); 0.4 ties two 0.4s (2 * 1/2) and beats 0.2 (1). 5 / 6.
        assert auroc([0.8, 0.4, 0.4, 0.4, 0.2], [1, 1, 0, 0, 0]) == pytest.approx(5 / 6)

    def test_auroc_identical_scores_is_half(self):
        assert auroc([0.7] * 5, [1, 0, 1, 1, 0]) == 0.5

    def test_auroc_perfect_and_inverted(self):
        assert auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
        assert auroc([0.9, 0.8, 0.3, 0.1], [0, 0, 1, 1]) == 0.0

    @pytest.mark.parametrize("correct", [[1, 1, 1], [0, 0, 0], [True, True, True]])
    def test_auroc_one_class_is_nan(self, correct):
        assert math.isnan(auroc([0.2, 0.5, 0.9], correct))

    @pytest.mark.parametrize("seed", range(10))
    def test_auroc_matches_pair_counting(self, seed):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 200))
        confidence = np.round(rng.random(n), 1).tolist()  # many ties
        correct = (rng.random(n) < 0.5).tolist()
        correct[0], correct[1] = True, False  # both classes present
        assert auroc(confidence, correct) == pytest.approx(
            brute_force_auroc(confidence, correct), rel=1e-12
        )

    # ---- reliability_bins --------------------------------------------------------------------

    def test_uniform_bins_edges_and_endpoints(self):
        confidence = [0.0, 0.05, 0.3, 0.35, 0.999, 1.0]
        correct = [0, 0, 1, 0, 1, 1]
        bins = reliability_bins(confidence, correct, n_bins=10)
        assert len(bins) == 10
        assert sum(b["count"] for b in bins) == 6
        assert bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
        # 0.0 and 0.05 in [0, 0.1): conf 0.025, acc 0.
        assert bins[0]["count"] == 2
        assert bins[0]["mean_confidence"] == pytest.approx(0.025)
        assert bins[0]["accuracy"] == 0.0
        # 0.3 sits on an edge and goes to the bin it opens, [0.3, 0.4), with 0.35.
        assert bins[3]["lower"] == 0.3
        assert bins[3]["count"] == 2
        assert bins[3]["accuracy"] == 0.5
        assert bins[2]["count"] == 0
        # 1.0 goes in the last bin, which is closed on the right, with 0.999.
        assert bins[9]["count"] == 2
        assert bins[9]["mean_confidence"] == pytest.approx(0.9995)
        assert bins[9]["accuracy"] == 1.0

    def test_empty_bins_are_none_and_json_serialisable(self):
        bins = reliability_bins([0.1, 0.9], [True, False], n_bins=4)
        assert [b["count"] for b in bins] == [1, 0, 0, 1]
        assert bins[1]["mean_confidence"] is None and bins[1]["accuracy"] is None
        assert json.loads(json.dumps(bins)) == bins  # plain floats/ints/None only
        for b in bins:
            assert type(b["count"]) is int
            assert type(b["lower"]) is float and type(b["upper"]) is float

    def test_quantile_bins_equal_mass(self):
        # Sorted (stable): 0.1(0), 0.2(1), 0.2(1) | 0.6(0), 0.9(1); array_split gives 3 then 2.
        confidence, correct = [0.6, 0.2, 0.9, 0.1, 0.2], [0, 1, 1, 0, 1]
        bins = reliability_bins(confidence, correct, n_bins=2, strategy="quantile")
        assert [b["count"] for b in bins] == [3, 2]
        assert (bins[0]["lower"], bins[0]["upper"]) == (0.1, 0.2)
        assert bins[0]["mean_confidence"] == pytest.approx(0.5 / 3)
        assert bins[0]["accuracy"] == pytest.approx(2 / 3)
        assert (bins[1]["lower"], bins[1]["upper"]) == (0.6, 0.9)
        assert bins[1]["accuracy"] == 0.5
        # Fewer items than bins: one bin per item, none empty.
        few = reliability_bins([0.3, 0.7], [1, 0], n_bins=5, strategy="quantile")
        assert [b["count"] for b in few] == [1, 1]

    @pytest.mark.parametrize("strategy", ["uniform", "quantile"])
    @pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
    def test_reliability_counts_sum_to_n(self, strategy, n_bins):
        rng = np.random.default_rng(n_bins)
        confidence = np.r_[rng.random(97), 0.0, 1.0]
        correct = rng.random(99) < 0.5
        bins = reliability_bins(confidence, correct, n_bins=n_bins, strategy=strategy)
        assert sum(b["count"] for b in bins) == 99
        filled = [b for b in bins if b["count"]]
        # Count-weighted mean confidence over bins is the overall mean confidence.
        weighted = sum(b["count"] * b["mean_confidence"] for b in filled) / 99
        assert weighted == pytest.approx(float(confidence.mean()))
