"""Calibration error with ties split by input order (before) against ties sharing their mean correctness (now).

``conftok.calibration.calibration_error`` sorts items by confidence and cuts equal-mass bins. Until
2026-11-28 a bin edge that fell inside a group of equal confidences split the group by the order the
rows came in; now every tied item counts with its group's mean correctness, so the order no longer
matters. The untrained token (p_confident exactly 0.5 for every row) and a bf16 model's p_confident (a
few dozen distinct values over hundreds of rows) tie heavily, so the studies' figures move. This
script recomputes them from the per-row records the studies keep in their work directories
(``bench/run_studies.py`` writes them; they hold real rows, so they are not committed):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ties.py      # prints a markdown table

The "before" column recomputes the old rule here and must equal the figure stored in the study's
result JSON (``stored``): that checks the records are the ones the published tables came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conftok.calibration import calibration_error  # noqa: E402
from conftok.probe import bootstrap_interval  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STUDIES = {"real_study": 25, "math_control": 100}  # the beta each study scored with (bench/real_study.py, math_control.py)
SIGNALS = {"trained_token": ("trained", "p_confident"), "untrained_token": ("untrained", "p_confident"),
           "answer_probability": ("trained", "p_answer")}


def input_order_error(conf: np.ndarray, correct: np.ndarray, beta: int) -> float:
    """The old rule: a stable sort (ties in input order), bins of ``beta``, the remainder in the last, p=2."""
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    n = len(conf)
    starts = np.arange(max(n // beta, 1)) * beta
    sizes = np.diff(np.r_[starts, n])
    gaps = np.add.reduceat(conf, starts) / sizes - np.add.reduceat(correct, starts) / sizes
    return float(np.sqrt(np.sum(sizes / n * gaps**2)))


def main() -> int:
    rows = []
    for study, beta in STUDIES.items():
        work = RESULTS / f"{study}_work"
        for records_file in sorted(work.glob("records_*.json")):
            run = records_file.stem.removeprefix("records_")
            result_file = RESULTS / f"{study}_{run}.json"
            stored = json.loads(result_file.read_text())["methods"] if result_file.is_file() else {}
            records = json.loads(records_file.read_text())
            for domain, parts in records.items():
                for signal, (part, key) in SIGNALS.items():
                    recs = parts[part]
                    conf = np.array([r[key] if r[key] is not None else 0.0 for r in recs], dtype=float)
                    correct = np.array([r["correct"] for r in recs], dtype=float)
                    before = input_order_error(conf, correct, beta)
                    now = calibration_error(conf, correct, beta=beta, p="2")
                    # the interval as bench/study.py computes it (1000 resamples, seed 0), with the new rule
                    ci = bootstrap_interval(lambda c, y: calibration_error(c, y, beta=beta, p="2"), conf, correct)
                    was = stored.get(signal, {}).get(domain, {}).get("calibration_error")
                    rows.append((study, run, domain, signal, len(conf), len(np.unique(conf)), was, before, now, ci))
    if not rows:
        print(f"no records_*.json under {RESULTS}/*_work: run the studies first (bench/run_studies.py)")
        return 1
    print("| study | run | domain | signal | rows | distinct values | stored | before (input order) "
          "| now (tie means) [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for study, run, domain, signal, n, distinct, was, before, now, ci in rows:
        stored = "-" if was is None else f"{was:.4f}"
        print(f"| {study} | {run} | {domain} | {signal} | {n} | {distinct} | {stored} | {before:.4f} "
              f"| {now:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
    mismatched = [r for r in rows if r[6] is not None and abs(r[6] - r[7]) > 1e-9]
    print(f"\n{len(rows)} figures; the old rule reproduces {len(rows) - len(mismatched)} stored ones"
          + (f"; {len(mismatched)} differ (records from another run?)" if mismatched else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
