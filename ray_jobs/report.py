"""One self-contained HTML page about a finished search: every trial, the Pareto front of accuracy
against calibration error, parallel coordinates, learning curves, and the best trial's reliability
diagrams, risk-coverage and routing curves.

    python -m ray_jobs.report experiments/demo                  # -> experiments/demo/report/report.html
    python -m ray_jobs.report experiments/demo --out /tmp/demo-report

It reads what ``python -m ray_jobs.tune`` leaves in the experiment directory: ``results.json`` (one
row per trial, ``best_trial``), ``study.db`` (the Optuna study, named like the experiment) and
``trials/<trial_id>/`` (``checkpoint-N/validation.json``, ``final/final_metrics.json``, ``logs/``
TensorBoard events). It writes ``report.html``, which opens offline (PNGs base64-embedded, Plotly's
JS inline once), and the PNGs beside it. Figures are drawn on matplotlib's Agg canvas.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from conftok import metrics as M
from ray_jobs.results import TABLE_PARAMS, is_finite, pareto_front

PARAMS = TABLE_PARAMS  # lora_r, lora_alpha, learning_rate
PNGS = ("pareto.png", "parallel_coordinates.png", "learning_curves.png", "reliability.png", "risk_coverage.png",
        "routing.png")
DOMAIN_LABELS = {"token_accuracy": "token acc", "calibration_error": "CE", "brier": "Brier", "auroc": "AUROC",
                 "answer_accuracy": "answer acc", "token_rate": "token rate", "unparsed": "un\u00adparsed", "n": "n"}


# ---------------------------------------------------------------- reading the experiment

def load_results(experiment_dir: Path) -> dict[str, Any]:
    """results.json, checked for its ``trials`` list."""
    path = experiment_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found, so {experiment_dir} holds no finished search. Run "
            f"`python -m ray_jobs.tune --storage_path DIR` first; it writes DIR/<name>/results.json at the end.")
    results = read_json(path)
    if not isinstance(results.get("trials"), list):
        raise ValueError(f"{path}: expected a 'trials' list (one row per trial), got "
                         f"{type(results.get('trials')).__name__}")
    return results


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e


def checkpoint_validations(trial_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N/validation.json`` of a trial, in step order."""
    found = []
    for path in trial_dir.glob("checkpoint-*/validation.json"):
        step = path.parent.name.removeprefix("checkpoint-")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def validation_history(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's validation metrics in step order: ``final/final_metrics.json``'s history plus any
    checkpoint it lacks (a trial ASHA stopped never wrote ``final/``)."""
    by_step = {step: read_json(path).get("metrics", {}) for step, path in checkpoint_validations(trial_dir)}
    final = trial_dir / "final" / "final_metrics.json"
    if final.is_file():
        for metrics in read_json(final).get("history", []):
            if M.STEP in metrics:
                by_step[int(metrics[M.STEP])] = metrics
    return [{**by_step[s], M.STEP: s} for s in sorted(by_step)]


def read_scalars(log_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one TensorBoard scalar from every event file in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        return [], []
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point, not a sample
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed trial logs some steps twice; last wins
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def load_curves(trials_dir: Path, trial_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per trial: training loss per step (TensorBoard) and validation metrics per validation."""
    return {t: {"loss": read_scalars(trials_dir / t / "logs", M.TRAIN_LOSS),
                "validations": validation_history(trials_dir / t)} for t in trial_ids}


def load_study(study_db: Path, name: str):
    """The Optuna study in ``study_db`` named ``name`` (or its only study)."""
    import optuna

    if not study_db.is_file():
        raise FileNotFoundError(f"{study_db}: not found (the Optuna study of the search)")
    storage = f"sqlite:///{study_db}"
    names = optuna.get_all_study_names(storage)
    if name not in names and len(names) != 1:
        raise ValueError(f"{study_db}: no study named {name!r}; found {names}")
    return optuna.load_study(study_name=name if name in names else names[0], storage=storage)


def domains_of(rows: list[dict[str, Any]]) -> list[str]:
    """Domain names in the order their ``val/<domain>/<name>`` columns first appear."""
    found = [k.split("/")[1] for r in rows for k in r if k.startswith("val/") and k.count("/") == 2]
    return list(dict.fromkeys(found))


def records_by_domain(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[bool]]]:
    """``{domain: (p_confident, answer correct)}`` from validation records with a confidence."""
    out: dict[str, tuple[list[float], list[bool]]] = {}
    for r in records:
        p = r.get("p_confident")
        if is_finite(p):
            conf, correct = out.setdefault(r.get("domain", "?"), ([], []))
            conf.append(float(p))
            correct.append(bool(r.get("correct")))
    return out


# ---------------------------------------------------------------- figures (one function each)

def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display and no pyplot state, safe inside a Ray driver
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def plot_pareto(rows: list[dict[str, Any]], best_id: str | None, path: Path) -> Path:
    """Accuracy against calibration error: every trial, the non-dominated ones joined, the best starred."""
    fig, ((ax,),) = _new_figure(7, 5)
    ok = [r for r in rows if is_finite(r.get("accuracy")) and is_finite(r.get("calibration_error"))]
    errored = [r for r in ok if r.get("status") == "ERROR"]  # partial figures: never best nor on the front
    finished = [r for r in ok if r.get("status") != "ERROR"]
    ax.scatter([r["calibration_error"] for r in finished], [r["accuracy"] for r in finished], s=40, color="tab:gray",
               label="trial", zorder=2)
    if errored:
        ax.scatter([r["calibration_error"] for r in errored], [r["accuracy"] for r in errored], s=60, marker="x",
                   color="tab:orange", label="errored trial (figures before it failed)", zorder=2)
    front = sorted(pareto_front(ok), key=lambda r: r["calibration_error"])
    ax.plot([r["calibration_error"] for r in front], [r["accuracy"] for r in front], "o-", color="tab:blue",
            markersize=9, label="Pareto front", zorder=3)
    for r in ok:
        ax.annotate(r["trial"], (r["calibration_error"], r["accuracy"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    best = [r for r in ok if r["trial"] == best_id]
    if best:
        ax.scatter([best[0]["calibration_error"]], [best[0]["accuracy"]], marker="*", s=350, color="tab:red",
                   edgecolor="black", label=f"best ({best_id})", zorder=4)
    if not ok:
        ax.text(0.5, 0.5, "no trial reported accuracy and calibration error", ha="center", transform=ax.transAxes)
    ax.set(xlabel="calibration error (lower is better)", ylabel="token accuracy (higher is better)",
           title="Accuracy against calibration error")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_parallel_coordinates(rows: list[dict[str, Any]], path: Path) -> Path:
    """One line per trial across rank, alpha, log10 learning rate and score, colored by score."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    columns = [*PARAMS, "score"]
    ok = [r for r in rows if all(is_finite(r.get(p)) for p in PARAMS)]
    values = [[math.log10(r[c]) if c == "learning_rate" else r.get(c) for c in columns] for r in ok]
    fig, ((ax,),) = _new_figure(9, 4.5)
    scores = [v[-1] for v in values if is_finite(v[-1])]
    norm = Normalize(min(scores, default=0), max(scores, default=1))
    cmap = colormaps["viridis"]
    spans = []
    for i in range(len(columns)):
        finite = [v[i] for v in values if is_finite(v[i])]
        spans.append((min(finite, default=0.0), max(finite, default=1.0)))
    scale = lambda x, lo, hi: 0.5 if hi == lo else (x - lo) / (hi - lo)  # noqa: E731
    for r, v in zip(ok, values):
        ys = [scale(x, *spans[i]) if is_finite(x) else math.nan for i, x in enumerate(v)]
        color = cmap(norm(v[-1])) if is_finite(v[-1]) else "lightgray"
        ax.plot(range(len(columns)), ys, "o-", color=color, linewidth=2, alpha=0.9)
        last = max(i for i, y in enumerate(ys) if not math.isnan(y))  # label at the score where there is one
        ax.annotate(r["trial"], (last, ys[last]), textcoords="offset points", xytext=(8, 0), va="center", fontsize=7)
    for i, (lo, hi) in enumerate(spans):
        ax.axvline(i, color="black", linewidth=0.8)
        fmt = (lambda x: f"{10 ** x:.3g}") if columns[i] == "learning_rate" else (lambda x: f"{x:.4g}")
        ax.text(i, 1.04, fmt(hi), ha="center", va="bottom", fontsize=8)
        ax.text(i, -0.04, fmt(lo), ha="center", va="top", fontsize=8)
    ax.set_xticks(range(len(columns)), ["lora_r", "lora_alpha", "learning_rate (log)", "score"])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlim(-0.3, len(columns) - 0.4)
    ax.set_title("Parameters and score per trial")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="score")
    return _save(fig, path)


def plot_learning_curves(curves: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per trial: training loss per step, validation accuracy and calibration error per validation."""
    fig, axes = _new_figure(15, 4.2, 1, 3)
    loss_ax, acc_ax, ce_ax = axes[0]
    for i, (trial, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        loss_ax.plot(*curve["loss"], "-", color=color, label=trial)
        for ax, key in ((acc_ax, M.VAL_ACCURACY), (ce_ax, M.VAL_CALIBRATION_ERROR)):
            points = [(v[M.STEP], v[key]) for v in curve["validations"] if is_finite(v.get(key))]
            ax.plot([s for s, _ in points], [y for _, y in points], "o-", color=color, label=trial)
    for ax, title in ((loss_ax, "training loss"), (acc_ax, "validation token accuracy"),
                      (ce_ax, "validation calibration error")):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8, title="trial")
    return _save(fig, path)


def plot_reliability(reliability: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Per domain: bin accuracy against bin confidence (bars, with the diagonal) and bin counts below."""
    domains = list(reliability)
    fig, axes = _new_figure(5 * len(domains), 6, 2, len(domains), gridspec_kw={"height_ratios": [3, 1]},
                            sharex=True)
    for i, domain in enumerate(domains):
        bins = reliability[domain]
        lefts = [b["lower"] for b in bins]
        widths = [b["upper"] - b["lower"] for b in bins]
        top, bottom = axes[0][i], axes[1][i]
        top.bar(lefts, [b["accuracy"] or 0.0 for b in bins], width=widths, align="edge", color="tab:blue",
                edgecolor="black", alpha=0.7, label="accuracy")
        filled = [b for b in bins if b["count"]]
        top.plot([b["mean_confidence"] for b in filled], [b["accuracy"] for b in filled], "D", color="tab:orange",
                 label="(mean confidence, accuracy)")
        top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        n = sum(b["count"] for b in bins)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="answer accuracy", title=f"{domain} (n={n})")
        top.legend(fontsize=8, loc="upper left")
        bottom.bar(lefts, [b["count"] for b in bins], width=widths, align="edge", color="tab:gray", edgecolor="black")
        bottom.set(xlabel="p_confident", ylabel="count")
    return _save(fig, path)


def plot_risk_coverage(by_domain: dict[str, tuple[list[float], list[bool]]], path: Path) -> Path:
    """Per domain: risk when answering only the most confident fraction (abstaining on the rest)."""
    from conftok.routing import area_under_risk_coverage, risk_coverage_curve

    fig, axes = _new_figure(5 * len(by_domain), 4, 1, len(by_domain))
    for ax, (domain, (conf, correct)) in zip(axes[0], by_domain.items()):
        curve = risk_coverage_curve(conf, correct)
        aurc = area_under_risk_coverage(conf, correct)
        ax.plot(curve["coverage"], curve["risk"], "-", color="tab:blue", label=f"by p_confident (AURC {aurc:.3f})")
        ax.axhline(curve["risk"][-1], linestyle="--", color="gray", label="random abstention")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (fraction answered)", ylabel="risk (1 - accuracy)",
               title=f"{domain} (n={len(conf)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_routing(by_domain: dict[str, tuple[list[float], list[bool]]], path: Path) -> Path:
    """Per domain: accuracy when the least confident fraction goes to an always-right model."""
    from conftok.routing import routing_curve

    fig, axes = _new_figure(5 * len(by_domain), 4, 1, len(by_domain))
    for ax, (domain, (conf, correct)) in zip(axes[0], by_domain.items()):
        curve = routing_curve(conf, correct)
        ax.plot(curve["fraction_routed"], curve["accuracy"], "-", color="tab:green", label="least confident first")
        ax.plot(curve["fraction_routed"], curve["random_accuracy"], "--", color="gray", label="random routing")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction routed", ylabel="accuracy",
               title=f"{domain} (n={len(conf)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def optuna_figures(study) -> list[tuple[str, Any]]:
    """Optuna's interactive Plotly figures: parallel coordinates, parameter importances (two or
    more complete trials), and the Pareto front when the study has two objectives."""
    import optuna.visualization as ov
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None  # color by accuracy when there is no single score
    name = M.VAL_ACCURACY if multi else M.VAL_SCORE
    figures = [("Parallel coordinates (Optuna)", ov.plot_parallel_coordinate(study, target=target, target_name=name))]
    if len(complete) >= 2:
        figures.append(("Parameter importances (Optuna)", ov.plot_param_importances(study)))
    if multi:
        figures.append(("Pareto front (Optuna)", ov.plot_pareto_front(
            study, target_names=[M.VAL_ACCURACY, M.VAL_CALIBRATION_ERROR])))
    return figures


# ---------------------------------------------------------------- the page

def _fmt(value: Any, key: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if value.is_integer() and key.endswith(("/n", "/unparsed", "validations", "step", "lora_r", "lora_alpha")):
            return str(int(value))
        if key == "learning_rate":
            return f"{value:.3g}"
        return f"{value:.0f}" if key == "time_s" else f"{value:.3f}"
    return html.escape(str(value))


HEADERS = {"lora_r": "r", "lora_alpha": "alpha", "learning_rate": "lr", "accuracy": "acc",
           "calibration_error": "CE", "validations": "vals", "time_s": "wall (s)"}


def trials_table(rows: list[dict[str, Any]], best_id: str | None, domains: list[str]) -> str:
    """The table of trials: params, status, overall figures, per-domain figures, wall time, and
    why a trial failed when one did."""
    front = {r["trial"] for r in pareto_front([r for r in rows if is_finite(r.get("accuracy"))
                                               and is_finite(r.get("calibration_error"))])}
    head = [*PARAMS, "status", "accuracy", "calibration_error", "score"]
    tail = ["validations", "step", "time_s"] + (["error"] if any(r.get("error") for r in rows) else [])
    # n (validation rows) goes in the domain's header: it is the same for every trial
    per_domain = {d: [m for m in M.DOMAIN_METRICS if m != "n" and any(M.domain_key(d, m) in r for r in rows)]
                  for d in domains}
    sizes = {d: next((_fmt(r[M.domain_key(d, "n")], "/n") for r in rows if M.domain_key(d, "n") in r), None)
             for d in domains}

    def th(key: str, attrs: str = "") -> str:
        return f"<th{attrs} title='{html.escape(key)}'>{html.escape(HEADERS.get(key, key))}</th>"

    top = th("trial", " rowspan=2 class=id") + "".join(th(c, " rowspan=2") for c in head)
    top += "".join(f"<th colspan={len(ms)} class=group>{html.escape(d)}{f' (n={sizes[d]})' if sizes[d] else ''}</th>"
                   for d, ms in per_domain.items() if ms)
    top += "".join(th(c, " rowspan=2") for c in tail)
    sub = "".join(f"<th title='{M.domain_key(d, m)}'>{DOMAIN_LABELS.get(m, m)}</th>"
                  for d, ms in per_domain.items() for m in ms)
    body = []
    for r in rows:
        trial = str(r.get("trial"))
        badges = (["<span class=badge>best</span>"] if trial == best_id else []) + \
                 (["<span class='badge front'>Pareto</span>"] if trial in front else [])
        cells = [f"<td class=id>{html.escape(trial)}{'<br>' + ' '.join(badges) if badges else ''}</td>"]
        cells += [f"<td class='status {html.escape(str(r.get(c)))}'>{_fmt(r.get(c))}</td>" if c == "status"
                  else f"<td>{_fmt(r.get(c), c)}</td>" for c in head]
        cells += [f"<td>{_fmt(r.get(M.domain_key(d, m)), M.domain_key(d, m))}</td>"
                  for d, ms in per_domain.items() for m in ms]
        cells += [f"<td class=error>{_fmt(r.get(c), c)}</td>" if c == "error" else f"<td>{_fmt(r.get(c), c)}</td>"
                  for c in tail]
        best = " class=best" if trial == best_id else ""
        body.append(f"<tr data-trial='{html.escape(trial)}'{best}>{''.join(cells)}</tr>")
    return (f"<div class=scroll><table id=trials><thead><tr>{top}</tr><tr>{sub}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"
            f"<figcaption>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>")


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def _plotly_div(fig, div_id: str) -> str:
    # A fixed id: Plotly's default is a fresh uuid4, and the same search's report would differ on every rebuild.
    return fig.to_html(full_html=False, include_plotlyjs=False, default_height="480px", div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def best_trial_section(trials_dir: Path, best_id: str | None, out_dir: Path, step: Any = None) -> list[str]:
    """Reliability diagrams, risk-coverage and routing curves from the best trial's validation at ``step``, the step
    its reported figures and offered adapter are from (``results.json``); its last one where no step is given. A
    trial ASHA stopped can validate once more after the report it was stopped at: that later one is not plotted."""
    if not best_id:
        return [_note("results.json names no best_trial (no trial reported a score).")]
    validations = checkpoint_validations(trials_dir / best_id)
    if is_finite(step):
        validations = [(s, p) for s, p in validations if s == int(step)]
    if not validations:
        which = f"checkpoint-{int(step)}" if is_finite(step) else "checkpoint-*"
        return [_note(f"{trials_dir / best_id}: no {which}/validation.json (the reported step's); nothing to plot.")]
    step, path = validations[-1]
    validation = read_json(path)
    parts = [f"<p>From <code>{html.escape(str(path))}</code> (step {step}).</p>"]
    if validation.get("reliability"):
        parts.append(_img(plot_reliability(validation["reliability"], out_dir / "reliability.png"),
                          "Reliability diagram per domain: answer accuracy per p_confident bin"))
    else:
        parts.append(_note(f"{path}: no 'reliability' bins; reliability diagrams skipped."))
    by_domain = records_by_domain(validation.get("records") or [])
    if by_domain:
        parts.append(_img(plot_risk_coverage(by_domain, out_dir / "risk_coverage.png"),
                          "Risk-coverage: abstain on the least confident items"))
        parts.append(_img(plot_routing(by_domain, out_dir / "routing.png"),
                          "Routing: send the least confident items to an always-right model"))
    else:
        parts.append(_note(f"{path}: no per-row 'records' (written by an older conftok); risk-coverage and "
                           "routing curves skipped. A new search writes them."))
    return parts


def optuna_section(experiment_dir: Path) -> tuple[list[str], bool]:
    """The interactive Optuna figures as HTML, and whether there are any (the page then needs Plotly's JS)."""
    try:
        figures = optuna_figures(load_study(experiment_dir / "study.db", experiment_dir.name))
    except Exception as e:  # a missing or odd study costs these figures only, not the report
        return [_note(f"Optuna figures skipped: {type(e).__name__}: {e}")], False
    parts = [_note("Parameters as Optuna sampled them: a lora_alpha searched as multiple_of_rank appears as "
                   "lora_alpha_per_rank (alpha = that x lora_r).")]
    for i, (title, fig) in enumerate(figures):
        parts.append(f"<h3>{html.escape(title)}</h3>{_plotly_div(fig, f'optuna-figure-{i}')}")
    return parts, bool(figures)


def summary_html(results: dict[str, Any], experiment_dir: Path) -> str:
    rows = results["trials"]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    best = next((r for r in rows if r.get("trial") == results.get("best_trial")), None)
    items = [f"experiment <code>{html.escape(str(experiment_dir))}</code>",
             f"objective {html.escape(str(results.get('objective', '?')))}"
             + (f" (lambda = {results['lambda']:g})" if is_finite(results.get("lambda")) else ""),
             f"{len(rows)} trials: " + ", ".join(f"{n} {html.escape(s)}" for s, n in statuses.items())]
    calibration = results.get("calibration") or {}
    if calibration:  # what "calibration error" means on this page
        items.append(f"calibration error: adaptive bins of beta = {html.escape(str(calibration.get('beta')))} rows "
                     f"(Hendrycks et al.), L{html.escape(str(calibration.get('p')))} norm; reliability diagrams: 10 "
                     "equal-width bins of p_confident")
    if is_finite(results.get("wall_s")):
        items.append(f"wall time {results['wall_s']:.0f} s (this run of the job)")
    if best:
        items.append(f"best trial <b>{html.escape(str(best['trial']))}</b>: score {_fmt(best.get('score'))}, "
                     + ", ".join(f"{p} = {_fmt(best.get(p), p)}" for p in PARAMS)
                     + (f"; adapter <code>{html.escape(str(results['best_adapter']))}</code>"
                        if results.get("best_adapter") else ""))
    return "<ul class=summary>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


# Read by tests/test_report.py from headless Chromium's DOM: how many images decoded and how many
# Plotly figures drew their SVG once the page loaded.
RENDER_CHECK = """<div id=render-check hidden></div>
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var plots = Array.from(document.querySelectorAll(".plotly-graph-div"));
  var check = document.getElementById("render-check");
  check.dataset.images = images.length;
  check.dataset.imagesLoaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  check.dataset.plots = plots.length;
  check.dataset.plotsRendered = plots.filter(function (p) { return p.querySelector(".main-svg"); }).length;
});
</script>"""

CSS = """body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:16px;color:#222}
h1{font-size:24px}h2{margin-top:36px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 5px;text-align:right}
th{background:#f0f0f0}th.group{text-align:center}th.id{text-align:left}
td.id{text-align:left;font-family:monospace;white-space:nowrap}
tr.best td{background:#fff6d5;font-weight:bold}.scroll{overflow-x:auto}
.badge{font-size:10px;background:#d62728;color:#fff;border-radius:3px;padding:1px 4px}.badge.front{background:#1f77b4}
td.status.ERROR{color:#b00}td.status.STOPPED{color:#a60}td.error{text-align:left;color:#b00;min-width:30em}
figure{margin:12px 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
.note{color:#8a5a00;background:#fff8e6;padding:6px 10px;border-left:3px solid #e0a000}"""


def render_page(title: str, sections: list[tuple[str, list[str]]], with_plotly: bool) -> str:
    """The whole page; Plotly's JS goes into the head once when any section holds a Plotly figure."""
    plotly_js = ""
    if with_plotly:
        from plotly.offline import get_plotlyjs

        plotly_js = f"<script type='text/javascript'>{get_plotlyjs()}</script>"
    body = "".join(f"<h2>{html.escape(h)}</h2>{''.join(parts)}" for h, parts in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style>{plotly_js}</head><body><h1>{html.escape(title)}</h1>{body}{RENDER_CHECK}"
            "</body></html>")


def build_report(experiment_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` and its PNGs for the search in ``experiment_dir`` (default
    ``experiment_dir/report``); returns the page's path."""
    experiment_dir = Path(experiment_dir).expanduser().resolve()
    results = load_results(experiment_dir)
    out = Path(out_dir).expanduser() if out_dir else experiment_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    # Built in a hidden directory inside out/, then moved into place: a build that fails leaves the last report
    # whole (its page and PNGs together), not a page beside the PNGs of another search state or none.
    build = Path(tempfile.mkdtemp(prefix=".report-build-", dir=out))
    try:
        page_html = _build_page(experiment_dir, results, build)
        for name in PNGS:  # a figure this run skips must not survive from an earlier run
            if (build / name).is_file():
                os.replace(build / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
        page = build / "report.html"
        page.write_text(page_html)
        os.replace(page, out / "report.html")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out / "report.html"


def _build_page(experiment_dir: Path, results: dict[str, Any], out: Path) -> str:
    """The page's HTML, its PNGs written to ``out``."""
    rows, best_id = results["trials"], results.get("best_trial")
    trials_dir = experiment_dir / "trials"
    curves = load_curves(trials_dir, [str(r.get("trial")) for r in rows])
    optuna_parts, with_plotly = optuna_section(experiment_dir)
    best_step = next((r.get("step") for r in rows if r.get("trial") == best_id), None)
    sections = [
        ("Trials", [summary_html(results, experiment_dir), trials_table(rows, best_id, domains_of(rows))]),
        ("Accuracy against calibration error", [_img(plot_pareto(rows, best_id, out / "pareto.png"),
                                                     "Pareto front (non-dominated trials joined; best starred)")]),
        ("Search space", [_img(plot_parallel_coordinates(rows, out / "parallel_coordinates.png"),
                               "Parallel coordinates colored by score"), *optuna_parts]),
        ("Learning curves", [_img(plot_learning_curves(curves, out / "learning_curves.png"),
                                  "Training loss per step; validation accuracy and calibration error")]),
        (f"Best trial {best_id or ''}".strip(), best_trial_section(trials_dir, best_id, out, best_step)),
    ]
    return render_page(f"Search report: {experiment_dir.name}", sections, with_plotly)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        page = build_report(args.experiment_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Report: {page}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", help="an experiment directory written by ray_jobs.tune (holds results.json)")
    parser.add_argument("--out", default=None,
                        help="where report.html and the PNGs go (default: EXPERIMENT_DIR/report)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
