"""Is the confidence token worth having? Evaluate an adapter against two baselines.

    python -m ray_jobs.evaluate --adapter checkpoints/qwen_confidence/best_calibration \\
        --data boolq=val/boolq.jsonl medqa=val/medqa.jsonl --out evaluation/qwen

Single process, GPU when present. On the same rows, three confidence signals for the answers:

- ``trained_token``: p_confident of the trained adapter, read after its own answer.
- ``untrained_token``: the base model with freshly added tokens (the adapter disabled): its own
  answers, and p_confident from the initial token rows (0.5 everywhere with ``end_of_turn``
  init; a token is rarely emitted).
- ``answer_probability``: the trained model's probability of its answer's first token among the
  tokens the first step can pick (the confidence tokens are barred there), on the same answers as
  ``trained_token`` (a classic logit baseline).

Per domain: token accuracy, calibration error (beta, p), Brier score, AUROC of the signal for
answer correctness; risk-coverage curves (abstain below a threshold) and routing curves in the
manner of Self-REF (route the least confident fraction to an oracle that is always right, against
random routing). Writes evaluation.json and PNGs; prints a short table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("trained_token", "untrained_token", "answer_probability")
# An unknown --data name: the domains are the adapter's (its conftok.json), not a flag of this command.
HINT = ("the adapter's domains are the ones it was trained with; evaluate another data set with an adapter "
        "trained on it")


def signal_figures(records: list[dict[str, Any]], key: str, beta: int, p: str, token_accuracy=None,
                   token_rate=None, wrong_domain_token_rate=None) -> dict[str, float]:
    from conftok.calibration import auroc, brier_score, calibration_error
    from conftok.routing import area_under_risk_coverage

    conf = np.array([r[key] if r[key] is not None else 0.0 for r in records], dtype=float)
    correct = np.array([r["correct"] for r in records], dtype=float)
    both = 0 < correct.sum() < len(correct)
    return {
        "n": len(records),
        "answer_accuracy": float(correct.mean()),
        # For probability baselines "token accuracy" is whether p >= 0.5 predicts correctness.
        "token_accuracy": token_accuracy if token_accuracy is not None else float(np.mean((conf >= 0.5) == correct)),
        # Share of answers followed by a confidence token (NaN for the answer-probability baseline).
        "token_rate": float("nan") if token_rate is None else token_rate,
        "wrong_domain_token_rate": float("nan") if wrong_domain_token_rate is None else wrong_domain_token_rate,
        "calibration_error": calibration_error(conf, correct, beta=beta, p=p),
        "brier": brier_score(conf, correct),
        "auroc": auroc(conf, correct) if both else float("nan"),
        "aurc": area_under_risk_coverage(conf, correct),
    }


def run_evaluation(model, tokenizer, domains, rows: dict[str, list[dict]], *, beta: int, p: str, batch_size: int,
                   max_new_tokens: int, progress: bool = True) -> dict[str, Any]:
    """All three signals per domain; returns {"methods": {method: {domain: figures}}, "records": ...}."""
    from conftok.evaluate import evaluate

    kwargs = dict(domains=domains, beta=beta, p=p, batch_size=batch_size, max_new_tokens=max_new_tokens,
                  progress=progress)
    trained = evaluate(model, tokenizer, rows, **kwargs)
    with model.disable_adapter():  # LoRA and the trained token rows off: the base model + fresh tokens
        untrained = evaluate(model, tokenizer, rows, **kwargs)
    out: dict[str, Any] = {"methods": {m: {} for m in METHODS}, "records": {}}
    for domain in trained["domains"]:
        recs = [r for r in trained["records"] if r["domain"] == domain]
        base = [r for r in untrained["records"] if r["domain"] == domain]
        out["methods"]["trained_token"][domain] = signal_figures(
            recs, "p_confident", beta, p, token_accuracy=trained["domains"][domain]["token_accuracy"],
            token_rate=trained["domains"][domain]["token_rate"],
            wrong_domain_token_rate=trained["domains"][domain]["wrong_domain_token_rate"])
        out["methods"]["untrained_token"][domain] = signal_figures(
            base, "p_confident", beta, p, token_accuracy=untrained["domains"][domain]["token_accuracy"],
            token_rate=untrained["domains"][domain]["token_rate"],
            wrong_domain_token_rate=untrained["domains"][domain]["wrong_domain_token_rate"])
        out["methods"]["answer_probability"][domain] = signal_figures(recs, "p_answer", beta, p)
        out["records"][domain] = {"trained": recs, "untrained": base}
    return out


def plot_curves(result: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    """Risk-coverage and routing curves per domain, every method on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conftok.routing import risk_coverage_curve, routing_curve

    written = []
    for domain, recs in result["records"].items():
        signals = {"trained_token": (recs["trained"], "p_confident"), "untrained_token": (recs["untrained"], "p_confident"),
                   "answer_probability": (recs["trained"], "p_answer")}
        fig, (ax_rc, ax_rt) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, (rows, key) in signals.items():
            conf = [r[key] if r[key] is not None else 0.0 for r in rows]
            correct = [r["correct"] for r in rows]
            rc = risk_coverage_curve(conf, correct)
            ax_rc.plot(rc["coverage"], rc["risk"], label=method)
            rt = routing_curve(conf, correct)
            ax_rt.plot(rt["fraction_routed"], rt["accuracy"], label=method)
        ax_rt.plot(rt["fraction_routed"], routing_curve(conf, [r["correct"] for r in recs["trained"]])["random_accuracy"],
                   "k--", label="random routing (trained answers)")
        ax_rc.set(xlabel="coverage (fraction answered)", ylabel="risk (error rate)", title=f"{domain}: risk-coverage")
        ax_rt.set(xlabel="fraction routed to the oracle", ylabel="accuracy", title=f"{domain}: routing")
        for ax in (ax_rc, ax_rt):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}curves_{domain}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def format_table(methods: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'domain':<8} {'method':<20} {'token_acc':>9} {'token_rate':>10} {'wrong_dom':>9} {'CE':>7} {'Brier':>7} "
             f"{'AUROC':>7} {'answer_acc':>10} {'n':>5}"]
    for domain in next(iter(methods.values())):
        for method in METHODS:
            f = methods[method][domain]
            auroc = "-" if math.isnan(f["auroc"]) else f"{f['auroc']:.3f}"
            rate = f.get("token_rate", float("nan"))
            rate = "-" if math.isnan(rate) else f"{rate:.3f}"
            wrong = f.get("wrong_domain_token_rate", float("nan"))
            wrong = "-" if math.isnan(wrong) else f"{wrong:.3f}"
            lines.append(f"{domain:<8} {method:<20} {f['token_accuracy']:>9.3f} {rate:>10} {wrong:>9} {f['calibration_error']:>7.4f} "
                         f"{f['brier']:>7.4f} {auroc:>7} {f['answer_accuracy']:>10.3f} {f['n']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from conftok.evaluate import load_rows
    from conftok.inputs import InputError
    from conftok.modeling import load_adapter, looks_like_hub_id
    from conftok.preflight import adapter_domains, check_validation_sources, parse_sources

    if args.out:
        out = Path(args.out)
    else:  # beside a local adapter; for a Hub one (user/repo), evaluation/repo here
        out = Path("evaluation") / Path(args.adapter).name if looks_like_hub_id(args.adapter) else \
            Path(args.adapter).resolve().parent / "evaluation"
    try:  # the rows are checked against the adapter's domains before its model is loaded
        sources = parse_sources(args.data)
        local_domains = adapter_domains(args.adapter)  # None for a Hub adapter
        rows = {} if local_domains is None else check_validation_sources(sources, local_domains, "--data",
                                                                          args.split, args.limit, HINT)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: is a file; expected a folder for evaluation.json and the curves")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, domains = load_adapter(args.adapter, base_model=args.base_model, device=device, bf16=args.bf16,
                                             trust_remote_code=args.trust_remote_code)
    try:  # Hub sources, and every source of a Hub adapter, whose domains are known only now
        if local_domains is None:
            rows = check_validation_sources(sources, domains, "--data", args.split, args.limit, HINT)
        rows.update({name: load_rows(source, split=args.split, limit=args.limit, domain=domains.for_dataset(name))
                     for name, source in sources.items() if name not in rows})
        rows = {name: rows[name] for name in sources}  # in --data's order
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.bf16 and device == "cpu":
        model.to(torch.bfloat16)
    result = run_evaluation(model, tokenizer, domains, rows, beta=args.calib_beta, p=args.calib_p_norm,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_curves(result, out)
    summary = {"adapter": str(args.adapter), "data": args.data, "calib_beta": args.calib_beta,
               "calib_p_norm": args.calib_p_norm, "methods": result["methods"], "records": result["records"]}
    tmp = out / ".evaluation.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "evaluation.json")
    print(format_table(result["methods"]))
    print(f"\nWrote {out / 'evaluation.json'} and {', '.join(p.name for p in pngs)}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from conftok.inputs import positive_int

    parser = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter directory (or Hub repo) from training")
    parser.add_argument("--data", nargs="+", required=True, metavar="DATASET=SOURCE",
                        help="raw rows per data set: .jsonl/.parquet or a Hub name (split --split)")
    parser.add_argument("--base_model", default=None, help="base model (default: the adapter's base)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=positive_int, default=None, help="rows per data set")
    parser.add_argument("--calib_beta", type=positive_int, default=100)
    parser.add_argument("--calib_p_norm", default="2", choices=["1", "2", "infty"])
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--max_new_tokens", type=positive_int, default=16)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None,
                        help="output folder (default: ADAPTER/../evaluation; evaluation/REPO for a Hub adapter)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base model's repo (off: transformers' own classes only)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
