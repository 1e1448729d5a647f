"""Shared steps of the token studies (bench/math_control.py, bench/real_study.py).

- :func:`train_run`: ``conftok.train`` with the study's fixed settings and any TrainConfig overrides;
- :func:`evaluate_run`: the final adapter on held-out rows, beside the base model's own records
  (evaluated once per study), in ``ray_jobs.evaluate``'s layout (methods -> method -> domain ->
  figures) with bootstrap intervals on AUROC and calibration error, the routing check and the
  probe's AUROC where one was computed;
- :func:`format_study_table`: one markdown table of every run of a study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

METHODS = ("trained_token", "untrained_token", "answer_probability")


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` TrainConfig overrides; values are read as JSON where they parse (1e-3, true, "x")."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_run(name: str, work: Path, *, model_dir: Path, train_data: Path, val_sources: dict[str, str], domains,
              fixed: dict[str, Any], overrides: dict[str, Any]) -> tuple[Path, dict[str, Any], float]:
    """Train one run: TrainConfig defaults, then the study's ``fixed`` settings, then ``overrides``."""
    from conftok import TrainConfig, train

    settings = {**fixed, **overrides}
    cfg = TrainConfig(model_name=str(model_dir), train_data=str(train_data), output_dir=str(work / f"run_{name}"),
                      backend="hf", eval_steps=None, val_sources=val_sources,
                      domains=str(domains) if domains else None, **settings)
    t = time.perf_counter()
    result = train(cfg)
    return result.final_dir, cfg.to_dict(), round(time.perf_counter() - t, 1)


def signal_block(records: list[dict], key: str, beta: int, *, token_figures: dict | None = None) -> dict[str, Any]:
    """``ray_jobs.evaluate.signal_figures`` plus 95% bootstrap intervals on AUROC and calibration error,
    and whether the routing curve lies above random routing at every rate from 10% to 90%."""
    from conftok.calibration import auroc, calibration_error
    from conftok.probe import bootstrap_interval
    from conftok.routing import routing_curve
    from ray_jobs.evaluate import signal_figures

    extra = {}
    if token_figures is not None:
        extra = {k: token_figures[k] for k in ("token_accuracy", "token_rate", "wrong_domain_token_rate")}
    figures = signal_figures(records, key, beta, "2", **extra)
    conf = np.array([r[key] if r[key] is not None else 0.0 for r in records], dtype=float)
    correct = np.array([r["correct"] for r in records], dtype=float)
    figures["auroc_ci"] = bootstrap_interval(auroc, conf, correct)
    figures["calibration_error_ci"] = bootstrap_interval(
        lambda c, y: calibration_error(c, y, beta=beta, p="2"), conf, correct)
    curve = routing_curve(conf, correct)
    n = len(conf)
    gaps = [a - r for f, a, r in zip(curve["fraction_routed"], curve["accuracy"], curve["random_accuracy"])
            if 0.1 - 1e-9 <= f <= 0.9 + 1e-9]
    figures["routing_min_gain_10_90"] = float(min(gaps))  # > 0: above random routing at every such rate
    figures["routing_mean_gain_10_90"] = float(np.mean(gaps))
    figures["n_routing_points"] = len(gaps) if n else 0
    return figures


def evaluate_run(final_dir: Path, rows: dict[str, list[dict]], base_records: list[dict], *, beta: int,
                 batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """Trained token and answer probability from the adapter; the untrained token from ``base_records``."""
    import torch

    from conftok.evaluate import evaluate, summarize_domain
    from conftok.modeling import load_adapter

    model, tokenizer, domains = load_adapter(final_dir, device=device())
    model.to(torch.bfloat16)
    t = time.perf_counter()
    trained = evaluate(model, tokenizer, rows, domains=domains, beta=beta, p="2", batch_size=batch_size,
                       max_new_tokens=max_new_tokens)
    seconds = round(time.perf_counter() - t, 1)
    out: dict[str, Any] = {"methods": {m: {} for m in METHODS}, "records": {}, "evaluate_s": seconds}
    for domain, figures in trained["domains"].items():
        recs = [r for r in trained["records"] if r["domain"] == domain]
        base = [r for r in base_records if r["domain"] == domain]
        out["methods"]["trained_token"][domain] = signal_block(recs, "p_confident", beta, token_figures=figures)
        out["methods"]["untrained_token"][domain] = signal_block(base, "p_confident", beta,
                                                                 token_figures=summarize_domain(base, beta=beta))
        out["methods"]["answer_probability"][domain] = signal_block(recs, "p_answer", beta)
        out["records"][domain] = {"trained": recs, "untrained": base}
        out["methods"]["trained_token"][domain]["answer_accuracy_change"] = (
            figures["answer_accuracy"] - float(np.mean([r["correct"] for r in base])))
    return out


def _fmt(value, ci=None, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if ci and not any(math.isnan(c) for c in ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def format_study_table(runs: dict[str, dict[str, Any]], domain: str) -> str:
    """Markdown: one row per run and signal, for one domain."""
    head = ("| run | signal | answer acc (Δ base) | token rate | wrong-domain token | token acc | CE (β, p=2) [95% CI] "
            "| Brier | AUROC [95% CI] | routing gain, min over 10-90% | step time / token-only | train s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, run in runs.items():
        for method in METHODS:
            if method == "untrained_token" and name != next(iter(runs)):
                continue  # the same base model for every run: shown once
            f = run["methods"][method].get(domain)
            if f is None:
                continue
            delta = f.get("answer_accuracy_change")
            acc = _fmt(f["answer_accuracy"]) + (f" ({delta:+.3f})" if delta is not None else "")
            lines.append(
                f"| {name if method != 'untrained_token' else '(base model)'} | {method.replace('_', ' ')} | {acc} | "
                f"{_fmt(f.get('token_rate'))} | {_fmt(f.get('wrong_domain_token_rate'))} | {_fmt(f['token_accuracy'])} | "
                f"{_fmt(f['calibration_error'], f.get('calibration_error_ci'))} | {_fmt(f['brier'])} | "
                f"{_fmt(f['auroc'], f.get('auroc_ci'))} | {_fmt(f.get('routing_min_gain_10_90'), digits=3)} | "
                f"{_fmt(run.get('step_ratio'), digits=2)} | {run.get('train_s', '-') if method == 'trained_token' else ''} |")
    return "\n".join(lines)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@dataclass
class Study:
    """One study: its rows, domains and fixed settings; the steps below run it.

    ``make_rows()`` returns ``{"train" | "val" | "eval": {dataset: raw rows}}``; the three parts
    must share no row. Results go to ``bench/results/{name}_*.json``, the work to ``{name}_work/``.
    """

    name: str
    domains_file: Path | None
    make_rows: Callable[[], dict[str, dict[str, list[dict]]]]
    fixed: dict[str, Any]
    beta: int = 100
    eval_batch: int = 16
    max_new_tokens: int = 16
    describe: dict[str, str] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return RESULTS / f"{self.name}_work"

    def domains(self):
        from conftok.domains import resolve_domains

        return resolve_domains(str(self.domains_file) if self.domains_file else None)

    def rows(self, part: str) -> dict[str, list[dict]]:
        return {name: read_jsonl(self.work / f"{part}_{name}.jsonl")
                for name in json.loads((self.work / "parts.json").read_text())[part]}


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _base_model():
    import torch
    from transformers import AutoModelForCausalLM

    from conftok.modeling import load_tokenizer
    from conftok.smollm import ensure_smollm2

    model_dir = ensure_smollm2()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device()).eval()
    return model_dir, model, load_tokenizer(model_dir)


def prepare(study: Study) -> None:
    """Write the rows, tag the training part with the base model, evaluate the base model (with the
    tokens added, as an adapter's disable_adapter() gives it) on the evaluation part once."""
    from conftok.tagging import tag_to_file

    parts = study.make_rows()
    for part, by_dataset in parts.items():
        for dataset, rows in by_dataset.items():
            write_jsonl(study.work / f"{part}_{dataset}.jsonl", rows)
    write_json(study.work / "parts.json", {part: list(by_dataset) for part, by_dataset in parts.items()})
    domains = study.domains()
    _, model, tokenizer = _base_model()
    timings = {}
    t = time.perf_counter()
    _, summary = tag_to_file(model, tokenizer, parts["train"], study.work / "tagged.jsonl", domains=domains,
                             batch_size=study.eval_batch, max_new_tokens=study.max_new_tokens)
    timings["tag_s"] = round(time.perf_counter() - t, 1)
    print(f"tagged {summary['tagged']} rows in {timings['tag_s']} s: {summary['domains']}", flush=True)
    write_json(study.work / "base_eval.json", {"timings_s": timings, "tagging": summary})
    _evaluate_base_model(study, model, tokenizer)


def probe(study: Study, level_key: str | None = None) -> dict[str, Any]:
    """Logistic-regression probe on the base model's last hidden state at the end of its answer:
    5-fold cross-validated on the tagged rows, and fitted on them to score the evaluation rows."""
    from conftok.calibration import auroc
    from conftok.data import read_tagged_rows
    from conftok.probe import answer_end_states, bootstrap_interval, cross_validated_auroc, probe_auroc
    from conftok.prompts import encode_answer, encode_prompt

    domains = study.domains()
    _, model, tokenizer = _base_model()
    t = time.perf_counter()
    tagged = read_tagged_rows(study.work / "tagged.jsonl", domains)
    base = json.loads((study.work / "base_eval.json").read_text())["records"]
    eval_rows = [row for rows in study.rows("eval").values() for row in rows]  # the order evaluate() used
    result: dict[str, Any] = {"layer": "last hidden state (after the final norm) at the answer's last token"}
    for domain in domains:
        train_part = [r for r in tagged if r.domain == domain.name]
        pairs = [(row, rec) for row, rec in zip(eval_rows, base) if rec["domain"] == domain.name]
        if not train_part or not pairs:
            continue
        seqs = [encode_prompt(tokenizer, r.question) + encode_answer(tokenizer, r.answer) for r in train_part]
        y = np.array([r.token == domain.confident_token for r in train_part], dtype=float)
        eval_seqs = [encode_prompt(tokenizer, domain.build_question(row)) + encode_answer(tokenizer, rec["response"] or " ")
                     for row, rec in pairs]
        y_eval = np.array([rec["correct"] for _, rec in pairs], dtype=float)
        x = answer_end_states(model, seqs, pad_id=tokenizer.pad_token_id)
        x_eval = answer_end_states(model, eval_seqs, pad_id=tokenizer.pad_token_id)
        both = 0 < y.sum() < len(y) and 0 < y_eval.sum() < len(y_eval)
        figures = {"train_rows": len(y), "train_accuracy": float(y.mean()), "eval_rows": len(y_eval),
                   "eval_accuracy": float(y_eval.mean())}
        if both:
            held, scores = probe_auroc(x, y, x_eval, y_eval)
            figures.update(probe_cv_auroc_5fold=cross_validated_auroc(x, y, folds=5), probe_held_out_auroc=held,
                           probe_held_out_auroc_ci=bootstrap_interval(auroc, scores, y_eval))
        if level_key and both:
            levels = {domain.build_question(row): row[level_key] for rows in study.rows("train").values() for row in rows}
            rate: dict[str, list[float]] = {}
            for r, yv in zip(train_part, y):
                rate.setdefault(levels[r.question], []).append(yv)
            mean_rate = {k: float(np.mean(v)) for k, v in rate.items()}
            level_scores = np.array([mean_rate[row[level_key]] for row, _ in pairs])
            figures.update(level_accuracy_train=mean_rate, level_only_held_out_auroc=auroc(level_scores, y_eval),
                           level_only_held_out_auroc_ci=bootstrap_interval(auroc, level_scores, y_eval))
        result[domain.name] = figures
    result["seconds"] = round(time.perf_counter() - t, 1)
    write_json(RESULTS / f"{study.name}_probe.json", result)
    print(json.dumps(result, indent=2), flush=True)
    return result


def run(study: Study, name: str, overrides: dict[str, Any], command: str) -> dict[str, Any]:
    """Train one run (TrainConfig defaults, the study's fixed settings, then ``overrides``) and evaluate it."""
    from conftok.smollm import ensure_smollm2

    val = {dataset: str(study.work / f"val_{dataset}.jsonl") for dataset in study.rows("val")}
    final_dir, config, train_s = train_run(name, study.work, model_dir=ensure_smollm2(),
                                           train_data=study.work / "tagged.jsonl", val_sources=val,
                                           domains=study.domains_file, fixed=study.fixed, overrides=overrides)
    base = json.loads((study.work / "base_eval.json").read_text())
    result = evaluate_run(final_dir, study.rows("eval"), base["records"], beta=study.beta,
                          batch_size=study.eval_batch, max_new_tokens=study.max_new_tokens)
    result.update(name=name, overrides=overrides, config=config, train_s=train_s, command=command)
    write_json(RESULTS / f"{study.name}_{name}.json", {k: v for k, v in result.items() if k != "records"})
    write_json(study.work / f"records_{name}.json", result["records"])
    for domain, f in result["methods"]["trained_token"].items():
        print(f"{name} / {domain}: answer acc {f['answer_accuracy']:.3f} ({f['answer_accuracy_change']:+.3f}), "
              f"token rate {f['token_rate']:.3f}, wrong-domain {f['wrong_domain_token_rate']:.3f}, "
              f"AUROC {f['auroc']:.3f} {f['auroc_ci']}, CE {f['calibration_error']:.4f}, answer-prob AUROC "
              f"{result['methods']['answer_probability'][domain]['auroc']:.3f}, routing min gain "
              f"{f['routing_min_gain_10_90']:+.3f}; train {train_s} s, evaluate {result['evaluate_s']} s", flush=True)
    return result


def _evaluate_base_model(study: Study, model, tokenizer) -> None:
    """The base model with the tokens added (what an adapter's disable_adapter() gives) on the evaluation
    part: the untrained-token baseline and the base model's own answers, once for all runs."""
    import torch

    from conftok.evaluate import evaluate
    from conftok.tokens import add_confidence_tokens

    domains = study.domains()
    add_confidence_tokens(tokenizer, model, tokens=domains.tokens)
    saved = json.loads((study.work / "base_eval.json").read_text())
    t = time.perf_counter()
    with torch.autocast(device().type, dtype=torch.bfloat16):
        base = evaluate(model, tokenizer, study.rows("eval"), domains=domains, beta=study.beta, p="2",
                        batch_size=study.eval_batch, max_new_tokens=study.max_new_tokens)
    saved["timings_s"]["base_eval_s"] = round(time.perf_counter() - t, 1)
    saved.update(records=base["records"], domains=base["domains"])
    write_json(study.work / "base_eval.json", saved)
    print(f"base model on the evaluation part: {base['domains']}", flush=True)


def evaluate_base(study: Study) -> None:
    """Evaluate the base model on the evaluation part again (after a change to the evaluation)."""
    _, model, tokenizer = _base_model()
    _evaluate_base_model(study, model, tokenizer)


def reevaluate(study: Study, name: str) -> dict[str, Any]:
    """Evaluate a finished run's final adapter again (after a change to the evaluation), keeping its training facts."""
    old = json.loads((RESULTS / f"{study.name}_{name}.json").read_text())
    base = json.loads((study.work / "base_eval.json").read_text())
    result = evaluate_run(study.work / f"run_{name}" / "final", study.rows("eval"), base["records"], beta=study.beta,
                          batch_size=study.eval_batch, max_new_tokens=study.max_new_tokens)
    result.update({k: old[k] for k in ("name", "overrides", "config", "train_s", "command")})
    write_json(RESULTS / f"{study.name}_{name}.json", {k: v for k, v in result.items() if k != "records"})
    write_json(study.work / f"records_{name}.json", result["records"])
    for domain, f in result["methods"]["trained_token"].items():
        print(f"{name} / {domain} (re-evaluated): answer acc {f['answer_accuracy']:.3f} ({f['answer_accuracy_change']:+.3f}), "
              f"token rate {f['token_rate']:.3f}, AUROC {f['auroc']:.3f}, CE {f['calibration_error']:.4f}", flush=True)
    return result


def main(study: Study, argv=None, *, level_key: str | None = None, doc: str = "") -> int:
    import sys

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="write the rows, tag the training part, evaluate the base model")
    sub.add_parser("probe", help="linear probe on the base model's hidden states (after prepare)")
    train_parser = sub.add_parser("train", help="train one run and evaluate it (after prepare)")
    train_parser.add_argument("--name", required=True, help=f"run name: results/{study.name}_NAME.json")
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                              help="TrainConfig override, e.g. --set learning_rate=1e-3 --set kl_weight=0")
    eval_parser = sub.add_parser("evaluate", help="evaluate the base model and finished runs again")
    eval_parser.add_argument("--names", nargs="*", default=[], help="runs whose final adapter to evaluate again")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(study)
    elif args.command == "probe":
        probe(study, level_key)
    elif args.command == "evaluate":
        evaluate_base(study)
        for name in args.names:
            reevaluate(study, name)
    else:
        command = " ".join([Path(sys.argv[0]).name, "train", "--name", args.name] + [f"--set {s}" for s in args.set])
        run(study, args.name, parse_overrides(args.set), command)
    return 0
