"""Tables and figures of a token study from its results (bench/math_control.py, bench/real_study.py).

    .venv/bin/python bench/study_report.py math_control [--runs defaults_kl answer_ce_all ...]

Reads ``bench/results/{study}_{run}.json`` (and the per-row records in ``{study}_work/``), prints one
markdown table per domain (every run, the trained token against both baselines, with bootstrap
intervals), and draws each run's reliability diagrams and routing curves as
``bench/results/{study}_{run}_{reliability,curves}_{domain}.png``. Step-time ratios come from
``bench/results/loss_terms_{study}.json`` when it exists (bench/loss_terms.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import RESULTS, format_study_table  # noqa: E402

# loss_terms.py variant -> study run names it prices
STEP_VARIANTS = {"token_only": "token only", "defaults_kl": "+ placement + live KL",
                 "answer_ce_all": "+ placement + answer CE (all)", "answer_ce_correct": "+ placement + answer CE (right only)",
                 "stored_kl": "+ placement + stored KL", "stored_kl_v2": "+ placement + stored KL",
                 "stored_kl_v2_seed1": "+ placement + stored KL",
                 "placement_low_lr": "+ placement"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("math_control", "real_study"))
    parser.add_argument("--runs", nargs="*", default=None, help="run names (default: every result of the study)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    args = parser.parse_args(argv)
    skip = {"probe", "probe_h100"}
    names = args.runs or sorted(p.stem.removeprefix(f"{args.study}_") for p in RESULTS.glob(f"{args.study}_*.json")
                                if p.stem.removeprefix(f"{args.study}_") not in skip)
    steps = RESULTS / f"loss_terms_{args.study}.json"
    ratios = json.loads(steps.read_text())["variants"] if steps.is_file() else {}
    runs = {}
    for name in names:
        run = json.loads((RESULTS / f"{args.study}_{name}.json").read_text())
        base_name = name.removeprefix("balanced_")
        variant = STEP_VARIANTS.get(base_name)
        run["step_ratio"] = ratios.get(variant, {}).get("ratio_to_token_only") if variant else None
        runs[name] = run
        if args.plots:
            records = json.loads((RESULTS / f"{args.study}_work" / f"records_{name}.json").read_text())
            from bench.real_data import plot_reliability
            from ray_jobs.evaluate import plot_curves

            result = {"methods": run["methods"], "records": records}
            plot_curves(result, RESULTS, prefix=f"{args.study}_{name}_")
            plot_reliability(result, RESULTS, prefix=f"{args.study}_{name}_")
    domains = list(next(iter(runs.values()))["methods"]["trained_token"])
    for domain in domains:
        print(f"\n### {args.study}: {domain}\n")
        print(format_study_table(runs, domain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
