"""Run the token studies end to end in one process, within a time budget (a lent GPU, or the CPU).

    HF_HUB_OFFLINE=1 python bench/run_studies.py [--deadline_s 400] [--bundle OUT/studies.tar.gz] \
        [--only math|real]

The positive control (bench/math_control.py) then the real rows (bench/real_study.py): for each,
prepare (rows, tagging, the base model's answers), probe, then the runs below in order, each a
``train`` of that study's script with the same overrides. A run that would start after the
deadline is skipped and said so. After every step the results (JSON, records, logs) are packed
into ``--bundle`` so that a run cut short still returns what it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import study as S  # noqa: E402

# The guards compared (issue 8, item 3), each against the same settings; TrainConfig defaults otherwise.
GUARDS = {
    "defaults_kl": {"kl_weight": 1.0, "stored_kl_weight": 0},  # placement 1 + live KL 1: the defaults before this study
    "answer_ce_all": {"kl_weight": 0, "stored_kl_weight": 0, "answer_ce_weight": 1.0},
    "answer_ce_correct": {"kl_weight": 0, "stored_kl_weight": 0, "answer_ce_weight": 1.0, "answer_ce_rows": "correct"},
    "stored_kl": {"kl_weight": 0, "stored_kl_weight": 1.0},  # placement 1 + stored top-k KL 1: the defaults now
    "placement_low_lr": {"kl_weight": 0, "stored_kl_weight": 0, "learning_rate": 1e-4},
    "token_only": {"kl_weight": 0, "stored_kl_weight": 0, "placement_weight": 0},
}
# Step cost, lowest first: placement alone and answer CE reuse the token's forward (a few more kept
# positions); the stored KL adds a gather and a one-time base pass; the live KL a second forward.
COST_RANK = {"placement_low_lr": 0, "answer_ce_all": 1, "answer_ce_correct": 1, "stored_kl": 2, "defaults_kl": 3}


def choose_guard(results: dict[str, dict]) -> tuple[str | None, list[str]]:
    """The issue's rule: answer accuracy within 2 points of the base model's and a token rate >= 95% in
    every domain, at the lowest step cost; ties go to the higher mean AUROC. Returns (winner, reasons)."""
    reasons, passing = [], []
    for name, result in results.items():
        if name not in COST_RANK:
            continue
        figures = result["methods"]["trained_token"].values()
        ok_acc = all(abs(f["answer_accuracy_change"]) <= 0.02 + 1e-9 for f in figures)
        ok_rate = all(f["token_rate"] >= 0.95 for f in figures)
        auroc = sum(f["auroc"] for f in figures) / len(figures)
        reasons.append(f"{name}: accuracy kept {ok_acc}, token rate >= 0.95 {ok_rate}, AUROC {auroc:.3f}")
        if ok_acc and ok_rate:
            passing.append((COST_RANK[name], -auroc, name))
    return (min(passing)[2] if passing else None), reasons


REAL_RUNS = ("answer_ce_all", "answer_ce_correct", "stored_kl")  # the rest, after the chosen guard and the KL


def bundle(path: Path | None) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(S.RESULTS.glob("*_*.json")):
            if p.name.startswith(("math_control", "real_study", "loss_terms")):
                tar.add(p, arcname=f"results/{p.name}")
        for work in sorted(S.RESULTS.glob("*_work")):
            if not work.name.startswith(("math_control", "real_study")):
                continue
            for p in sorted(work.glob("*")):
                if p.is_file() and p.suffix in (".json", ".jsonl", ".log"):
                    tar.add(p, arcname=f"{work.name}/{p.name}")
    os.replace(tmp, path)


def _smoke(study: S.Study) -> S.Study:
    import dataclasses

    def rows():
        return {part: {name: r[: (4 if part == "val" else 12)] for name, r in parts.items()}
                for part, parts in study.make_rows().items()}

    return dataclasses.replace(study, name=f"{study.name}_smoke", make_rows=rows,
                               fixed={**study.fixed, "max_steps": 2, "batch_size": 4, "max_seq_length": 512})


def main(argv=None) -> int:
    from bench.math_control import STUDY as MATH
    from bench.real_study import STUDY as REAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline_s", type=float, default=3600.0, help="start no step after this many seconds")
    parser.add_argument("--bundle", type=Path, default=None, help="tar.gz of results, rewritten after each step")
    parser.add_argument("--only", choices=("math", "real"), default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="a few rows and steps per study, two guards, results under *_smoke names (checks the plumbing)")
    args = parser.parse_args(argv)
    guards = dict(GUARDS)
    real_runs = REAL_RUNS
    if args.smoke:
        MATH, REAL = _smoke(MATH), _smoke(REAL)
        guards = {k: GUARDS[k] for k in ("defaults_kl", "answer_ce_all")}
        real_runs = ()
    start = time.perf_counter()
    math_results: dict[str, dict] = {}
    winner: list[str] = []

    def math_runs(names):
        return [(MATH, "train", n) for n in names if n in guards]

    def pick():
        name, reasons = choose_guard(math_results)
        print("guard choice:\n  " + "\n  ".join(reasons) + f"\n  -> {name}", flush=True)
        if name and name != "defaults_kl":
            winner.append(name)

    plan: list = []
    if args.only in (None, "math"):
        plan += [(MATH, "prepare", None), (MATH, "probe", None)]
        plan += math_runs(["defaults_kl", "answer_ce_all", "answer_ce_correct", "stored_kl", "placement_low_lr"])
        plan += [(None, "choose", None)]
    if args.only in (None, "real"):
        plan += [(REAL, "prepare", None), (REAL, "probe", None), (REAL, "train", "defaults_kl"), (REAL, "train", "WINNER")]
    if args.only in (None, "math"):
        plan += math_runs(["token_only"]) + [(MATH, "train", "BALANCED")]
    if args.only in (None, "real"):
        plan += [(REAL, "train", n) for n in real_runs]
    failed, done = set(), set()
    for study, step, name in plan:
        elapsed = time.perf_counter() - start
        if step == "choose":
            pick()
            continue
        if name == "WINNER":
            name = winner[0] if winner else None
        elif name == "BALANCED":
            base = winner[0] if winner else "defaults_kl"
            name = f"balanced_{base}"
            guards[name] = {**GUARDS[base], "balance_token_classes": True}
        if (step == "train" and name is None) or study.name in failed or (study.name, step, name) in done:
            continue
        done.add((study.name, step, name))
        label = f"{study.name} {step} {name or ''}".strip()
        if elapsed > args.deadline_s:
            print(f"SKIPPED {label}: past the deadline ({elapsed:.0f} s > {args.deadline_s:.0f} s)", flush=True)
            continue
        print(f"=== {label} at {elapsed:.0f} s", flush=True)
        try:
            if step == "prepare":
                S.prepare(study)
            elif step == "probe":
                S.probe(study, "level" if study.name.startswith("math") else None)
            else:
                overrides = guards[name]
                script = "math_control" if study.name.startswith("math") else "real_study"
                command = " ".join([f"bench/{script}.py", "train", "--name", name]
                                   + [f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()])
                result = S.run(study, name, dict(overrides), command)
                if study is MATH:
                    math_results[name] = result
        except Exception:  # noqa: BLE001 - one failed step must not lose the others' results
            traceback.print_exc()
            print(f"FAILED {label}", flush=True)
            if step == "prepare":
                failed.add(study.name)
        bundle(args.bundle)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
