"""The results table of a search: its columns, the best trial, the Pareto front, and the files.

Below both ``ray_jobs.tune`` (which fills the table and writes ``results.csv``/``results.json``)
and ``ray_jobs.report`` (which draws it), so neither imports the other for these. Pure Python on
plain row dicts, one per trial: ``{"trial", "lora_r", "lora_alpha", "learning_rate", "accuracy",
"calibration_error", "score", "validations", "status", "error", "step", "checkpoint", ...}``.

A trial in status ERROR (its loss diverged, its worker kept dying) is listed with its error but is
never the best trial nor on the Pareto front: the figures it reported come from a run that did not
finish, and Optuna counts it FAIL.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from conftok.inputs import strict_json

__all__ = ["TABLE_PARAMS", "best_adapter", "best_trial", "format_table", "is_finite", "pareto_front",
           "write_results"]

TABLE_PARAMS = ("lora_r", "lora_alpha", "learning_rate")
ADAPTER_METADATA = "conftok.json"  # conftok.modeling.METADATA_FILE (a test checks that they agree)


def is_finite(x) -> bool:
    """A real number that is not NaN or infinite (None, strings and booleans are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials no other trial beats on both accuracy (max) and calibration error (min).

    Example: accuracies/CEs (0.8, 0.10), (0.7, 0.05), (0.6, 0.20) -> the first two; the third is
    beaten by the first on both.
    """
    ok = [r for r in rows if r.get("status") != "ERROR" and is_finite(r.get("accuracy"))
          and is_finite(r.get("calibration_error"))]
    return [r for r in ok if not any(
        o["accuracy"] >= r["accuracy"] and o["calibration_error"] <= r["calibration_error"]
        and (o["accuracy"] > r["accuracy"] or o["calibration_error"] < r["calibration_error"]) for o in ok)]


def best_adapter(trial_dir: Path, row: dict[str, Any]) -> Path:
    """The adapter behind a trial's reported figures: that of its last reported step. ``checkpoint-N/`` while
    it is whole, else ``best_*/`` or ``final/`` where they hold that step (their ``conftok.json`` says which: a
    run that ASHA stopped can still train a moment and prune the checkpoint it reported, and final/ is then
    another step's), else Ray's copy of the checkpoint."""
    step = row.get("step")
    if is_finite(step):
        names = (f"checkpoint-{int(step)}", "best_accuracy", "best_calibration", "final")
        for path in (trial_dir / name for name in names):
            if (path / "adapter_model.safetensors").is_file() and _adapter_step(path) == int(step):
                return path
    return Path(row["checkpoint"]) if row.get("checkpoint") else trial_dir / "final"


def _adapter_step(adapter_dir: Path) -> int | None:
    """The training step an adapter directory was saved at (``conftok.json``'s ``global_step``), or None."""
    try:
        return json.loads((adapter_dir / ADAPTER_METADATA).read_text()).get("global_step")
    except (OSError, ValueError):
        return None


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the highest score; among equal scores (accuracy is k/n, and lambda may be 0) the lower
    calibration error, then the first trial id: never one the Pareto front dominates at the same score."""
    ok = [r for r in rows if r.get("status") != "ERROR" and is_finite(r.get("score"))]
    ce = lambda r: r["calibration_error"] if is_finite(r.get("calibration_error")) else math.inf  # noqa: E731
    return max(sorted(ok, key=lambda r: str(r.get("trial"))), key=lambda r: (r["score"], -ce(r))) if ok else None


def format_table(rows: list[dict[str, Any]], error_width: int = 160) -> str:
    """The console table; an ``error`` column (cut at ``error_width`` characters) when a trial failed."""
    cols = ["trial", *TABLE_PARAMS, "accuracy", "calibration_error", "score", "validations", "status"]
    if any(r.get("error") for r in rows):
        cols.append("error")

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4f}"
        return "-" if v is None else str(v)
    body = [[cell(r.get(c)) if c != "error" else _cut(r.get(c) or "-", error_width) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def write_results(experiment_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``results.csv`` (one row per trial) and ``results.json`` (summary + trials), each written
    to a temporary file and renamed into place."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = experiment_dir / ".results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, experiment_dir / "results.csv")
    tmp = experiment_dir / ".results.json.tmp"
    # NaN (a domain's AUROC when its answers are all right or all wrong) as null: bare NaN is not JSON.
    tmp.write_text(strict_json({**summary, "trials": rows}, indent=2, default=str))
    os.replace(tmp, experiment_dir / "results.json")
